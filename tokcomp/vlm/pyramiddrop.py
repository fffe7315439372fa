"""PyramidDrop: drop image tokens stage by stage inside the LLM (Xing et al., "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv:2410.17247, §3.2).

The decoder is split into stages at layers l_1 < l_2 < ...; before layer l_i the image tokens still present are
ranked by the attention of the last instruction token under layer l_i's OWN input norm, q/k projections and RoPE,
applied to the hidden states entering l_i and averaged over heads:
  s_j = (1/H) Σ_h softmax(q_last K^T / √d)_h[j]      (`PrefillSignals.layer_attn`, a one-row side product)
and the best n_i survive; non-image tokens always survive, with their original RoPE positions.
Count (count="cumulative", default, the reference's): n_i = int(N_0 r_i), a cumulative ratio of the ORIGINAL
  image count N_0, r_i = λ^i (ratio=λ) or given (ratios=0.5-0.25-0.125, the official scripts' list); int floors.
  count="current": n_i = ceil(λ n_{i-1}) (λ applied to the count still present; the two agree while λ^i N_0 stays
  integral). 576 -> 288 -> 144 -> 72 at λ = 0.5 under both.
Spec: "pyramiddrop:layers=8-16-24,ratio=0.5" (the official setting for 32-layer LLaVA); layers >= 1.
Order: ascending slot order (the reference sorts the top-k indices).
Parity: tests/goldens/pyramiddrop_*.npz (tools/goldens/make_pyramiddrop.py, Cooperx521/PyramidDrop @ 6444f30,
  `LlamaModel.pdrop_forward` / `pdrop_rank_drop` in llava/model/modeling_llama_pdrop.py, transformers 4.37.2):
  per-stage ranking rows, kept sets and final hidden states at batch 1 per sample (tests/test_pyramiddrop.py).
Differences: (1) the reference renumbers the RoPE positions 0..S'-1 after every drop (and shifts them per stage
  when decoding); here the kept tokens keep their original positions (the test bed's contract for in-LLM
  reducers; one cache position for all layers). The golden runs the reference with that one adaptation
  (monkeypatched positions), and records its unadapted stage-1 choice, which is the same. (2) Batched: every example
  ranks its own row; its last instruction token is its last real slot (the reference: slot prompt_len +
  image_tokens - 1 of an unpadded sequence, the same slot); padding survives as masked slots. (3) Ties break by
  the lower index (stable sort; torch.topk is unspecified on ties). (4) Training mode (queries before each answer)
  is not offered.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.ops import span

COUNTS = ("cumulative", "current")


@dataclasses.dataclass(frozen=True)
class PyramidDropConfig:
  layers: tuple[int, ...]
  ratios: tuple[float, ...]   # cumulative ratio of the original count after each stage (count="cumulative")
  ratio: float | None = None  # λ (count="current")
  count: str = "cumulative"

  def counts(self, image_len: int) -> list[int]:
    """Image tokens left after each stage, from the original image_len."""
    if self.count == "cumulative":
      out = [int(image_len * r) for r in self.ratios]
    else:
      out, n = [], image_len
      for _ in self.layers:
        n = math.ceil(self.ratio * n)
        out.append(n)
    if not all(0 <= b <= a for a, b in zip([image_len] + out, out)):
      raise ValueError(f"pyramiddrop ratios={self.ratios}: counts {out} of {image_len} image tokens must not grow")
    return out


def _layers(value) -> tuple[int, ...]:
  if isinstance(value, str):
    try:
      value = tuple(int(t) for t in value.split("-"))
    except ValueError:
      raise ValueError(f"pyramiddrop layers={value!r}: must be ints joined by '-', e.g. 8-16-24") from None
  elif isinstance(value, int) and not isinstance(value, bool):
    value = (value,)
  value = tuple(value)
  if (not value or any(not isinstance(l, int) or isinstance(l, bool) or l < 1 for l in value)
      or list(value) != sorted(set(value))):
    raise ValueError(f"pyramiddrop layers={value!r}: must be strictly increasing ints >= 1")
  return value


def _fraction(field: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f"pyramiddrop {field}={value!r}: must be in (0, 1]")
  return float(value)


def parse(args: dict[str, Any]) -> PyramidDropConfig:
  unknown = set(args) - {"layers", "ratio", "ratios", "count"}
  if unknown:
    raise ValueError(f"pyramiddrop: unknown argument(s) {sorted(unknown)}; valid: layers, ratio, ratios, count")
  layers = _layers(args.get("layers", "8-16-24"))
  count = args.get("count", "cumulative")
  if count not in COUNTS:
    raise ValueError(f"pyramiddrop count={count!r}: must be one of {COUNTS}")
  if "ratio" in args and "ratios" in args:
    raise ValueError("pyramiddrop: give ratio= (λ per stage) or ratios= (cumulative list), not both")
  if "ratios" in args:
    if count != "cumulative":
      raise ValueError("pyramiddrop ratios=: a cumulative list; count=current takes ratio= (λ)")
    raw = args["ratios"]
    try:
      if isinstance(raw, str):
        raw = tuple(float(t) for t in raw.split("-"))
      else:
        raw = tuple(raw) if isinstance(raw, (tuple, list)) else (raw,)
    except ValueError:
      raise ValueError(f"pyramiddrop ratios={raw!r}: must be numbers joined by '-', e.g. 0.5-0.25-0.125") from None
    ratios = tuple(_fraction("ratios", r) for r in raw)
    if len(ratios) != len(layers) or list(ratios) != sorted(ratios, reverse=True):
      raise ValueError(f"pyramiddrop ratios={args['ratios']!r}: need one non-increasing ratio per layer "
                       f"({len(layers)} layers {layers})")
    return PyramidDropConfig(layers=layers, ratios=ratios, count=count)
  lam = _fraction("ratio", args.get("ratio", 0.5))
  return PyramidDropConfig(layers=layers, ratios=tuple(lam ** (i + 1) for i in range(len(layers))), ratio=lam,
                           count=count)


def apply(signals: vlm.PrefillSignals, *, config: PyramidDropConfig) -> jax.Array:
  """-> keep [B, S - n_{i-1} + n_i] int32, ascending slots."""
  if signals.layer_attn is None or signals.image_span is None:
    raise ValueError("pyramiddrop needs PrefillSignals.layer_attn (the pruned layer's own last-query row) and "
                     "image_span")
  if signals.layer not in config.layers:
    raise ValueError(f"pyramiddrop called at layer {signals.layer}; its layers are {config.layers}")
  stage, n0 = config.layers.index(signals.layer), signals.image_len0
  if n0 is None:
    raise ValueError("pyramiddrop needs PrefillSignals.image_len0 (the image count before any prune)")
  counts = [n0] + config.counts(n0)
  if signals.image_span[1] != counts[stage]:
    raise ValueError(f"pyramiddrop at layer {signals.layer}: {signals.image_span[1]} image tokens present, the "
                     f"schedule {counts} expects {counts[stage]} (is another reducer pruning in between?)")
  k = counts[stage + 1]
  score = jnp.mean(signals.layer_attn.astype(jnp.float32), axis=1)  # [B, S]: head mean
  return span.keep_top_in_span(score, signals.image_span, k)


vlm.register(vlm.Method(
    name="pyramiddrop", kind="prefill", parse=parse, apply=apply, out_count=lambda cfg, n: cfg.counts(n)[-1],
    needs=("layer_attn", "image_span"), example="pyramiddrop:layers=1-2,ratio=0.5"))

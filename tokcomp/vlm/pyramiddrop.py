"""PyramidDrop: drop image tokens stage by stage inside the LLM (Xing et al., "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv:2410.17247, §3.2).

The decoder is split into stages at layers l_1 < l_2 < ...; before layer l_i the image tokens are ranked by the
attention of the last instruction token, averaged over heads, s_j = (1/H) Σ_h softmax(q_last k^T / √d)_h[j]
(`PrefillSignals.last_attn`, layer l_i - 1's row, a one-row product beside the fused attention), and the best
ceil(λ · n_i) of the n_i image tokens still present survive; non-image tokens always survive, with their original
RoPE positions. Spec: "pyramiddrop:layers=8-16-24,ratio=0.5" (also layers=(8, 16, 24)).
Count: n -> ceil(λ n) at every stage (computed in Python floats), so 576 -> 288 -> 144 -> 72 at λ = 0.5.
Order: ascending slot order.
Parity: no golden. tests/test_fastv.py checks it against a loop-level float64 NumPy reference of the equations
above (tests/test_llm.py's decoder, pruned stage by stage), at batch 1 and batch 3.
Differences from the official code (Cooperx521/PyramidDrop, not run here): its scripts give cumulative ratios of
the ORIGINAL count per stage ([0.5, 0.25, 0.125]); here λ applies to the current count (the same counts whenever
λ^i n stays integral). Unverified against it: which layer's query/key weights produce the ranking row (here layer
l_i - 1's attention, the signal FastV uses). Every example ranks its own row (batched); its last instruction token is
its last real slot.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.ops import span


@dataclasses.dataclass(frozen=True)
class PyramidDropConfig:
  layers: tuple[int, ...]
  ratio: float

  def counts(self, image_len: int) -> list[int]:
    out, n = [], image_len
    for _ in self.layers:
      n = math.ceil(self.ratio * n)
      out.append(n)
    return out


def parse(args: dict[str, Any]) -> PyramidDropConfig:
  unknown = set(args) - {"layers", "ratio"}
  if unknown:
    raise ValueError(f"pyramiddrop: unknown argument(s) {sorted(unknown)}; valid: layers, ratio")
  layers = args.get("layers", "8-16-24")
  if isinstance(layers, str):
    try:
      layers = tuple(int(t) for t in layers.split("-"))
    except ValueError:
      raise ValueError(f"pyramiddrop layers={layers!r}: must be ints joined by '-', e.g. 8-16-24") from None
  elif isinstance(layers, int):
    layers = (layers,)
  layers = tuple(layers)
  if not layers or any(not isinstance(l, int) or l < 1 for l in layers) or list(layers) != sorted(set(layers)):
    raise ValueError(f"pyramiddrop layers={layers!r}: must be strictly increasing ints >= 1")
  ratio = args.get("ratio", 0.5)
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
    raise ValueError(f"pyramiddrop ratio={ratio!r}: must be in (0, 1]")
  return PyramidDropConfig(layers=layers, ratio=float(ratio))


def apply(signals: vlm.PrefillSignals, *, config: PyramidDropConfig) -> jax.Array:
  if signals.last_attn is None or signals.image_span is None:
    raise ValueError("pyramiddrop needs PrefillSignals.last_attn and image_span")
  if signals.layer not in config.layers:
    raise ValueError(f"pyramiddrop called at layer {signals.layer}; its layers are {config.layers}")
  k = math.ceil(config.ratio * signals.image_span[1])
  score = jnp.mean(signals.last_attn.astype(jnp.float32), axis=1)
  return span.keep_top_in_span(score, signals.image_span, k)


vlm.register(vlm.Method(
    name="pyramiddrop", kind="prefill", parse=parse, apply=apply, out_count=lambda cfg, n: cfg.counts(n)[-1],
    needs=("last_attn", "image_span"), example="pyramiddrop:layers=1-2,ratio=0.5"))

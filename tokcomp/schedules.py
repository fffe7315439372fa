"""Per-layer reduction schedules, static token counts, and analytic FLOPs.

A schedule is a tuple with one entry per block: `None`, or a `Step(method, config)` that runs in the block's
reducer slot. `resolve` walks the blocks with the static token count, applies each method's count rule (and
ToMe's cap), and returns the resolved steps plus a per-layer token table. Everything here is Python ints: one
compile per schedule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence


@dataclasses.dataclass(frozen=True)
class Step:
  method: str
  config: Any
  slot: str = "mid"  # "mid": after attention, before the MLP (ToMe/EViT); "pre": before the block (DynamicViT);
  # "ahead" / "post": before the block with its own attention / after the MLP (MCTF, see models/vit.py);
  # "wrap": the block runs on the step's output and the step maps it back after (TokenLearner + TokenFuser)


Schedule = tuple  # tuple[Step | None, ...], one entry per block


@dataclasses.dataclass(frozen=True)
class LayerCounts:
  """Static token counts of one block: entering attention, and entering the MLP (after a mid reducer)."""
  n_attn: int
  n_mlp: int


def parse_r(r: int | Sequence[int] | tuple[int, float], depth: int) -> tuple[int, ...]:
  """ToMe's r forms (Bolya et al. 2023; `tome.utils.parse_r`): per-layer merge counts, length `depth`.

  int r           constant r per layer;
  (r, inflect)    a linear ramp through r: r_l = int(lo + step * l), lo = int(r (1 - inflect)), hi = 2r - lo,
                  step = (hi - lo) / (depth - 1); inflect < 0 merges more early, > 0 more late;
  list            one r per layer, padded with zeros to `depth`.
  """
  if isinstance(r, bool):
    raise ValueError(f"ToMe r={r!r}: must be an int, an (r, inflection) pair, or a list of ints")
  if isinstance(r, int):
    values = [r] * depth
  elif isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
    r0, inflect = r
    if not -1.0 <= inflect <= 1.0:
      raise ValueError(f"ToMe inflection={inflect}: must be in [-1, 1]")
    lo = int(r0 * (1.0 - inflect))
    hi = 2 * r0 - lo
    step = (hi - lo) / max(depth - 1, 1)
    values = [int(lo + step * i) for i in range(depth)]
  elif isinstance(r, (list, tuple)):
    values = list(r)
    if len(values) > depth:
      raise ValueError(f"ToMe r list has {len(values)} entries: must be at most depth={depth}")
    values += [0] * (depth - len(values))
  else:
    raise ValueError(f"ToMe r={r!r}: must be an int, an (r, inflection) pair, or a list of ints")
  for i, v in enumerate(values):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"ToMe r at layer {i} = {v!r}: must be an int >= 0")
  return tuple(values)


def parse_layers(layers: int | str | Sequence[int], depth: int, field: str = "layers") -> tuple[int, ...]:
  """Block indices from an int, a list, or a string such as "3-6-9"; each in [0, depth)."""
  if isinstance(layers, str):
    try:
      layers = [int(t) for t in layers.replace(",", "-").split("-") if t]
    except ValueError:
      raise ValueError(f"{field}={layers!r}: must be block indices joined by '-', e.g. 3-6-9") from None
  elif isinstance(layers, int):
    layers = [layers]
  out = tuple(int(l) for l in layers)
  for l in out:
    if not 0 <= l < depth:
      raise ValueError(f"{field} entry {l}: must be a block index in [0, {depth}) for depth={depth}")
  if len(set(out)) != len(out):
    raise ValueError(f"{field}={out}: repeated block index")
  return tuple(sorted(out))


def resolve(schedule: Schedule, n0: int, num_protected: int) -> tuple[Schedule, tuple[LayerCounts, ...]]:
  """Resolves a schedule against the static token count: per-layer steps and token counts.

  Each method's `bind(config, n0, protected)` first sees the model's input count (DynamicViT's counts are
  fractions of the initial patches); then its `resolve(config, n, protected)` may adapt its config to the count it meets (ToMe caps r at
  (N - protected) // 2, as ToMe does) or return None (nothing to do), and raises ValueError when impossible.
  """
  from tokcomp import reducers  # the registry sits above this module

  steps, counts, n = [], [], n0
  for layer, step in enumerate(schedule):
    n_attn = n
    if step is not None:
      method = reducers.get(step.method)
      try:
        config = method.resolve(method.bind(step.config, n0, num_protected), n, num_protected)
      except ValueError as e:
        raise ValueError(f"{step.method} at block {layer}: {e}") from None
      step = None if config is None else dataclasses.replace(step, config=config)
      if step is not None:
        n = method.out_count(step.config, n, num_protected)
    steps.append(step)
    if step is not None and step.slot == "wrap":  # the block runs at the inner count; N again after it
      counts.append(LayerCounts(n_attn=n, n_mlp=n))
      n = n_attn
      continue
    counts.append(LayerCounts(n_attn=n_attn, n_mlp=n) if step is None or step.slot == "mid"
                  else LayerCounts(n_attn=n_attn, n_mlp=n_attn) if step.slot == "post"  # reduces after the MLP
                  else LayerCounts(n_attn=n, n_mlp=n))
  return tuple(steps), tuple(counts)


def vit_flops(counts: Sequence[LayerCounts], width: int, mlp_dim: int, patch_size: tuple[int, int],
              num_patches: int, num_classes: int, in_channels: int = 3) -> float:
  """Forward FLOPs of one image (2 per multiply-add), counted as in Kaplan et al. 2020 §2.1 / fvcore.

  Per block with N tokens at attention and N' at the MLP, width D, MLP width F:
    qkv 3·N·D², scores and values 2·N²·D, projection N·D², MLP 2·N'·D·F.
  Plus the patch embedding and the head. LayerNorms, softmax and the reducers' own work are left out
  (they are O(N·D) per block).
  """
  macs = num_patches * in_channels * patch_size[0] * patch_size[1] * width
  for c in counts:
    n, n2 = c.n_attn, c.n_mlp
    macs += 4 * n * width * width + 2 * n * n * width + 2 * n2 * width * mlp_dim
  macs += width * num_classes
  return 2.0 * macs


def ceil_count(rate: float, n: int) -> int:
  """ceil(rate * n) in Python floats, as EViT computes its kept count (`math.ceil(keep_rate * (N - 1))`)."""
  return math.ceil(rate * n)


def cosine_anneal(start: int, steps: int, base: float, maximum: float = 1.0, stages: int = 8
                  ) -> list[tuple[int, float]]:
  """EViT's keep-rate anneal (Liang et al. 2022; the reference's `helpers.adjust_keep_rate`) as static stages.

  The reference sets, at iteration t of the anneal window [start, start + steps),
    ρ(t) = base + (maximum - base) (cos(π (t - start) / steps) + 1) / 2,
  maximum before it and base after it, changing ρ every iteration. Every ρ here fixes token counts, so each
  value is one compile: the anneal is sampled at `stages` evenly spaced starts (ρ held until the next), then
  `base` from start + steps on. Returns [(first step, ρ)], steps ascending, the first at step 0.
  """
  if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
    raise ValueError(f"anneal stages={stages!r}: must be an int >= 1 (each stage is one compile)")
  if not 0.0 < base <= maximum <= 1.0:
    raise ValueError(f"anneal base={base}, maximum={maximum}: need 0 < base <= maximum <= 1")
  if start < 0 or steps < 1:
    raise ValueError(f"anneal start={start}, steps={steps}: need start >= 0 and steps >= 1")
  out = [(0, maximum)]
  for j in range(stages):
    t = start + (j * steps) // stages
    rho = base + (maximum - base) * (math.cos(math.pi * (t - start) / steps) + 1) * 0.5
    out.append((t, rho))
  out.append((start + steps, base))
  merged: list[tuple[int, float]] = []
  for t, rho in out:  # a later entry at the same step wins; equal neighbours merge
    if merged and merged[-1][0] == t:
      merged[-1] = (t, rho)
    elif not merged or merged[-1][1] != rho:
      merged.append((t, rho))
  return merged

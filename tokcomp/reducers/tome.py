"""ToMe: bipartite soft matching (Bolya et al., ICLR 2023, arXiv:2210.09461, §3).

Slots alternate into sets A (even positions) and B (odd). Each a scores s_a = max_b cos(k̄_a, k̄_b) on the
head-mean keys k̄ of the block's attention. The r best-scoring a merge into their match by a size-weighted mean
x' = Σ s_i x_i / Σ s_i, and their sizes add. Later blocks attend with softmax(QKᵀ/√d + log s) (proportional
attention, `prop_attn`).
Count: N -> N - r; r <= (N - protected) // 2, else ValueError. A schedule caps r there, as ToMe's does.
Order: as the reference: protected prefix, unmerged A, then B. ToMe's next split depends on it, so logits
       match ToMe's only in that order; `index` maps every original token to its slot.
Config: "tome:r=13" (every block), "tome:r=8-8-6-6" (per block), "tome:r=13,inflect=-0.5" (ToMe's schedule),
        prop_attn=False, block=256 (blocked argmax: the A x B similarity is taken 256 rows at a time, so long
        sequences never hold the full (N/2)^2 matrix; the same result bit for bit).
Variants: tome_kth (k-th bipartite split) and tome_random (random split) share this schedule and the ops.
Parity: tests/goldens/tome_*.npz (tools/goldens/make_tome.py, facebookresearch/ToMe @ af95e4b).
"""
from __future__ import annotations

import dataclasses

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.merge import bipartite_soft_matching
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class ToMeConfig:
  r: int                  # tokens merged away at this block (static)
  prop_attn: bool = True  # hand log(size) to later attention as a bias
  block: int | None = None  # similarity rows per step (blocked argmax: never the full A x B matrix); None: all


def reduce(tokens: Tokens, signals: Signals, *, config: ToMeConfig) -> Tokens:
  if signals.keys_mean is None:
    raise ValueError("tome needs signals.keys_mean (the head-mean keys of the block's attention)")
  if config.r == 0:
    return tokens
  dest = bipartite_soft_matching(signals.keys_mean, tokens.mask, config.r, tokens.num_protected, config.block)
  return tokens.reassign(dest, tokens.n - config.r)


def build_r(method: str, config_cls=ToMeConfig, **extra):
  """A `Method.build` for ToMe's r schedule: "r=13", "r=8-8-6" (one per block), or "r=13,inflect=-0.5"."""
  def _build(args, depth):
    args = reducers.check_args(method, args, {"r": None, "inflect": None, "prop_attn": True, "block": None,
                                              **extra})
    if args["r"] is None:
      raise ValueError(f"{method}: argument r is required, e.g. {method}:r=13, {method}:r=8-8-6 or "
                       f"{method}:r=13,inflect=-0.5")
    r = args.pop("r")
    if isinstance(r, str):  # "8-8-6-6": one r per block
      try:
        r = [int(t) for t in r.split("-")]
      except ValueError:
        raise ValueError(f"{method} r={r!r}: must be an int, or ints joined by '-'") from None
    inflect = args.pop("inflect")
    if inflect is not None:
      r = (r, float(inflect))
    check_block(method, args["block"])
    per_layer = schedules.parse_r(r, depth)
    args["prop_attn"] = bool(args["prop_attn"])
    return tuple(schedules.Step(method, config_cls(v, **args)) if v else None for v in per_layer)
  return _build


def check_block(method: str, block) -> None:
  if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
    raise ValueError(f"{method} block={block!r}: must be a positive int (similarity rows per step) or None")


def _resolve(config: ToMeConfig, n: int, protected: int):
  r = min(config.r, (n - protected) // 2)  # ToMe's cap: at most half of the mergeable tokens
  return dataclasses.replace(config, r=r) if r > 0 else None


reducers.register(reducers.Method(
    name="tome", reduce=reduce, signals=("keys_mean",), build=build_r("tome"),
    out_count=lambda c, n, p: n - c.r, resolve=_resolve, prop_attn=lambda c: c.prop_attn,
    example="tome:r=4"))

"""ToMe with the k-th bipartite split (facebookresearch/ToMe, `tome/merge.py: kth_bipartite_soft_matching`).

The reducible slots go in groups of k: the last of each group is a destination (set B), the other k - 1 (set A)
each merge into their most similar destination by cosine similarity of the head-mean keys (ToMe §3), as a
size-weighted mean. Nothing is ranked: every a merges, so one block divides the reducible count by about k
(k = 2 is ToMe's alternate split with r = (N - P) / 2). Proportional attention follows, as in ToMe.
Config: "tome_kth:k=2,layers=3-6-9" (blocks as in evit), prop_attn=True, block=None (blocked argmax, see tome).
Count: N -> P + (N - P) // k + (N - P) mod k. Order: prefix, then B by position (the reference's `dst` order).
Differs: the prefix is protected, and the ragged tail of (N - P) mod k slots joins B (the reference drops it).
Parity: tests/goldens/tome_kth_*.npz (tools/goldens/make_tome_variants.py, ToMe @ af95e4b, the op on its own).
"""
from __future__ import annotations

import dataclasses

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.merge import kth_bipartite_matching
from tokcomp.reducers.tome import check_block
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class KthConfig:
  k: int                    # group size: k - 1 tokens of every k merge into the k-th
  prop_attn: bool = True
  block: int | None = None


def out_count(config: KthConfig, n: int, protected: int) -> int:
  m = n - protected
  return protected + m // config.k + m % config.k


def reduce(tokens: Tokens, signals: Signals, *, config: KthConfig) -> Tokens:
  if signals.keys_mean is None:
    raise ValueError("tome_kth needs signals.keys_mean (the head-mean keys of the block's attention)")
  dest, count = kth_bipartite_matching(signals.keys_mean, tokens.mask, config.k, tokens.num_protected,
                                       config.block)
  return tokens.reassign(dest, count)


def _build(args, depth):
  args = reducers.check_args("tome_kth", args, {"k": None, "layers": "3-6-9", "prop_attn": True, "block": None})
  k = args["k"]
  if isinstance(k, bool) or not isinstance(k, int) or k < 2:
    raise ValueError(f"tome_kth k={k!r}: must be an int >= 2, e.g. tome_kth:k=2,layers=3-6-9")
  check_block("tome_kth", args["block"])
  layers = schedules.parse_layers(args["layers"], depth, "tome_kth layers")
  config = KthConfig(k, bool(args["prop_attn"]), args["block"])
  return tuple(schedules.Step("tome_kth", config) if i in layers else None for i in range(depth))


reducers.register(reducers.Method(
    name="tome_kth", reduce=reduce, signals=("keys_mean",), build=_build, out_count=out_count,
    resolve=lambda c, n, p: c if out_count(c, n, p) < n else None, prop_attn=lambda c: c.prop_attn,
    example="tome_kth:k=3,layers=1"))

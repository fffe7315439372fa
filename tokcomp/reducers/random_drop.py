"""Random drop: keep k = ceil(ρ (N - P)) reducible tokens chosen uniformly at random, per example.

The baseline that score-based pruning must beat (e.g. EViT, Liang et al. 2022, Table 7). The draw is fixed by
`seed` and the block's token count (one draw per batch position), so it is deterministic and needs no RNG
plumbing.
Count: N -> P + k.  Order: prefix, then kept tokens in ascending slot order.
"""
from __future__ import annotations

import jax

from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops import select
from tokcomp.reducers import keep
from tokcomp.tokens import Tokens


def reduce(tokens: Tokens, signals: Signals, *, config: keep.KeepConfig) -> Tokens:
  del signals
  k = keep.kept_count(config, tokens.n, tokens.num_protected)
  key = jax.random.fold_in(jax.random.key(config.seed), tokens.n)
  score = jax.random.uniform(key, (tokens.batch, tokens.n))  # a different draw for every example
  idx, _ = select.topk_reducible(tokens, score, k)
  return tokens.gather(select.keep_with_prefix(tokens, idx))


reducers.register(reducers.Method(
    name="random", reduce=reduce, signals=(), build=keep.build("random", {"seed": 0}),
    out_count=keep.out_count, resolve=keep.resolve, example="random:keep=0.5,layers=1"))

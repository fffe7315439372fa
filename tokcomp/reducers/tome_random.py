"""ToMe with a random bipartite split (facebookresearch/ToMe, `tome/merge.py: random_bipartite_soft_matching`).

r reducible slots drawn uniformly at random form set A; each merges into its most similar slot of B (all the
others) by cosine similarity of the head-mean keys, as a size-weighted mean (ToMe §3); proportional attention
follows. The draw is fixed by `seed` and the block's token count, and differs between examples.
Config: as tome ("tome_random:r=8", "r=8-8-6", "r=13,inflect=-0.5", prop_attn, block) plus seed=0.
Count: N -> N - r, with r capped at N - P - 1 (B keeps a slot). Order: prefix, then B by position (the
reference keeps B in its random draw order: a set, so the same tokens).
Parity: tests/goldens/tome_random_*.npz (tools/goldens/make_tome_variants.py, ToMe @ af95e4b, the op on its own,
with the reference's draw fed in).
"""
from __future__ import annotations

import dataclasses

import jax

from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops import select
from tokcomp.ops.merge import random_bipartite_matching
from tokcomp.reducers.tome import ToMeConfig, build_r
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class RandomConfig(ToMeConfig):
  seed: int = 0


def draw_sources(tokens: Tokens, r: int, seed: int) -> jax.Array:
  """The r reducible slots [B, r] (ascending) that form A: uniform without replacement, valid slots first."""
  key = jax.random.fold_in(jax.random.key(seed), tokens.n)
  score = jax.random.uniform(key, (tokens.batch, tokens.n))
  return select.topk_reducible(tokens, score, r)[0]


def reduce(tokens: Tokens, signals: Signals, *, config: RandomConfig) -> Tokens:
  if signals.keys_mean is None:
    raise ValueError("tome_random needs signals.keys_mean (the head-mean keys of the block's attention)")
  if config.r == 0:
    return tokens
  src = draw_sources(tokens, config.r, config.seed)
  dest = random_bipartite_matching(signals.keys_mean, tokens.mask, src, tokens.num_protected, config.block)
  return tokens.reassign(dest, tokens.n - config.r)


def _resolve(config: RandomConfig, n: int, protected: int):
  r = min(config.r, n - protected - 1)
  return dataclasses.replace(config, r=r) if r > 0 else None


reducers.register(reducers.Method(
    name="tome_random", reduce=reduce, signals=("keys_mean",), build=build_r("tome_random", RandomConfig, seed=0),
    out_count=lambda c, n, p: n - c.r, resolve=_resolve, prop_attn=lambda c: c.prop_attn,
    example="tome_random:r=5"))

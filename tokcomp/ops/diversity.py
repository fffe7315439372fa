"""Diversity selection: greedy max-min (farthest-point, Gonzalez's greedy k-center) with a static k.

Given pairwise distances d [B, N, N] (d[b, i, j]: from a picked token i to a candidate j) and a first pick, every
further step picks the candidate farthest from the picked set,

    j_t = argmax_{j not picked} min_{s < t} d[j_s, j],

the greedy 2-approximation of the k-center problem (Gonzalez 1985) and the max-min diversity rule of DivPrune
(Alvar et al., CVPR 2025, arXiv:2503.02175, §3.2) and ToDRE's first stage (Li et al. 2025, arXiv:2505.18757).
The running minimum is carried, so each step is one distance row and one argmax per example: O(k N) after the
matrix. The loop is a `lax.fori_loop` over a static k; the batch is a leading axis of every op (per-example
gathers, no row index into a scatter), so a batch-sharded jit runs it without collectives.
Ties: argmax takes the lowest index, as torch.argmax.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcomp.ops.merge import normalize


def cosine_distance(features: jax.Array) -> jax.Array:
  """[B, N, N] 1 - cos(f_i, f_j) in fp32 for features [B, N, D] (rows normalised, then one matmul)."""
  f = normalize(features)
  return 1.0 - jnp.einsum("bid,bjd->bij", f, f, precision=jax.lax.Precision.HIGHEST)


def nearest_other(dist: jax.Array) -> jax.Array:
  """[B, N]: for every candidate j, min over the other tokens i != j of d[i, j] (its distance to its nearest
  neighbour): DivPrune's first-step score."""
  n = dist.shape[-1]
  return jnp.min(jnp.where(jnp.eye(n, dtype=bool), jnp.inf, dist.astype(jnp.float32)), axis=1)


def greedy_max_min(dist: jax.Array, k: int, first: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Indices [B, k] int32 in pick order: `first` [B] and then k - 1 farthest-point steps over d [B, N, N].

  valid [B, N] (optional): candidates that may be picked (a picked or invalid token is never picked again).
  The count k is a Python int, 1 <= k <= N (ValueError otherwise); with fewer valid candidates than k the
  surplus picks repeat an invalid slot and the caller must mask them.
  """
  b, n, _ = dist.shape
  if not 1 <= k <= n:
    raise ValueError(f"greedy_max_min k={k}: must be in [1, {n}] (the number of candidates)")
  dist = dist.astype(jnp.float32)
  cols = jnp.arange(n, dtype=jnp.int32)
  blocked = jnp.zeros((b, n), bool) if valid is None else ~valid

  def row(j):  # [B] -> [B, N]: d[b, j_b, :]
    return jnp.take_along_axis(dist, j[:, None, None], axis=1)[:, 0]

  first = first.astype(jnp.int32)
  picks = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first)
  state = (picks, row(first), blocked | (cols[None] == first[:, None]))

  def step(t, state):
    picks, nearest, taken = state
    j = jnp.argmax(jnp.where(taken, -jnp.inf, nearest), axis=1).astype(jnp.int32)
    return (jax.lax.dynamic_update_slice_in_dim(picks, j[:, None], t, axis=1),
            jnp.minimum(nearest, row(j)), taken | (cols[None] == j[:, None]))

  picks, _, _ = jax.lax.fori_loop(1, k, step, state)
  return picks

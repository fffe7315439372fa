"""Token graphs indexed by original token position: where a slot came from, the spatial (patch-grid) and the
semantic (k nearest by cosine) adjacency, and the symmetric degree normalisation.

Reducers that carry a graph through the encoder (GTP-ViT) can rebuild any restriction of the graph of the
encoder's input from `slot_origin` alone, so no [N, N] matrix has to travel with the token state. Everything
is per example with static shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcomp.tokens import Tokens, batched_scatter


def slot_origin(tokens: Tokens) -> jax.Array:
  """[B, N] int32: the original token index each slot holds (the lowest one if a merge put several there), or
  -1 for a slot that holds none. Inverts `Tokens.index` with one batched scatter-min."""
  n0 = tokens.num_original
  target = jnp.where(tokens.index >= 0, tokens.index, tokens.n)  # dropped originals fall out (mode="drop")
  first = batched_scatter(jnp.full((tokens.batch, tokens.n), n0, jnp.int32), target,
                          jnp.broadcast_to(jnp.arange(n0, dtype=jnp.int32), tokens.index.shape), "min", mode="drop")
  return jnp.where(first < n0, first, -1)


def grid_adjacency(rows: jax.Array, cols: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """[..., R, C] bool: patch rows[r] and patch cols[c] (raster indices on the (h, w) grid) touch in the
  8-neighbourhood, |Δrow| <= 1 and |Δcol| <= 1, and are different patches (no self loops)."""
  w = grid[1]
  dr = jnp.abs(rows[..., :, None] // w - cols[..., None, :] // w)
  dc = jnp.abs(rows[..., :, None] % w - cols[..., None, :] % w)
  return (dr <= 1) & (dc <= 1) & (rows[..., :, None] != cols[..., None, :])


def cosine_similarity(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """[B, R, M]: cos(q_r, k_m), both normalised first (x / ||x||) and then multiplied."""
  q = queries / jnp.linalg.norm(queries, axis=-1, keepdims=True)
  k = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
  return jnp.einsum("brd,bmd->brm", q, k)


def at_least_kth_largest(scores: jax.Array, count: int) -> jax.Array:
  """[..., M] bool: entries >= the count-th largest of their row (a sparse top-`count` graph; ties at the
  threshold are all kept, as a threshold compare does). Static: a full sort per row, no top_k."""
  m = scores.shape[-1]
  if not 1 <= count <= m:
    raise ValueError(f"top-k graph count={count}: must be in [1, {m}]")
  threshold = jnp.sort(scores, axis=-1)[..., m - count]
  return scores >= threshold[..., None]


def inverse_sqrt_degree(adjacency: jax.Array) -> jax.Array:
  """[..., R]: deg^-1/2 of each row (deg = row sum); 0 for an isolated node instead of inf."""
  degree = jnp.sum(adjacency.astype(jnp.float32), axis=-1)
  return jnp.where(degree > 0, jnp.where(degree > 0, degree, 1.0) ** -0.5, 0.0)

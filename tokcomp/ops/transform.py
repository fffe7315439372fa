"""Token reduction as an explicit matrix: new tokens X' = T X with T [B, M, N] (Token Transforming's view).

Pruning, merging and soft many-to-many reductions all take this one form (Zeng et al. 2025, arXiv:2506.05709,
§3): a prune has one-hot rows, a merge has disjoint rows, a many-to-many transform has overlapping rows. What
a reducer supplies is an *assignment* A [B, N, M] >= 0: the share of old slot n that goes to new slot m. A row
that sums to 1 moves the whole token (split over one or more new slots); a zero row drops it.

From A and the sizes s (how many original tokens each slot stands for):
  size'_m = Σ_n A[n, m] s_n                       (mass moves with the assignment, so Σ size is conserved)
  T[m, n] = A[n, m] s_n / size'_m                 (each row of T sums to 1: a size-weighted mean)
  x'      = T x                                   (one batched matmul)
Sizes are kept exactly conserved in fp32 (the library invariant Σ size = tokens held): each share A[n, m] s_n
that feeds size' is rounded to a multiple of 2^-q, q = 23 - bit_length(N0), and the dominant share of a row
takes the remainder, so every partial sum is exact. That moves a size by at most 2^-(q+1) per share (1.5e-5
for N0 = 197, 3.8e-6 for N0 = 50); T itself uses the unrounded shares.
A one-hot A that selects slots gives `Tokens.gather`; a one-hot A per row gives `Tokens.reassign` (a
size-weighted merge). `index` becomes the dominant slot: original token p now lives where its current slot
sends the largest share, argmax_m A[n, m] (first on ties), or -1 if that slot was dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcomp.tokens import Tokens, _compose


def transform_matrix(assign: jax.Array, size: jax.Array, mask: jax.Array, num_original: int
                     ) -> tuple[jax.Array, jax.Array]:
  """The explicit transform T [B, M, N] (rows sum to 1, or 0 for an empty new slot) and the new sizes [B, M].

  assign [B, N, M] >= 0, size [B, N], mask [B, N]: invalid slots carry no mass. `num_original` (N0, static)
  sets the dyadic grid on which the new sizes are conserved exactly (module docstring).
  """
  assign = assign.astype(jnp.float32)
  held = jnp.where(mask, size, 0.0).astype(jnp.float32)
  mass = held[..., None] * assign  # [B, N, M]
  soft_size = jnp.sum(mass, axis=1)  # [B, M]
  matrix = jnp.swapaxes(mass, 1, 2) / jnp.where(soft_size > 0, soft_size, 1.0)[..., None]

  scale = 2.0 ** max(23 - int(num_original).bit_length(), 0)
  shares = jnp.round(mass * scale) / scale
  dominant = jax.nn.one_hot(jnp.argmax(assign, axis=-1), assign.shape[-1], dtype=bool)  # [B, N, M]
  moved = jnp.where(jnp.sum(assign, axis=-1) > 0, held, 0.0)  # what a row hands on in total
  rest = jnp.sum(jnp.where(dominant, 0.0, shares), axis=-1)
  shares = jnp.where(dominant, (moved - rest)[..., None], shares)
  return matrix, jnp.sum(shares, axis=1)


def dominant_slot(assign: jax.Array, mask: jax.Array) -> jax.Array:
  """dest [B, N]: the new slot that receives the largest share of each old slot; -1 if it is dropped."""
  moved = mask & (jnp.sum(assign, axis=-1) > 0)
  return jnp.where(moved, jnp.argmax(assign, axis=-1), -1).astype(jnp.int32)


def soft_reassign(tokens: Tokens, assign: jax.Array) -> Tokens:
  """Applies an assignment A [B, N, M] to the token state as x' = T x (see the module docstring).

  Sizes move with A (size' = Aᵀ s), a new slot is valid if it received any mass, and `index` follows
  `dominant_slot`. The new state has no patch grid.
  """
  b, n, m = assign.shape
  if (b, n) != tokens.mask.shape:
    raise ValueError(f"soft_reassign: assign shape {assign.shape} must be [B, N, M] with [B, N] = "
                     f"{tokens.mask.shape}")
  matrix, new_size = transform_matrix(assign, tokens.size, tokens.mask, tokens.num_original)
  x = jnp.einsum("bmn,bnd->bmd", matrix.astype(tokens.x.dtype), tokens.x,
                 precision=jax.lax.Precision.HIGHEST)
  index = _compose(tokens.index, dominant_slot(assign, tokens.mask))
  return tokens.replace(x=x, size=new_size.astype(tokens.size.dtype), mask=new_size > 0, index=index,
                        grid=None)

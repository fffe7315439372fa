"""Bipartite matching on a given score matrix, in one direction (A -> B, ToMe's) or both (A -> B, then B -> A).

`merge.bipartite_soft_matching` scores the edges itself (cosine of a metric); here the caller hands in any
score [B, Na, Nb] between the A slots (even positions) and the B slots (odd positions), higher = merge first.
MCTF (Lee et al., CVPR 2024, arXiv:2403.10030, §3.2) scores edges by several criteria and matches both ways.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp.tokens import batched_scatter


def rank_best_first(score: jax.Array, klass: jax.Array) -> jax.Array:
  """Indices [B, M] of `score` [B, M] ordered by class (0 first), then by descending score; ties keep position.

  Two stable argsorts (a lexicographic sort), never `lax.top_k`, so a batch-sharded jit has no collectives.
  """
  order = jnp.argsort(score, axis=-1, descending=True, stable=True)
  by_class = jnp.argsort(jnp.take_along_axis(klass, order, axis=-1), axis=-1, stable=True)
  return jnp.take_along_axis(order, by_class, axis=-1)


def scored_bipartite_matching(scores: jax.Array, mask: jax.Array, r: int, num_protected: int,
                              bidirectional: bool = False) -> jax.Array:
  """Merges r slots by bipartite matching on `scores` [B, Na, Nb] (A = even slots, B = odd slots).

  One direction: each a ranks by its best edge max_b S[a, b]; the r best a merge into their best b.
  Both directions (MCTF's `bidirection`): r1 = r // 2 slots of A merge into B as above; then each b ranks by
  its best edge to an A slot that is still unmerged, max_a S[a, b], and the r2 = r - r1 best b (with whatever
  merged into them) merge into that a. Both rounds read the same score matrix.
  Protected prefix slots and invalid slots take part in no edge; they rank last (protected below invalid).

  Returns dest [B, N] (int32): the new slot of every slot. Count: N -> N - r. Order (the reference's):
  protected prefix; the unmerged A slots by position (by descending score when there is no prefix); then
  the B slots: by position (one direction) or, both directions, the unmerged B by descending round-2 score.
  """
  b, na, nb = scores.shape
  n = mask.shape[1]
  if (na, nb) != ((n + 1) // 2, n // 2):
    raise ValueError(f"scored matching: scores shape {scores.shape[1:]} must be (ceil(N/2), floor(N/2)) for "
                     f"N={n} slots")
  if not 0 <= r <= (n - num_protected) // 2:
    raise ValueError(f"matching r={r}: must be in [0, {(n - num_protected) // 2}] = [0, (N - protected) // 2] "
                     f"for N={n}, protected={num_protected}")
  pos = np.arange(n)
  if r == 0:
    return jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (b, n))
  r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
  is_a, half, prot = pos % 2 == 0, pos // 2, pos < num_protected
  klass = jnp.where(prot, 2, jnp.where(mask, 0, 1))  # [B, N]: 0 valid, 1 invalid, 2 protected
  klass_a, klass_b = klass[:, 0::2], klass[:, 1::2]
  s = jnp.where((klass_a[:, :, None] > 0) | (klass_b[:, None, :] > 0), -jnp.inf, scores.astype(jnp.float32))

  # Round 1: A -> B.
  order_a = rank_best_first(jnp.max(s, axis=2), klass_a)  # [B, Na]
  to_b = jnp.argmax(s, axis=2)  # [B, Na] best b of every a
  merged_a = batched_scatter(jnp.zeros((b, na), bool), order_a[:, :r1], True)
  num_unmerged_a = int((is_a & ~prot).sum()) - r1
  if num_protected:  # unmerged A by position
    unmerged_a = jnp.asarray((is_a & ~prot)[0::2]) & ~merged_a
    slot_a = num_protected + jnp.cumsum(unmerged_a, axis=1) - 1
  else:  # by descending score
    rank_a = batched_scatter(jnp.zeros((b, na), jnp.int32), order_a, jnp.arange(na, dtype=jnp.int32))
    slot_a = rank_a - r1

  # Round 2: B -> still unmerged A.
  if bidirectional:
    s2 = jnp.where(merged_a[:, :, None], -jnp.inf, s)
    order_b = rank_best_first(jnp.max(s2, axis=1), klass_b)  # [B, Nb]
    to_a = jnp.argmax(s2, axis=1)  # [B, Nb] best unmerged a of every b
    merged_b = batched_scatter(jnp.zeros((b, nb), bool), order_b[:, :r2], True)
    rank_b = batched_scatter(jnp.zeros((b, nb), jnp.int32), order_b, jnp.arange(nb, dtype=jnp.int32))
    slot_b = num_protected + num_unmerged_a + rank_b - r2
    final_b = jnp.where(merged_b, jnp.take_along_axis(slot_a, to_a, axis=1), slot_b)
  else:
    slot_b = num_protected + num_unmerged_a + np.cumsum(~prot[1::2]) - 1  # static: B by position
    final_b = jnp.broadcast_to(jnp.asarray(slot_b), (b, nb))
  final_a = jnp.where(merged_a, jnp.take_along_axis(final_b, to_b, axis=1), slot_a)
  dest = jnp.where(jnp.asarray(is_a), final_a[:, half], final_b[:, np.minimum(half, nb - 1)])
  return jnp.where(jnp.asarray(prot), pos, dest).astype(jnp.int32)

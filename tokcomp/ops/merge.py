"""Matching for merges. The merge itself is `Tokens.reassign` (one batched scatter-add)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp.tokens import batched_scatter


def best_match(ma: jax.Array, mb: jax.Array, blocked_b: jax.Array, block: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
  """For every row a of `ma` [B, Na, C]: the best cosine similarity to an unblocked row of `mb` [B, Nb, C] and
  its index, ([B, Na] float32, [B, Na] int32). `ma`, `mb` must be l2-normalised.

  block: compute the similarities `block` rows of A at a time (a `lax.map`), so the full Na x Nb matrix never
    exists; peak memory B x block x Nb. Same result as unblocked, bit for bit (the same dot products).
  """
  def rows(a):  # [B, n, C] -> ([B, n], [B, n])
    s = jnp.einsum("bic,bjc->bij", a, mb)
    s = jnp.where(blocked_b[:, None, :], -jnp.inf, s)
    return jnp.max(s, axis=-1), jnp.argmax(s, axis=-1).astype(jnp.int32)

  b, na, c = ma.shape
  if block is None or block >= na:
    return rows(ma)
  if block < 1:
    raise ValueError(f"similarity block={block}: must be a positive number of rows")
  nblk = -(-na // block)
  a = jnp.pad(ma, ((0, 0), (0, nblk * block - na), (0, 0))).reshape(b, nblk, block, c)
  best, idx = jax.lax.map(rows, jnp.moveaxis(a, 1, 0))  # [nblk, B, block]
  unblock = lambda t: jnp.moveaxis(t, 0, 1).reshape(b, nblk * block)[:, :na]
  return unblock(best), unblock(idx)


def normalize(metric: jax.Array) -> jax.Array:
  """Rows scaled to unit l2 norm (fp32); an all-zero row stays zero instead of NaN."""
  metric = metric.astype(jnp.float32)
  return metric / jnp.maximum(jnp.linalg.norm(metric, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def bipartite_soft_matching(metric: jax.Array, mask: jax.Array, r: int, num_protected: int,
                            block: int | None = None) -> jax.Array:
  """ToMe's bipartite soft matching (Bolya et al., ICLR 2023, arXiv:2210.09461, §3, Alg. 1).

  Slots alternate into A (even positions) and B (odd). Each a scores s_a = max_b cos(m_a, m_b); the r best
  a merge into their best b. Protected prefix slots are in neither side of any edge.

  Returns dest [B, N] (int32): the new slot of every current slot, in ToMe's order: protected prefix first
  (original order), then the unmerged A slots by position, then the B slots by position. Count: N -> N - r.
  """
  b, n, _ = metric.shape
  na = (n + 1) // 2
  if not 0 <= r <= (n - num_protected) // 2:
    raise ValueError(f"ToMe r={r}: must be in [0, {(n - num_protected) // 2}] = [0, (N - protected) // 2] "
                     f"for N={n}, protected={num_protected}")
  metric = normalize(metric)
  pos = jnp.arange(n)
  blocked = (pos < num_protected)[None, :] | ~mask  # [B, N] slots that may not take part in a match
  node_max, node_idx = best_match(metric[:, 0::2], metric[:, 1::2], blocked[:, 1::2], block)  # [B, Na]
  # Blocked A slots rank last, protected ones below invalid ones, so a prefix slot is never merged even when r
  # exceeds the valid A slots (an invalid slot carries no weight; its merge changes nothing).
  node_max = jnp.where(blocked[:, 0::2], jnp.finfo(jnp.float32).min, node_max)
  node_max = jnp.where((pos < num_protected)[None, 0::2], -jnp.inf, node_max)

  # The r best A nodes (descending score) merge; ties break by position.
  if num_protected:
    best = jnp.argsort(node_max, axis=-1, descending=True, stable=True)[:, :r]  # [B, r] (= lax.top_k, which
    # a batch-sharded jit all-gathers)
  else:  # the full ranking is needed below for the order of the unmerged A slots
    order = jnp.argsort(-node_max, axis=-1, stable=True)  # [B, Na]
    best = order[:, :r]
  merged_a = batched_scatter(jnp.zeros((b, na), bool), best, True)  # [B, Na]

  # New order: protected first, then unmerged A, then B by position. ToMe sorts the unmerged A by position
  # when a class token leads; with no prefix it leaves them in descending score order, and so do we.
  # Every new slot is a count, so no sort is needed: B slots and the prefix have static places.
  is_a = np.arange(n) % 2 == 0
  half = np.where(is_a, np.arange(n) // 2, (np.arange(n) - 1) // 2)
  prot = np.arange(n) < num_protected
  num_unmerged_a = int((is_a & ~prot).sum()) - r
  b_slot = num_protected + num_unmerged_a + np.cumsum(~is_a & ~prot) - 1  # static: [N]
  merged = jnp.asarray(is_a) & merged_a[:, half]  # [B, N]
  if num_protected:
    unmerged_a = jnp.asarray(is_a & ~prot) & ~merged
    a_slot = num_protected + jnp.cumsum(unmerged_a, axis=1) - 1
  else:
    rank = batched_scatter(jnp.zeros((b, na), jnp.int32), order, jnp.arange(na, dtype=jnp.int32))
    a_slot = rank[:, half] - r
  old_to_new = jnp.where(prot, np.arange(n), jnp.where(is_a, a_slot, b_slot)).astype(jnp.int32)  # [B, N]
  # A merged a slot follows its partner b (position 2 j + 1) to that b's static slot.
  partner_slot = jnp.asarray(b_slot.astype(np.int32))[2 * node_idx + 1]  # [B, Na]
  return jnp.where(merged, partner_slot[:, half], old_to_new)


def kth_bipartite_matching(metric: jax.Array, mask: jax.Array, k: int, num_protected: int,
                           block: int | None = None) -> tuple[jax.Array, int]:
  """ToMe's k-th bipartite matching (facebookresearch/ToMe `kth_bipartite_soft_matching`): the reducible slots
  go in groups of k; the last of each group is in B, the other k - 1 are in A, and every a merges into its most
  similar b (no r: the count is fixed by k).

  Differs from the reference: the prefix is protected, and a ragged tail of (N - P) mod k slots joins B (the
  reference drops it). Returns (dest [B, N], count) with count = P + (N - P) // k + (N - P) mod k; order: prefix,
  then B by position.
  """
  b, n, _ = metric.shape
  p = num_protected
  if k < 2:
    raise ValueError(f"kth bipartite k={k}: must be >= 2 (k = 2 merges every other token)")
  j = np.arange(n) - p
  full = (n - p) // k * k
  in_b = (j >= 0) & ((j % k == k - 1) | (j >= full))
  in_a = (j >= 0) & ~in_b
  b_pos, a_pos = np.flatnonzero(in_b), np.flatnonzero(in_a)
  count = p + len(b_pos)
  metric = normalize(metric)
  _, partner = best_match(metric[:, a_pos], metric[:, b_pos], ~mask[:, b_pos], block)  # [B, Na]
  dest = np.zeros(n, np.int32)
  dest[:p] = np.arange(p)
  dest[b_pos] = p + np.arange(len(b_pos))
  dest = jnp.broadcast_to(jnp.asarray(dest), (b, n))
  return dest.at[:, a_pos].set(p + partner), count


def random_bipartite_matching(metric: jax.Array, mask: jax.Array, src: jax.Array, num_protected: int,
                              block: int | None = None) -> jax.Array:
  """ToMe's random bipartite matching (facebookresearch/ToMe `random_bipartite_soft_matching`): the r slots
  `src` [B, r] (reducible, distinct) form A and every one merges into its most similar slot of B, the rest.

  Returns dest [B, N]: prefix first, then B in position order (the reference keeps B in its random draw order;
  a set, so the same tokens). Count: N -> N - r.
  """
  b, n, _ = metric.shape
  r = src.shape[1]
  if not 0 <= r <= n - num_protected - 1:
    raise ValueError(f"random bipartite r={r}: must be in [0, {n - num_protected - 1}] (N={n}, "
                     f"protected={num_protected}; B needs at least one slot)")
  in_a = batched_scatter(jnp.zeros((b, n), bool), src, True)
  slot = jnp.cumsum(~in_a, axis=1, dtype=jnp.int32) - 1  # the new slot of every slot not in A
  metric = normalize(metric)
  ma = jnp.take_along_axis(metric, src[..., None], axis=1)  # [B, r, C]
  blocked_b = in_a | ~mask | (jnp.arange(n) < num_protected)
  _, partner = best_match(ma, metric, blocked_b, block)  # [B, r] into all N slots, A and prefix blocked
  merged_to = jnp.take_along_axis(slot, partner, axis=1)
  return batched_scatter(jnp.where(in_a, -1, slot), src, merged_to)

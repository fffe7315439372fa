"""Matching for merges. The merge itself is `Tokens.reassign` (one batched scatter-add)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def bipartite_soft_matching(metric: jax.Array, mask: jax.Array, r: int, num_protected: int) -> jax.Array:
  """ToMe's bipartite soft matching (Bolya et al., ICLR 2023, arXiv:2210.09461, §3, Alg. 1).

  Slots alternate into A (even positions) and B (odd). Each a scores s_a = max_b cos(m_a, m_b); the r best
  a merge into their best b. Protected prefix slots are in neither side of any edge.

  Returns dest [B, N] (int32): the new slot of every current slot, in ToMe's order: protected prefix first
  (original order), then the unmerged A slots by position, then the B slots by position. Count: N -> N - r.
  """
  b, n, _ = metric.shape
  na, nb = (n + 1) // 2, n // 2
  if not 0 <= r <= (n - num_protected) // 2:
    raise ValueError(f"ToMe r={r}: must be in [0, {(n - num_protected) // 2}] = [0, (N - protected) // 2] "
                     f"for N={n}, protected={num_protected}")
  metric = metric.astype(jnp.float32)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  pos = jnp.arange(n)
  blocked = (pos < num_protected)[None, :] | ~mask  # [B, N] slots that may not take part in a match
  ma, mb = metric[:, 0::2], metric[:, 1::2]
  scores = jnp.einsum("bic,bjc->bij", ma, mb)  # [B, Na, Nb]
  scores = jnp.where(blocked[:, 0::2, None] | blocked[:, None, 1::2], -jnp.inf, scores)
  node_max = jnp.max(scores, axis=-1)  # [B, Na]
  node_idx = jnp.argmax(scores, axis=-1)  # [B, Na]

  # The r best A nodes (descending score) merge; ties break by position, as a stable sort would.
  order = jnp.argsort(-node_max, axis=-1, stable=True)  # [B, Na]
  merged_a = jnp.zeros((b, na), bool).at[jnp.arange(b)[:, None], order[:, :r]].set(True)

  # New order: protected first, then unmerged A, then B by position. ToMe sorts the unmerged A by position
  # when a class token leads; with no prefix it leaves them in descending score order, and so do we.
  is_a = pos % 2 == 0
  half = jnp.where(is_a, pos // 2, (pos - 1) // 2)
  merged = jnp.where(is_a[None, :], jnp.take(merged_a, half, axis=1, mode="clip"), False)  # [B, N]
  if num_protected:
    a_rank = jnp.broadcast_to(pos, (b, n))
  else:
    rank = jnp.zeros((b, na), jnp.int32).at[jnp.arange(b)[:, None], order].set(jnp.arange(na, dtype=jnp.int32))
    a_rank = jnp.take(rank, half, axis=1, mode="clip")
  group_key = jnp.where(pos < num_protected, pos, jnp.where(is_a, n + a_rank, 2 * n + pos))
  key = jnp.where(merged, 3 * n + pos, group_key)  # merged A slots sort last and are cut
  new_order = jnp.argsort(key, axis=-1)[:, :n - r]  # [B, N - r]: old slot at each new slot
  old_to_new = jnp.full((b, n), -1, jnp.int32).at[jnp.arange(b)[:, None], new_order].set(
      jnp.arange(n - r, dtype=jnp.int32))
  # A merged a slot follows its partner b to that b's new slot.
  partner = 2 * jnp.take(node_idx, half, axis=1, mode="clip") + 1  # [B, N] (meaningful on A slots)
  partner_new = jnp.take_along_axis(old_to_new, jnp.clip(partner, 0, n - 1), axis=1)
  return jnp.where(merged, partner_new, old_to_new)

"""Matching for merges. The merge itself is `Tokens.reassign` (one batched scatter-add)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp.tokens import batched_scatter


def bipartite_soft_matching(metric: jax.Array, mask: jax.Array, r: int, num_protected: int) -> jax.Array:
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
  metric = metric.astype(jnp.float32)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  pos = jnp.arange(n)
  blocked = (pos < num_protected)[None, :] | ~mask  # [B, N] slots that may not take part in a match
  ma, mb = metric[:, 0::2], metric[:, 1::2]
  scores = jnp.einsum("bic,bjc->bij", ma, mb)  # [B, Na, Nb]
  scores = jnp.where(blocked[:, 0::2, None] | blocked[:, None, 1::2], -jnp.inf, scores)
  node_max = jnp.max(scores, axis=-1)  # [B, Na]
  node_idx = jnp.argmax(scores, axis=-1)  # [B, Na]

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

"""Learned soft aggregation: M new tokens, each a convex combination of the reducible slots.

PatchMerger (Renggli et al. 2022) and SiT's token slimming module (Zong et al. 2022) both end the same way:
logits L [B, N, M] over the N reducible slots, a softmax over the slots for every new token m, and
  x'_m = Σ_n A[n, m] x_n,   A[:, m] = softmax_n(L[:, m])   (invalid slots get weight 0).
The new tokens are not a subset or merge of the old ones, so the bookkeeping is by convention:
  index  original token p lives in the new token its slot contributes to most, argmax_m A[n, m]
         (`transform.dominant_slot`), so `Tokens.unmerge` gives a hard partition;
  size   Σ of the sizes of the slots assigned there (`Tokens.reassign`'s rule), so Σ size is conserved
         exactly and size agrees with index. A new token that is nobody's dominant slot has size 0 but stays
         valid (mask true): it attends and is attended as in the papers.
The protected prefix stays first and unchanged; grid becomes None.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcomp.ops.transform import dominant_slot
from tokcomp.tokens import Tokens


def slot_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
  """Softmax over the slot axis (1) of logits [B, N, M], in fp32; invalid slots (valid [B, N] false) get 0."""
  logits = jnp.where(valid[..., None], logits.astype(jnp.float32), -jnp.inf)
  peak = jnp.max(logits, axis=1, keepdims=True)
  e = jnp.where(valid[..., None], jnp.exp(logits - jnp.where(jnp.isfinite(peak), peak, 0.0)), 0.0)
  total = jnp.sum(e, axis=1, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def aggregate_reducible(tokens: Tokens, logits: jax.Array) -> tuple[Tokens, jax.Array]:
  """Replaces the reducible slots by M = logits.shape[-1] new tokens x'_m = Σ_n A[n, m] x_n.

  logits [B, N - P, M] for the reducible slots (P = num_protected). Returns the new state and A [B, N - P, M].
  """
  p, b = tokens.num_protected, tokens.batch
  if logits.ndim != 3 or logits.shape[:2] != (b, tokens.num_reducible):
    raise ValueError(f"aggregate_reducible: logits shape {logits.shape} must be [B, N - P, M] = "
                     f"[{b}, {tokens.num_reducible}, M]")
  weights = slot_softmax(logits, tokens.mask[:, p:])  # [B, N - P, M], columns sum to 1 over the valid slots
  return pool_reducible(tokens, weights), weights


def pool_reducible(tokens: Tokens, weights: jax.Array) -> Tokens:
  """Replaces the reducible slots by M new tokens x'_m = Σ_n W[n, m] x_n for given weights W [B, N - P, M]
  (zero on invalid slots; not necessarily normalised: TokenLearner v1's sigmoid maps), with the same index/size
  bookkeeping (the argmax over m of W[n, m]) as `aggregate_reducible`."""
  p, b = tokens.num_protected, tokens.batch
  if weights.ndim != 3 or weights.shape[:2] != (b, tokens.num_reducible):
    raise ValueError(f"pool_reducible: weights shape {weights.shape} must be [B, N - P, M] = "
                     f"[{b}, {tokens.num_reducible}, M]")
  m = weights.shape[-1]
  valid = tokens.mask[:, p:]
  new = jnp.einsum("bnm,bnd->bmd", weights.astype(tokens.x.dtype), tokens.x[:, p:],
                   precision=jax.lax.Precision.HIGHEST)
  prefix_dest = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  dest = jnp.concatenate([prefix_dest, jnp.where(valid, p + dominant_slot(weights, valid), -1)], axis=1)
  out = tokens.reassign(dest, p + m).replace(
      x=jnp.concatenate([tokens.x[:, :p], new], axis=1),
      mask=jnp.concatenate([tokens.mask[:, :p], jnp.ones((b, m), bool)], axis=1))
  return out


def aggregate_flops(n_in: int, n_out: int, width: int) -> float:
  """FLOPs of the weighted sums (2 per multiply-add): n_out tokens, each over n_in inputs of width D."""
  return 2.0 * n_in * n_out * width

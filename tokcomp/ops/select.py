"""Selection: keep-k by score with a static k, and the scores that rank tokens."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcomp.tokens import Tokens, batched_scatter


def topk_reducible(tokens: Tokens, score: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Indices [B, K] of the k best reducible slots by `score` [B, N], ascending (spatial order survives).

  Protected and invalid slots are never picked. Also returns the top-k scores' complement mask [B, N]:
  true on the reducible valid slots that were not picked (the "dropped" set).
  """
  p = tokens.num_protected
  if not 0 <= k <= tokens.num_reducible:
    raise ValueError(f"keep count k={k}: must be in [0, {tokens.num_reducible}] (N={tokens.n}, protected={p})")
  s = jnp.where(tokens.mask[:, p:], score[:, p:].astype(jnp.float32), -jnp.inf)
  idx = jnp.argsort(s, axis=1, descending=True, stable=True)[:, :k]  # = lax.top_k, which does not shard
  idx = jnp.sort(idx, axis=1) + p
  picked = batched_scatter(jnp.zeros(tokens.mask.shape, bool), idx, True)
  dropped = tokens.mask & ~picked & ~tokens.protected_mask()
  return idx, dropped


def keep_with_prefix(tokens: Tokens, idx: jax.Array) -> jax.Array:
  """Prepends the protected prefix slots 0..P-1 to the picked slots `idx` [B, K] -> [B, P + K]."""
  prefix = jnp.broadcast_to(jnp.arange(tokens.num_protected, dtype=idx.dtype), (tokens.batch, tokens.num_protected))
  return jnp.concatenate([prefix, idx], axis=1)


def cls_attention_score(cls_attn: jax.Array) -> jax.Array:
  """EViT's attentiveness (Liang et al., ICLR 2022, eq. 3): the CLS attention row averaged over heads, [B, N]."""
  return jnp.mean(cls_attn, axis=1)


def rank_reducible(tokens: Tokens, score: jax.Array) -> jax.Array:
  """[B, N - P]: every reducible slot, ordered by `score` [B, N] best first (stable on ties); invalid slots
  come last. For methods that keep the head of the ranking in rank order (GTP-ViT)."""
  p = tokens.num_protected
  s = jnp.where(tokens.mask[:, p:], score[:, p:].astype(jnp.float32), -jnp.inf)
  return jnp.argsort(s, axis=1, descending=True, stable=True) + p


def hard_gumbel_softmax(logits: jax.Array, rng: jax.Array, tau: float = 1.0) -> jax.Array:
  """Straight-through hard gumbel-softmax over the last axis (Jang et al., ICLR 2017; torch's
  `F.gumbel_softmax(hard=True)`): forward one_hot(argmax(l + g)), gradient of softmax((l + g) / tau).

  The noise g ~ Gumbel(0, 1) comes from `gumbel_noise`, one place to swap it for a fixed draw in parity tests.
  """
  y = jax.nn.softmax((logits.astype(jnp.float32) + gumbel_noise(rng, logits.shape)) / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(y, axis=-1), logits.shape[-1], dtype=y.dtype)
  return hard - jax.lax.stop_gradient(y) + y


def gumbel_noise(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return jax.random.gumbel(rng, shape, jnp.float32)

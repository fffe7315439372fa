"""The plain pre-LN transformer the 1D tokenizers are built from (TiTok, One-D-Piece, FlexTok).

  x += Attn(LN x);  x += MLP(LN x)          MLP = Dense -> exact GELU -> Dense

It is the ViT block of `tokcomp.models.vit` without the reducer slots, plus what the tokenizers need: the
LayerNorm epsilon as a field (TiTok and One-D-Piece use torch's default 1e-5, timm/big_vision ViTs 1e-6) and a
pair mask over (query, key) for FlexTok's causal register attention. Submodule names are the ViT's
(`encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0/Dense_{0,1}}`), so one
converter layout serves both.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp.attention import Attention, Implementation
from tokcomp.models.vit import MlpBlock


class Block(nn.Module):
  """One pre-LN block: x [B, N, D] -> [B, N, D]. mask [B, N] (valid keys), pair_mask [B|1, N, N]."""
  num_heads: int
  mlp_dim: int
  ln_eps: float = 1e-6
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, pair_mask: jax.Array | None = None) -> jax.Array:
    if mask is None:
      mask = jnp.ones(x.shape[:2], bool)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_0")(x)
    y, _ = Attention(self.num_heads, implementation=self.attn_impl, dtype=self.dtype,
                     name="MultiHeadDotProductAttention_0")(y, mask, pair_mask=pair_mask)
    x = x + y
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_1")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)


class Transformer(nn.Module):
  """`depth` Blocks named encoderblock_{i}; no final norm (the tokenizers place their own ln_pre/ln_post)."""
  depth: int
  num_heads: int
  mlp_dim: int
  ln_eps: float = 1e-6
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    for field, value in (("depth", self.depth), ("num_heads", self.num_heads), ("mlp_dim", self.mlp_dim)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Transformer.{field}={value!r}: must be an int >= 1")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, pair_mask: jax.Array | None = None) -> jax.Array:
    if x.shape[-1] % self.num_heads:
      raise ValueError(f"Transformer.num_heads={self.num_heads} must divide the width {x.shape[-1]}")
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, ln_eps=self.ln_eps, attn_impl=self.attn_impl, dtype=self.dtype,
                name=f"encoderblock_{i}")(x, mask, pair_mask)
    return x


def prefix_mask(length: jax.Array | int | None, num_tokens: int, batch: int) -> jax.Array:
  """[B, K] bool, True for the first `length` of K tokens. `length`: None (all), an int, or an int array [] or
  [B]. A Python int is range-checked (1..K); a traced length cannot be, so it is clipped to 1..K."""
  if length is None:
    return jnp.ones((batch, num_tokens), bool)
  if isinstance(length, int):
    if not 1 <= length <= num_tokens:
      raise ValueError(f"length={length}: must be in 1..{num_tokens} (the number of latent tokens)")
  length = jnp.asarray(length)
  if length.ndim > 1 or (length.ndim == 1 and length.shape[0] != batch):
    raise ValueError(f"length shape {length.shape}: must be a scalar or [{batch}] (one per example)")
  length = jnp.clip(length, 1, num_tokens)
  return jnp.arange(num_tokens)[None, :] < jnp.broadcast_to(length, (batch,))[:, None]

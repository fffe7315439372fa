"""Quantizers for the 1D tokenizers: vector quantization (VQ) and finite scalar quantization (FSQ).

Both map latents z [..., token_size] to (z_q, aux): z_q is the straight-through value z + sg(q - z) in fp32 (the
forward value is the code, the gradient flows to z as if identity), aux holds
  ids             int32 [...]  the code index of each token
  loss            scalar       the quantizer's own training loss, already weighted (FSQ: 0)
  commitment_loss, codebook_loss  its parts
  perplexity      scalar       exp(entropy of the code histogram over the valid tokens of the batch)
  usage           scalar       fraction of the codebook used by the valid tokens of the batch
An optional `mask` [...] (True = a kept token) limits every loss and metric to the kept tokens, so a prefix of
a 1D token sequence trains and reports as if the tail were not there.

Numerics: distances, lookups and losses are computed in fp32 at HIGHEST matmul precision whatever the model's
compute dtype (a bf16 or TF32 distance can pick a different code), as the references do (`autocast(enabled=False)`).

VQ (van den Oord et al., "Neural Discrete Representation Learning", NeurIPS 2017, arXiv:1711.00937, eq. 3):
  k = argmin_j ||z - e_j||² (computed as |z|² + |e_j|² - 2 z·e_j),  q = e_k,
  loss = β ||sg(q) - z||² + ||q - sg(z)||²  (means over tokens and channels; β = commitment_cost).
With `use_l2_norm` both z and the codebook rows are l2-normalised first (cosine codebook; Yu et al., "Vector-
quantized Image Modeling with Improved VQGAN", ICLR 2022, §3.2), and the loss is taken on the normalised z.
This is bytedance/1d-tokenizer's `VectorQuantizer` (@942a96f) without its clustering-VQ option; its codebook init
U(-1/n, 1/n) is ours too. Parity: tests/test_titok.py (through TiTok's golden).

FSQ (Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple", ICLR 2024, arXiv:2309.15505, §3 and
App. A.1): per channel i with L_i levels,
  bound(z) = tanh(z + atanh(o_i / h_i)) h_i - o_i,   h_i = (L_i - 1)(1 + ε)/2,  o_i = 0.5 if L_i even else 0,
  q = round_ste(bound(z)) / ⌊L_i / 2⌋,   id = Σ_i (q_i ⌊L_i/2⌋ + ⌊L_i/2⌋) Π_{j<i} L_j.
ε = 1e-3 with (1 + ε) as FlexTok's FSQ (apple/ml-flextok @87d00cc, `regularizers/quantize_fsq.py`); the paper's
listing has (1 - ε). Either gives exactly L_i integer levels. The implicit codebook has Π L_i entries
(FlexTok's [8, 8, 8, 5, 5, 5] = 64000).
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _valid(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  if mask.shape != shape:
    raise ValueError(f"quantizer mask shape {mask.shape}: must be the token shape {shape}")
  return mask.astype(jnp.float32)


def masked_mean_sq(a: jax.Array, b: jax.Array, valid: jax.Array) -> jax.Array:
  """mean over the valid tokens and all channels of (a - b)²; 0 when no token is valid."""
  sq = jnp.sum(jnp.square(a - b), axis=-1)
  return jnp.sum(sq * valid) / (jnp.maximum(jnp.sum(valid), 1.0) * a.shape[-1])


def code_statistics(ids: jax.Array, valid: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """Perplexity and usage of the code histogram over the valid tokens (a bincount, not a one-hot: FSQ's
  codebook can have 64000 entries)."""
  counts = jnp.bincount(ids.reshape(-1), weights=valid.reshape(-1), length=codebook_size)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "usage": jnp.mean((counts > 0).astype(jnp.float32))}


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch's F.normalize)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class VectorQuantizer(nn.Module):
  """VQ with an optional cosine (l2-normalised) codebook. z [..., token_size] -> (z_q, aux)."""
  codebook_size: int
  token_size: int
  commitment_cost: float = 0.25
  use_l2_norm: bool = False

  def __post_init__(self):
    if not isinstance(self.codebook_size, int) or self.codebook_size < 2:
      raise ValueError(f"VectorQuantizer.codebook_size={self.codebook_size!r}: must be an int >= 2")
    if not isinstance(self.token_size, int) or self.token_size < 1:
      raise ValueError(f"VectorQuantizer.token_size={self.token_size!r}: must be an int >= 1")
    if not self.commitment_cost >= 0:
      raise ValueError(f"VectorQuantizer.commitment_cost={self.commitment_cost!r}: must be >= 0")
    super().__post_init__()

  def setup(self):
    n = self.codebook_size
    self.codebook = self.param("codebook", _uniform(-1.0 / n, 1.0 / n), (n, self.token_size), jnp.float32)

  def codes(self) -> jax.Array:
    """The codebook as it is compared and looked up (normalised rows with `use_l2_norm`), fp32."""
    e = self.codebook.astype(jnp.float32)
    return l2_normalize(e) if self.use_l2_norm else e

  def lookup(self, ids: jax.Array) -> jax.Array:
    """ids [...] -> codes [..., token_size] (fp32)."""
    return jnp.take(self.codes(), ids, axis=0)

  def __call__(self, z: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    if z.shape[-1] != self.token_size:
      raise ValueError(f"VectorQuantizer: latents have {z.shape[-1]} channels, token_size={self.token_size}")
    valid = _valid(mask, z.shape[:-1])
    z = z.astype(jnp.float32)
    if self.use_l2_norm:
      z = l2_normalize(z)
    e = self.codes()
    dist = (jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(e * e, axis=-1)
            - 2.0 * jnp.einsum("...d,nd->...n", z, e, precision=HIGHEST))
    ids = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    q = jnp.take(e, ids, axis=0)
    commitment = self.commitment_cost * masked_mean_sq(jax.lax.stop_gradient(q), z, valid)
    codebook = masked_mean_sq(q, jax.lax.stop_gradient(z), valid)
    z_q = z + jax.lax.stop_gradient(q - z)
    aux = {"ids": ids, "loss": commitment + codebook, "commitment_loss": commitment, "codebook_loss": codebook,
           **code_statistics(ids, valid, self.codebook_size)}
    return z_q, aux


def _uniform(low: float, high: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, high)
  return init


def round_ste(x: jax.Array) -> jax.Array:
  """round(x) forward, identity backward."""
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


class FSQ(nn.Module):
  """Finite scalar quantization with `levels` per channel. z [..., len(levels)] -> (z_q in [-1, 1], aux)."""
  levels: Sequence[int] = (8, 8, 8, 5, 5, 5)
  eps: float = 1e-3

  def __post_init__(self):
    if not self.levels or any(not isinstance(l, int) or l < 2 for l in self.levels):
      raise ValueError(f"FSQ.levels={self.levels!r}: must be a non-empty sequence of ints >= 2, e.g. (8, 8, 8, 5, 5, 5)")
    if not 0 <= self.eps < 1:
      raise ValueError(f"FSQ.eps={self.eps!r}: must be in [0, 1)")
    super().__post_init__()

  @property
  def token_size(self) -> int:
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def _consts(self):
    levels = jnp.asarray(self.levels, jnp.float32)
    half_width = jnp.asarray([l // 2 for l in self.levels], jnp.float32)
    basis = jnp.asarray([math.prod(self.levels[:i]) for i in range(len(self.levels))], jnp.int32)
    return levels, half_width, basis

  def bound(self, z: jax.Array) -> jax.Array:
    levels, _, _ = self._consts()
    half_l = (levels - 1) * (1 + self.eps) / 2
    offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
    shift = jnp.arctanh(offset / half_l)
    return jnp.tanh(z + shift) * half_l - offset

  def lookup(self, ids: jax.Array) -> jax.Array:
    """ids [...] -> codes [..., len(levels)] in [-1, 1] (fp32)."""
    levels, half_width, basis = self._consts()
    digits = (ids[..., None] // basis) % levels.astype(jnp.int32)
    return (digits.astype(jnp.float32) - half_width) / half_width

  def __call__(self, z: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    if z.shape[-1] != self.token_size:
      raise ValueError(f"FSQ: latents have {z.shape[-1]} channels, must be len(levels)={self.token_size}")
    valid = _valid(mask, z.shape[:-1])
    _, half_width, basis = self._consts()
    z_q = round_ste(self.bound(z.astype(jnp.float32))) / half_width
    ids = jnp.sum(jnp.round(z_q * half_width + half_width).astype(jnp.int32) * basis, axis=-1)
    zero = jnp.zeros((), jnp.float32)
    aux = {"ids": ids, "loss": zero, "commitment_loss": zero, "codebook_loss": zero,
           **code_statistics(ids, valid, self.codebook_size)}
    return z_q, aux

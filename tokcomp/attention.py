"""Multi-head self-attention with a key mask and an additive bias, plus the cheap side signals reducers read.

The main product goes through `jax.nn.dot_product_attention` (XLA by default, cuDNN on GPU when asked), so the
N x N score matrix never needs to leave the fused kernel. What reducers need is computed beside it:

  cls_attn     [B, H, N]   softmax(q_0 k^T / sqrt(d) + bias) : the attention row of token 0, an O(N D) product
  keys_mean    [B, N, d]   keys averaged over heads (ToMe's matching metric, Bolya et al. 2023 §3)
  value_norm   [B, H, N]   ||v_n|| per head (ATS significance, Fayyaz et al. 2022 eq. 4)
  attn         [B, H, N, N] the full attention probabilities (fp32). An O(N^2) side product outside the fused
                            kernel: only for methods that need whole columns (MCTF, GTP-ViT); avoid when a row
                            or a mean will do. With `Attention.sparsity` < 1 (GTP-ViT) it is the sparsified
                            attention that was applied (so is cls_attn).
  encoder_input Tokens      the token state entering the encoder (patch + position embeddings, one slot per
                            original token, grid set). Not computed here: the encoder hands it to a block's
                            reducer that asks for it (GTP-ViT builds its semantic graph on these embeddings).

Parameter names follow big_vision / flax `MultiHeadDotProductAttention` (query/key/value/out, DenseGeneral
layout [D, H, d] and [H, d, D]), so big_vision checkpoints map one to one.
"""
from __future__ import annotations

import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from tokcomp.tokens import Tokens

SIGNALS = ("cls_attn", "keys_mean", "value_norm", "attn")
Implementation = Literal["xla", "cudnn"] | None


@struct.dataclass
class Signals:
  """What a block hands to its reducer. Fields a reducer did not ask for are None."""
  cls_attn: jax.Array | None = None
  keys_mean: jax.Array | None = None
  value_norm: jax.Array | None = None
  attn: jax.Array | None = None
  encoder_input: Tokens | None = None  # filled by the encoder (models/vit.py), never by Attention


def masked_softmax(logits: jax.Array, mask: jax.Array | None, axis: int = -1) -> jax.Array:
  """Softmax in fp32 over `axis`; masked entries get 0, and a fully masked row gives all zeros (not NaN)."""
  logits = logits.astype(jnp.float32)
  if mask is None:
    return jax.nn.softmax(logits, axis=axis)
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=axis, keepdims=True)
  e = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  return e / jnp.maximum(jnp.sum(e, axis=axis, keepdims=True), jnp.finfo(jnp.float32).tiny)


def softmax_with_policy(logits: jax.Array, policy: jax.Array, eps: float = 1e-6) -> jax.Array:
  """DynamicViT's attention under a keep policy (Rao et al., NeurIPS 2021, arXiv:2106.02034, eq. 11), in fp32.

    A_ij = (exp(l_ij - max_j l_ij) G_ij + eps/N) / (sum_j exp(l_ij - max_j l_ij) G_ij + eps),
    G_ij = policy_j for j != i and 1 for j = i (a token always sees itself, so no row is empty).

  logits [B, H, N, N]; policy [B, N] in [0, 1] (hard gumbel decisions carry their straight-through gradient
  here). eps = 1e-6 as in the reference (`Attention.softmax_with_policy`).
  """
  n = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  p = policy.astype(jnp.float32)[:, None, None, :]
  eye = jnp.eye(n, dtype=jnp.float32)
  g = p + (1.0 - p) * eye
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * g
  return (e + eps / n) / (jnp.sum(e, axis=-1, keepdims=True) + eps)


def sparsify_probs(probs: jax.Array, mask: jax.Array, sparsity: float) -> jax.Array:
  """GTP-ViT's attention sparsification with sparsity θ (Xu et al., WACV 2024, arXiv:2311.03035; reference
  Ackesnal/GTP-ViT `models_v3.Attention.forward`), in fp32, without renormalising:

    A_ij <- 0 where A_ij < t,   t = the k-th smallest of the n x n probabilities of one (example, head),
    k = int(n * n * (1 - sparsity))  (1-based, Python float arithmetic as the reference's),

  so (without ties) the k - 1 smallest entries become 0; k = 0 (sparsity close to 1) zeroes nothing (the
  reference's kthvalue(k=0) raises instead). n is the number of valid tokens of the example (`mask` [B, N]);
  only valid-query x valid-key entries count toward the k-th value (without masking: the current N).
  probs [B, H, N, N].
  """
  if isinstance(sparsity, bool) or not 0 < sparsity <= 1:
    raise ValueError(f"attention sparsity={sparsity!r}: must be in (0, 1]")
  b, h, n, _ = probs.shape
  probs = probs.astype(jnp.float32)
  k_of_count = jnp.asarray([int(m * m * (1 - sparsity)) for m in range(n + 1)], jnp.int32)  # static table
  k = k_of_count[jnp.sum(mask, axis=-1)]                                           # [B]
  pair = mask[:, None, :, None] & mask[:, None, None, :]                             # [B, 1, N, N]
  ranked = jnp.sort(jnp.where(pair, probs, jnp.inf).reshape(b, h, n * n), axis=-1)
  kth = jnp.take_along_axis(ranked, jnp.broadcast_to(jnp.maximum(k - 1, 0)[:, None, None], (b, h, 1)), axis=-1)
  threshold = jnp.where(k[:, None, None] > 0, kth, -jnp.inf)[..., None]            # [B, H, 1, 1]
  return jnp.where(probs < threshold, 0.0, probs)


class Attention(nn.Module):
  """Pre-projected multi-head self-attention: x [B, N, D] -> ([B, N, D], Signals)."""
  num_heads: int
  implementation: Implementation = None
  dtype: jnp.dtype = jnp.float32
  qkv_bias: bool = True
  # GTP-ViT's attention sparsification (`sparsify_probs`): None or 1 keeps the fused dense path; < 1 computes
  # the probabilities explicitly (an N x N fp32 product), zeroes the small ones, and hands those out as signals.
  sparsity: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, bias: jax.Array | None = None,
               signals: tuple[str, ...] = (), probs: jax.Array | None = None,
               policy: jax.Array | None = None, pair_mask: jax.Array | None = None) -> tuple[jax.Array, Signals]:
    """probs: attention probabilities [B, H, N, N] to apply to the values instead of softmax(QKᵀ/√d + bias)
    (MCTF's fused one-step-ahead attention); the signals still come from Q and K.
    policy: a training keep policy [B, N] (Tokens.policy): the attention becomes `softmax_with_policy` over the
    explicit scores (an O(N^2) product, training only), with invalid keys folded into the policy; the
    cls_attn signal is then that attention's CLS row (DiffRate's search ranks by it).
    pair_mask: [B or 1, N, N] bool, query i may attend key j (a causal mask, FlexTok's register masks); AND-ed
    with the key mask. Not with `probs`/`policy`."""
    b, n, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"Attention.num_heads={self.num_heads} must divide the width {width}")
    head_dim = width // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), use_bias=self.qkv_bias,
                                         dtype=self.dtype, name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # [B, N, H, d]

    key_mask = mask[:, None, None, :]  # [B, 1, 1, N]
    bias4 = None if bias is None else bias[:, None, None, :].astype(q.dtype)  # [B, 1, 1, N]
    if pair_mask is not None:
      if pair_mask.ndim != 3 or pair_mask.shape[1:] != (n, n) or pair_mask.shape[0] not in (1, b):
        raise ValueError(f"Attention pair_mask shape {pair_mask.shape}: must be [B or 1, {n}, {n}]")
      if probs is not None or policy is not None:
        raise ValueError("Attention pair_mask cannot be combined with probs= or policy=")
      key_mask = key_mask & pair_mask[:, None].astype(bool)  # [B, 1, N, N]
    # An all-masked row must stay finite: give such rows one visible key (their own first slot).
    any_valid = jnp.any(key_mask, axis=-1, keepdims=True)
    key_mask = key_mask | (~any_valid & (jnp.arange(n) == 0))
    sparse = self.sparsity is not None and self.sparsity != 1
    if sparse and (probs is not None or policy is not None or pair_mask is not None):
      raise ValueError(f"Attention sparsity={self.sparsity!r} cannot be combined with probs=, policy= or pair_mask=")
    if (policy is not None or sparse) and probs is None:
      logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(head_dim)
      if bias is not None:
        logits = logits + bias[:, None, None, :]
      if sparse:
        probs = sparsify_probs(masked_softmax(logits, key_mask), mask, self.sparsity)
      else:
        probs = softmax_with_policy(logits, policy * mask)
    if probs is None:
      y = jax.nn.dot_product_attention(q, k, v, bias=bias4, mask=key_mask, implementation=self.implementation)
    else:
      y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(jnp.float32), v.astype(jnp.float32)).astype(v.dtype)
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(y)  # [B, N, D]

    out = {}
    if "cls_attn" in signals and (policy is not None or sparse):  # the row applied (keep policy, sparsified)
      out["cls_attn"] = probs[:, :, 0].astype(jnp.float32)
    elif "cls_attn" in signals:
      scale = 1.0 / math.sqrt(head_dim)
      logits = jnp.einsum("bhd,bnhd->bhn", q[:, 0].astype(jnp.float32), k.astype(jnp.float32)) * scale
      if bias is not None:
        logits = logits + bias[:, None, :]
      out["cls_attn"] = masked_softmax(logits, mask[:, None, :])  # [B, H, N]
    if "keys_mean" in signals:
      out["keys_mean"] = jnp.mean(k.astype(jnp.float32), axis=2)  # [B, N, d]
    if "value_norm" in signals:
      out["value_norm"] = jnp.linalg.norm(v.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, N]
    if "attn" in signals and sparse:  # the sparsified probabilities that were applied
      out["attn"] = probs
    elif "attn" in signals:
      scale = 1.0 / math.sqrt(head_dim)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
      if bias is not None:
        logits = logits + bias[:, None, None, :]
      out["attn"] = masked_softmax(logits, key_mask)  # [B, H, N, N]
    unknown = set(signals) - set(SIGNALS)
    if unknown:
      raise ValueError(f"Attention signals={sorted(unknown)} unknown; valid: {SIGNALS}")
    return y, Signals(**out)

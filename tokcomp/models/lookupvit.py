"""LookupViT (Koner, Jain, Jain, Tresp and Paul, ECCV 2024, arXiv:2407.12753, §3): a few compressed tokens take
the heavy processing, the full-resolution "lookup" tokens go through light layers, and a bidirectional
cross-attention links the two.

Tokens (§3.1). The image is patchified at full resolution into N = h·w lookup tokens F_l (patch embedding plus
position embedding, exactly vit.ViT's). The M = h'·w' compressed tokens F_p are the lookup grid pooled to h' x w'
(2D adaptive average pooling, torch's bins: `tokcomp.ops.cluster.adaptive_pool_matrix`); with a class token,
CLS (+ its position embedding) is prepended to the compressed stream only, so that stream holds M' = 1 + M tokens.
Pooling has no parameters and the position embeddings live on the lookup grid, so h' x w' can change at
inference with the same parameters ("selectable at inference").

Block (§3.2), with A the per-head cross-attention logits between the compressed and the lookup tokens:
  A       = (W_q LN(F_p)) (W_k LN(F_l))ᵀ / √d                                    [B, H, M', N]
  F_p    += W_o^g · softmax_N(A) · W_v LN(F_l)             information gathering (MHBC l→p)
  F_p    += MHSA(LN F_p);   F_p += MLP(LN F_p)             the heavy ViT block, MLP width `mlp_dim`
  F_l    += W_o^s · Pᵀ · W_v^s LN'(F_p)                     information propagation (MHBC p→l), reusing A:
            P = softmax_N(A) transposed ("transpose", the default: the gathering map itself) or
            P = softmax_{M'}(A) ("softmax": the same logits, normalised over the compressed tokens)
  F_l    += MLP_l(LN F_l)                                   the light MLP, width round(lookup_mlp_ratio·mlp_dim)
Every LN is pre-norm (eps 1e-6, as vit.ViT); GELU is exact. The compressed stream's MHSA and MLP use vit.ViT's
parameter names (`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
MlpBlock_0}`, `Transformer/encoder_norm`, `embedding`, `cls`, `pos_embedding`, `head`), so a trained vit.ViT
checkpoint initialises them through `checkpoints.common.overlay` (train.py's `init_from`); the cross-attentions
(`gather_*`, `propagate_*`) and the lookup MLP (`lookup_mlp*`) start fresh.

Output. pool="token": the final-normed CLS of the compressed stream, as vit.ViT. pool="gap": the mean of the
final-normed compressed patch tokens plus the mean of the final-normed lookup tokens (`Transformer/lookup_norm`),
as lucidrains' LookViT does. `aux["tokens"]` is the final compressed `Tokens` state: CLS first, then the h' x w'
compressed tokens in raster order; `index` maps each original patch to the compressed cell whose pooling bin
gives it the largest weight (argmax of the pooling matrix, the first on ties: bins overlap when h' does not
divide h), `size` counts the patches mapped to each cell, mask all true (grid = h' x w'). These compressed tokens
are new learned tokens, so `index` is a pooling-layout map, not a merge history. `aux["lookup"]` holds the final
lookup tokens [B, N, D] (before `lookup_norm`).

Multi-resolution training (§3.3). `train_compressed`: a tuple of grids; with train=True one of them is drawn
uniformly per step from the "gumbel" rng stream (the only stream train.py provides) and the step runs that
grid through `flax.linen.switch`: every grid is compiled once into the same program, each step runs one. The
branches return the compressed stream padded to the largest grid, with mask false on the padding. Empty: train
at `compressed`. Inference (train=False) always runs `compressed`.

Count rule: `plan(image_hw)` returns (steps, counts): steps is `depth` Nones (no reducer), counts the compressed
stream's `LayerCounts(n_attn=M', n_mlp=M')` per block (the lookup stream keeps N tokens in every block).

FLOPs (`flops`, per image, 2 per multiply-add; width D, MLP width F, lookup MLP width F_l, C input channels,
patch p_h x p_w, K classes):
  embedding N·C·p_h·p_w·D + pooling M·N·D
  per block   M'·(7·D² + 2·D·F) + N·(3·D² + 2·D·F_l) + 3·N·M'·D + 2·M'²·D
              [gathering q, out: 2M'D², k, v: 2ND², logits and values 2NM'D; MHSA 4M'D² + 2M'²D; MLP 2M'DF;
               propagation value M'D², out ND², values NM'D (logits reused); lookup MLP 2NDF_l]
  head D·K.  LayerNorms, softmax, GELU and the residual adds are left out, as `schedules.vit_flops`.

Parity: no official code is public (Google DeepMind). tests/test_lookupvit.py checks a block against a
loop-based NumPy reference of the equations above on the module's own parameters (1e-5). The paper's body text
could not be retrieved in this environment (only its abstract), so the block is written from the abstract, the
issue's description and lucidrains/vit-pytorch `vit_pytorch/look_vit.py` @ 4b2c00c (read, not copied).
Where we differ from that implementation: (1) compressed tokens are pooled (adaptive average) from the lookup
grid, it resizes bilinearly; (2) no extra norm on the lookup residual stream after propagation (it replaces the
stream by its LayerNorm there); (3) qkv and out biases as vit.ViT (it has none); (4) a CLS token in the compressed
stream and pool="token" by default, so a vit.ViT checkpoint can initialise the model (pool="gap" is its pooling);
(5) learned position embeddings as vit.ViT (it uses fixed sin-cos) and a plain patch embedding (it uses a 7x7
conv over the patches); (6) the lookup MLP width is a ratio of `mlp_dim` (it is a factor of the width there).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokcomp import schedules
from tokcomp.attention import Attention, Implementation
from tokcomp.models.vit import MlpBlock, patch_grid
from tokcomp.ops.cluster import adaptive_pool_matrix
from tokcomp.tokens import Tokens

PROPAGATION = ("transpose", "softmax")


def _grid(value, field: str) -> tuple[int, int]:
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in value)):
    raise ValueError(f"LookupViT.{field}={value!r}: must be a grid (h', w') of two ints >= 1, e.g. (4, 4)")
  return int(value[0]), int(value[1])


def pooling_layout(patch_grid: tuple[int, int], compressed: tuple[int, int], num_prefix: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Static tables for a compressed grid: the [M, N] pooling matrix, the [N0] slot of every original token
  (prefix tokens keep their slot; patch n -> num_prefix + argmax_m pool[m, n]) and the [M'] sizes."""
  pool = adaptive_pool_matrix(patch_grid, compressed)
  index = np.concatenate([np.arange(num_prefix), num_prefix + np.argmax(pool, axis=0)]).astype(np.int32)
  size = np.bincount(index, minlength=num_prefix + pool.shape[0]).astype(np.float32)
  return pool, index, size


class LookupBlock(nn.Module):
  """One LookupViT block on (compressed [B, M', D], lookup [B, N, D]) -> the same shapes (see the module doc)."""
  num_heads: int
  mlp_dim: int
  lookup_mlp_dim: int
  propagation: str = "transpose"
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, compressed: jax.Array, lookup: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, m, width = compressed.shape
    heads = self.num_heads
    head_dim = width // heads
    ln = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    proj = lambda name: nn.DenseGeneral((heads, head_dim), dtype=self.dtype, name=name)  # [.., D] -> [.., H, d]
    out = lambda name: nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name=name)  # [.., H, d] -> [.., D]

    # Information gathering (MHBC l->p): the compressed tokens query the lookup tokens.
    lookup_n = ln("gather_norm_lookup")(lookup)
    q = proj("gather_query")(ln("gather_norm_compressed")(compressed))  # [B, M', H, d]
    k = proj("gather_key")(lookup_n)  # [B, N, H, d]
    v = proj("gather_value")(lookup_n)
    logits = jnp.einsum("bmhd,bnhd->bhmn", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(head_dim)
    gather = jax.nn.softmax(logits, axis=-1)  # over the lookup tokens  [B, H, M', N]
    y = jnp.einsum("bhmn,bnhd->bmhd", gather, v.astype(jnp.float32)).astype(v.dtype)
    compressed = compressed + out("gather_out")(y)

    # The heavy ViT block on the compressed tokens (vit.Encoder1DBlock's names).
    y = ln("LayerNorm_0")(compressed)
    y, _ = Attention(heads, implementation=self.attn_impl, dtype=self.dtype,
                     name="MultiHeadDotProductAttention_0")(y, jnp.ones((b, m), bool))
    compressed = compressed + y
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(ln("LayerNorm_1")(compressed))
    compressed = compressed + y

    # Information propagation (MHBC p->l): the lookup tokens read the updated compressed tokens through the
    # gathering logits (no new queries or keys).
    if self.propagation == "transpose":
      spread = gather  # the gathering map itself, read column-wise
    else:
      spread = jax.nn.softmax(logits, axis=-2)  # the same logits, normalised over the compressed tokens
    v = proj("propagate_value")(ln("propagate_norm")(compressed))  # [B, M', H, d]
    y = jnp.einsum("bhmn,bmhd->bnhd", spread, v.astype(jnp.float32)).astype(v.dtype)
    lookup = lookup + out("propagate_out")(y)

    # The light MLP on the lookup tokens.
    y = MlpBlock(self.lookup_mlp_dim, dtype=self.dtype, name="lookup_mlp")(ln("lookup_mlp_norm")(lookup))
    return compressed, lookup + y


class LookupEncoder(nn.Module):
  """The blocks plus the final norms, for one static compressed grid. Named "Transformer" as vit.Encoder."""
  depth: int
  num_heads: int
  mlp_dim: int
  lookup_mlp_dim: int
  propagation: str = "transpose"
  gap: bool = False  # also normalise the lookup tokens at the end (pool="gap")
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, lookup: jax.Array, prefix: jax.Array, *, patch_grid: tuple[int, int],
               compressed: tuple[int, int], capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """lookup [B, N, D] (embedded patches), prefix [B, P, D] -> (normed compressed stream padded with zeros to
    `capacity` slots [B, capacity, D], final lookup tokens [B, N, D], their normed form (or zeros))."""
    pool, _, _ = pooling_layout(patch_grid, compressed, prefix.shape[1])
    pooled = jnp.einsum("mn,bnd->bmd", jnp.asarray(pool, lookup.dtype), lookup)
    x = jnp.concatenate([prefix, pooled], axis=1)  # [B, M', D]
    for i in range(self.depth):
      x, lookup = LookupBlock(self.num_heads, self.mlp_dim, self.lookup_mlp_dim, self.propagation,
                              attn_impl=self.attn_impl, dtype=self.dtype, name=f"encoderblock_{i}")(x, lookup)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)
    x = jnp.pad(x, ((0, 0), (0, capacity - x.shape[1]), (0, 0)))
    lookup_normed = (nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="lookup_norm")(lookup) if self.gap
                     else jnp.zeros_like(lookup))
    return x, lookup, lookup_normed


class LookupViT(nn.Module):
  """LookupViT classifier: images [B, H, W, C] -> (logits [B, classes], aux) (see the module doc).

  compressed: the compressed grid (h', w') used at inference (and in training when train_compressed is empty);
    change it on a trained model with `model.clone(compressed=(h', w'))`, same params.
  train_compressed: grids drawn uniformly per training step (multi-resolution training); () for `compressed`.
  lookup_mlp_ratio: the lookup MLP's hidden width as a fraction of `mlp_dim` (rounded, at least 1).
  propagation: "transpose" (reuse the gathering softmax, transposed) or "softmax" (reuse the logits, softmax
    over the compressed tokens).
  reduce: must be None or "": the compression is built in; no reducer schedule applies.
  """
  num_classes: int = 1000
  patch_size: Sequence[int] = (16, 16)
  width: int = 384
  depth: int = 12
  mlp_dim: int = 1536
  num_heads: int = 6
  compressed: Sequence[int] = (7, 7)
  train_compressed: Sequence[Sequence[int]] = ()
  lookup_mlp_ratio: float = 0.25
  propagation: str = "transpose"
  class_token: bool = True
  pool: str = "token"
  reduce: Any = None
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  @property
  def num_prefix(self) -> int:
    return int(self.class_token)

  @property
  def lookup_mlp_dim(self) -> int:
    return max(1, int(round(self.lookup_mlp_ratio * self.mlp_dim)))

  def check(self):
    if self.reduce not in (None, ""):
      raise ValueError(f"LookupViT.reduce={self.reduce!r}: must be None or '' (LookupViT's compression is built "
                       "in; choose the compressed grid with LookupViT.compressed)")
    if self.pool not in ("token", "gap"):
      raise ValueError(f"LookupViT.pool={self.pool!r}: must be 'token' or 'gap'")
    if self.pool == "token" and not self.class_token:
      raise ValueError("LookupViT.pool='token' needs class_token=True")
    if self.propagation not in PROPAGATION:
      raise ValueError(f"LookupViT.propagation={self.propagation!r}: must be one of {PROPAGATION}")
    if self.width % self.num_heads:
      raise ValueError(f"LookupViT.num_heads={self.num_heads} must divide LookupViT.width={self.width}")
    r = self.lookup_mlp_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
      raise ValueError(f"LookupViT.lookup_mlp_ratio={r!r}: must be a number > 0 (fraction of mlp_dim)")

  def grid(self, image_hw: Sequence[int]) -> tuple[int, int]:
    """The lookup (patch) grid for an image size; a clear error when the size does not fit the patch."""
    return patch_grid(image_hw, self.patch_size, "LookupViT")

  def compressed_grids(self, image_hw: Sequence[int], train: bool = False) -> tuple[tuple[int, int], ...]:
    """The compressed grids a forward may run: (compressed,) at inference, train_compressed (if any) in training.
    Each must fit in the lookup grid."""
    self.check()
    gh, gw = self.grid(image_hw)
    grids = [("compressed", self.compressed)]
    if train and self.train_compressed:
      if isinstance(self.train_compressed, (str, bytes)) or not isinstance(self.train_compressed, (tuple, list)):
        raise ValueError(f"LookupViT.train_compressed={self.train_compressed!r}: must be a tuple of grids")
      grids = [(f"train_compressed[{i}]", g) for i, g in enumerate(self.train_compressed)]
    out = []
    for field, g in grids:
      h, w = _grid(g, field)
      if h > gh or w > gw:
        raise ValueError(f"LookupViT.{field}={(h, w)}: must be at most the lookup grid {gh}x{gw} (image "
                         f"{int(image_hw[0])}x{int(image_hw[1])}, patch {tuple(self.patch_size)}), from 1x1")
      out.append((h, w))
    if train and self.train_compressed:  # validate the inference grid too
      self.compressed_grids(image_hw, train=False)
    return tuple(out)

  def plan(self, image_hw: Sequence[int]) -> tuple[schedules.Schedule, tuple[schedules.LayerCounts, ...]]:
    """(steps, counts) at inference: steps = `depth` Nones (no reducer), counts = the compressed stream's
    LayerCounts(M', M') per block, M' = num_prefix + h'·w'. The lookup stream has N = h·w tokens throughout."""
    (hc, wc), = self.compressed_grids(image_hw)
    m = self.num_prefix + hc * wc
    return (None,) * self.depth, tuple(schedules.LayerCounts(n_attn=m, n_mlp=m) for _ in range(self.depth))

  def flops(self, image_hw: Sequence[int], in_channels: int = 3) -> float:
    """Analytic forward FLOPs per image at the inference grid (formula in the module docstring)."""
    gh, gw = self.grid(image_hw)
    _, counts = self.plan(image_hw)
    n, d, f, fl = gh * gw, self.width, self.mlp_dim, self.lookup_mlp_dim
    m_prime = counts[0].n_attn
    m = m_prime - self.num_prefix
    macs = n * in_channels * self.patch_size[0] * self.patch_size[1] * d + m * n * d
    block = (m_prime * (7 * d * d + 2 * d * f) + n * (3 * d * d + 2 * d * fl) + 3 * n * m_prime * d
             + 2 * m_prime * m_prime * d)
    macs += self.depth * block + d * self.num_classes
    return 2.0 * macs

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    self.check()
    if images.ndim != 4:
      raise ValueError(f"LookupViT input shape {images.shape}: must be [B, H, W, C]")
    gh, gw = self.grid(images.shape[1:3])
    grids = self.compressed_grids(images.shape[1:3], train=train)
    x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding")(images)
    b = x.shape[0]
    x = x.reshape(b, gh * gw, self.width)  # [B, N, D]

    p = self.num_prefix
    n_pos = gh * gw + p
    if self.has_variable("params", "pos_embedding") and (
        self.get_variable("params", "pos_embedding").shape[1] != n_pos):
      raise ValueError(f"pos_embedding has {self.get_variable('params', 'pos_embedding').shape[1]} positions but a "
                       f"{images.shape[1]}x{images.shape[2]} image needs {n_pos}: resample it with "
                       "tokcomp.checkpoints.resample_posemb")
    posemb = self.param("pos_embedding", nn.initializers.normal(0.02), (1, n_pos, self.width)).astype(x.dtype)
    lookup = x + posemb[:, p:]
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width)).astype(x.dtype)
      prefix = jnp.broadcast_to(cls + posemb[:, :1], (b, 1, self.width))
    else:
      prefix = jnp.zeros((b, 0, self.width), x.dtype)

    encoder = LookupEncoder(self.depth, self.num_heads, self.mlp_dim, self.lookup_mlp_dim, self.propagation,
                            gap=self.pool == "gap", attn_impl=self.attn_impl, dtype=self.dtype, name="Transformer")
    layouts = [pooling_layout((gh, gw), g, p) for g in grids]
    capacity = max(p + g[0] * g[1] for g in grids)
    branches = [functools.partial(_run_grid, patch_grid=(gh, gw), compressed=g, capacity=capacity) for g in grids]
    if len(grids) == 1:
      choice = 0
      compressed, lookup, lookup_normed = branches[0](encoder, lookup, prefix)
    else:  # multi-resolution training: one grid per step, drawn from the "gumbel" stream
      if not self.has_rng("gumbel"):
        raise ValueError("LookupViT.train_compressed with train=True draws a grid per step: pass "
                         "rngs={'gumbel': key} to apply (train.py does)")
      choice = jax.random.randint(self.make_rng("gumbel"), (), 0, len(grids))
      if self.is_initializing():
        for branch in branches:
          branch(encoder, lookup, prefix)
      compressed, lookup, lookup_normed = nn.switch(choice, branches, encoder, lookup, prefix)

    counts = np.array([p + g[0] * g[1] for g in grids])
    valid = jnp.arange(capacity)[None, :] < jnp.asarray(counts)[choice]  # [1, capacity]
    size = np.zeros((len(grids), capacity), np.float32)
    for i, (_, _, s) in enumerate(layouts):
      size[i, :s.shape[0]] = s
    index = np.stack([idx for _, idx, _ in layouts])  # [K, N0]
    tokens = Tokens(x=compressed, mask=jnp.broadcast_to(valid, (b, capacity)),
                    size=jnp.broadcast_to(jnp.asarray(size)[choice], (b, capacity)),
                    index=jnp.broadcast_to(jnp.asarray(index)[choice], (b, index.shape[1])),
                    num_protected=p, grid=grids[0] if len(grids) == 1 else None)

    if self.pool == "token":
      pre = compressed[:, 0]
    else:
      w = valid[:, p:, None].astype(compressed.dtype)
      pre = (jnp.sum(w * compressed[:, p:], axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
             + jnp.mean(lookup_normed, axis=1))
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(pre)
    aux = {"tokens": tokens, "lookup": lookup, "pre_logits": pre}
    return logits.astype(jnp.float32), aux


def _run_grid(encoder: LookupEncoder, lookup, prefix, *, patch_grid, compressed, capacity):
  return encoder(lookup, prefix, patch_grid=patch_grid, compressed=compressed, capacity=capacity)

"""TiTok: a 1D image tokenizer (Yu et al., "An Image is Worth 32 Tokens for Reconstruction and Generation",
NeurIPS 2024, arXiv:2406.07550, §3.2 and Fig. 3).

Encoder (a ViT over patches P plus K learned latent tokens L; only the latents are kept, Z = Enc(P ⊕ L)):
  x  = [cls; patch_embed(img)] + pos[:g²+1]            (conv patch embedding with bias, g = image / patch)
  x  = [x; L + pos_L]                                  (K latent tokens with their own position embedding)
  z  = conv_out(ln_post(Transformer(ln_pre(x))[-K:]))  -> [B, K, token_size]    (conv_out: a 1x1 conv = Dense)
  With `is_legacy` (the released TiTok-L32/B64/S128 weights) the [B, K, W] latents reach conv_out through the
  reference's raw reshape to [B, W, K, 1], not a transpose: channels and tokens interleave. Reproduced exactly.
Quantizer: `quantizers.VectorQuantizer` (cosine codebook with `use_l2_norm`) or `quantizers.FSQ`.
Decoder (mask tokens M for every patch position, Î = Dec(Quant(Z) ⊕ M)):
  x  = [cls; M, ..., M] + pos[:g²+1];   q = decoder_embed(z_q) + pos_L[:K]
  h  = ln_post(Transformer(ln_pre([x; q]))[1:1+g²])   -> [B, g, g, W]
  head, non-legacy: 1x1 conv -> p²·C, pixel shuffle with channel order (p1, p2, c), 3x3 conv -> [B, H, W, C].
  head, legacy: 1x1 conv W -> 2W, tanh, 1x1 conv -> 1024 logits [B, g, g, 1024] over the MaskGIT VQGAN codebook.
  With `finetune_decoder` (the released legacy models' stage 2) the logits become pixels through the MaskGIT
  VQGAN decoder: images = PixelDecoder(softmax(logits) @ E_vqgan) (maskgit_vqgan.py); without it a legacy model
  decodes to the logits (`__call__` gives recon=None and "logits", `reconstruct` refuses).
Blocks: pre-LN, MLP x4 with exact GELU, LayerNorm eps 1e-5 (torch's default), `tokenizers.transformer`.
Sizes as the reference hard-codes them: S = 512 wide / 8 layers / 8 heads, B = 768/12/12, L = 1024/24/16;
explicit width/depth/heads override them (tiny models). K is any int >= 1 (32/64/128 released).

Prefix length: `decode(z_q, length=L)` decodes from the first L latent tokens only. The sequence keeps all K
latent slots (static shape, one compile for every L); the attention key mask hides slots L..K-1 and their
inputs are zeroed, so they have no effect, and the kept slots keep their position embeddings pos_L[:L]. This is
One-D-Piece's `decode(z, length=L)` (its sequence 1 + g² + L) with the tail cut by masking. A Python int L
outside 1..K is a ValueError; a traced L is clipped to 1..K. Plain TiTok is not trained for this (its decoder
always saw K tokens), so its quality collapses as L shrinks; One-D-Piece (one_d_piece.py) trains for it.

Parity: tests/goldens/titok_nonlegacy.npz and titok_legacy.npz (tools/goldens/make_titok.py, from
bytedance/1d-tokenizer @ 942a96fbdd873780179d1b78d5462911528bf8c8, `modeling/titok.py: TiTok`): z before
quantisation, ids (exact), z_q, decode(encode(x)) and decode_tokens(ids) at 1e-5, loaded through
tokcomp.checkpoints.titok from a safetensors + config.json pair. The finetune_decoder pixel decoder:
tests/goldens/maskgit_vqgan_decoder.npz (see maskgit_vqgan.py).

Deliberate differences from the reference:
  * NHWC images and [B, K, C] tokens instead of NCHW and [B, C, 1, K].
  * The latent tokens live in the encoder (`encoder/latent_tokens`), not at the top level.
  * A prefix length is a key mask over the full K slots, not a slice (static shapes).
  * `channels` may differ from 3 (Fashion-MNIST is grey); the released weights have 3.
  * No VAE quantize mode, no clustering VQ, no `finetune_decoder` freezing (freeze with optax if wanted).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp.attention import Implementation
from tokcomp.tokenizers import maskgit_vqgan
from tokcomp.tokenizers.patches import unpatchify
from tokcomp.tokenizers.quantizers import FSQ, VectorQuantizer
from tokcomp.tokenizers.transformer import Transformer, prefix_mask

# (width, depth, heads) as `TiTokEncoder` / `TiTokDecoder` hard-code them (reference `modules/blocks.py`).
SIZES = {"S": (512, 8, 8), "B": (768, 12, 12), "L": (1024, 24, 16)}
SIZE_NAMES = {"small": "S", "base": "B", "large": "L"}
VQGAN_CODES = maskgit_vqgan.VQGAN_CODES  # the legacy head's logits: MaskGIT VQGAN's codebook size
QUANTIZERS = ("vq", "fsq")


def resolve_size(prefix: str, size: str | None, width: int | None, depth: int | None,
                 heads: int | None) -> tuple[int, int, int]:
  """(width, depth, heads) from a size name (S/B/L or small/base/large) with explicit values taking priority."""
  named = (None, None, None)
  if size is not None:
    key = SIZE_NAMES.get(size, size)
    if key not in SIZES:
      raise ValueError(f"TiTok.{prefix}_size={size!r}: must be one of {sorted(SIZES)} or {sorted(SIZE_NAMES)}, "
                       f"or None with {prefix}_width/depth/heads")
    named = SIZES[key]
  out = tuple(v if v is not None else n for v, n in zip((width, depth, heads), named))
  for field, value in zip(("width", "depth", "heads"), out):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"TiTok.{prefix}_{field}={value!r}: must be an int >= 1 (or set {prefix}_size)")
  if out[0] % out[2]:
    raise ValueError(f"TiTok.{prefix}_heads={out[2]} must divide {prefix}_width={out[0]}")
  return out


def scaled_normal(width: int):
  """The reference's init for embeddings: width^-0.5 · N(0, 1)."""
  return nn.initializers.normal(width ** -0.5)


DENSE_INIT = dict(kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros)


class TiTokEncoder(nn.Module):
  """images [B, H, W, C] -> latents z [B, K, token_size] (before quantisation)."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  num_latent_tokens: int
  token_size: int
  is_legacy: bool = False
  ln_eps: float = 1e-5
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    b, w, k, p = images.shape[0], self.width, self.num_latent_tokens, self.patch_size
    x = nn.Conv(w, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed",
                **DENSE_INIT)(images)  # [B, g, g, W]
    x = x.reshape(b, -1, w)  # [B, g², W], row-major patches as torch's flatten(2)
    cls = self.param("class_embedding", scaled_normal(w), (1, w))
    pos = self.param("positional_embedding", scaled_normal(w), (x.shape[1] + 1, w))
    latents = self.param("latent_tokens", scaled_normal(w), (k, w))
    latent_pos = self.param("latent_token_positional_embedding", scaled_normal(w), (k, w))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, w)), x], axis=1) + pos
    x = jnp.concatenate([x, jnp.broadcast_to((latents + latent_pos).astype(x.dtype), (b, k, w))], axis=1)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_pre")(x)
    x = Transformer(self.depth, self.num_heads, self.mlp_dim, ln_eps=self.ln_eps, attn_impl=self.attn_impl,
                    dtype=self.dtype, name="transformer")(x)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_post")(x[:, -k:])  # [B, K, W]
    if self.is_legacy:  # the reference's raw reshape [B, K, W] -> [B, W, K] read as channels x positions
      x = x.reshape(b, w, k).transpose(0, 2, 1)  # [B, K, W] again, with channels and tokens interleaved
    return nn.Dense(self.token_size, dtype=self.dtype, name="conv_out", **DENSE_INIT)(x)  # [B, K, token_size]


class TiTokDecoder(nn.Module):
  """z_q [B, K, token_size] and a kept mask [B, K] -> images [B, H, W, C] (legacy: logits [B, g, g, 1024])."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  grid: int
  channels: int
  is_legacy: bool = False
  ln_eps: float = 1e-5
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, kept: jax.Array) -> jax.Array:
    b, k = z.shape[:2]
    w, g, p, c = self.width, self.grid, self.patch_size, self.channels
    x = nn.Dense(w, dtype=self.dtype, name="decoder_embed", **DENSE_INIT)(z)
    x = x + self.param("latent_token_positional_embedding", scaled_normal(w), (k, w))
    x = jnp.where(kept[..., None], x, 0)  # a dropped slot carries nothing (not even a NaN) into the sequence
    cls = self.param("class_embedding", scaled_normal(w), (1, w))
    mask_token = self.param("mask_token", scaled_normal(w), (1, w))
    pos = self.param("positional_embedding", scaled_normal(w), (g * g + 1, w))
    queries = jnp.concatenate([cls, jnp.broadcast_to(mask_token, (g * g, w))], axis=0) + pos  # [1 + g², W]
    x = jnp.concatenate([jnp.broadcast_to(queries.astype(x.dtype), (b, g * g + 1, w)), x], axis=1)
    key_mask = jnp.concatenate([jnp.ones((b, g * g + 1), bool), kept], axis=1)  # [B, 1 + g² + K]
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_pre")(x)
    x = Transformer(self.depth, self.num_heads, self.mlp_dim, ln_eps=self.ln_eps, attn_impl=self.attn_impl,
                    dtype=self.dtype, name="transformer")(x, key_mask)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_post")(x[:, 1:1 + g * g])
    x = x.reshape(b, g, g, w)
    if self.is_legacy:
      x = jnp.tanh(nn.Dense(2 * w, dtype=self.dtype, name="ffn_0", **DENSE_INIT)(x))
      return nn.Dense(VQGAN_CODES, dtype=self.dtype, name="ffn_2", **DENSE_INIT)(x)  # [B, g, g, 1024]
    x = nn.Dense(p * p * c, dtype=self.dtype, name="ffn_0", **DENSE_INIT)(x)  # channels ordered (p1, p2, c)
    x = unpatchify(x.reshape(b, g * g, p * p * c), p, g * p, g * p, c)  # pixel shuffle
    return nn.Conv(c, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv_out", **DENSE_INIT)(x)


class TiTok(nn.Module):
  """TiTok with the common tokenizer interface (tokcomp/tokenizers/__init__.py)."""
  image_size: int = 32
  channels: int = 3
  patch_size: int = 8
  decoder_patch_size: int | None = None  # None: patch_size
  num_latent_tokens: int = 32
  token_size: int = 12
  quantizer: str = "vq"
  codebook_size: int = 4096
  use_l2_norm: bool = True
  commitment_cost: float = 0.25
  fsq_levels: Sequence[int] = (8, 8, 8, 5, 5, 5)  # quantizer="fsq" only; then token_size must be len(levels)
  encoder_size: str | None = "S"
  encoder_width: int | None = None
  encoder_depth: int | None = None
  encoder_heads: int | None = None
  decoder_size: str | None = "S"
  decoder_width: int | None = None
  decoder_depth: int | None = None
  decoder_heads: int | None = None
  mlp_ratio: float = 4.0
  is_legacy: bool = False
  # the released legacy models' stage 2: logits -> softmax mix of the VQGAN codebook -> MaskGIT VQGAN decoder
  finetune_decoder: bool = False
  vqgan_hidden_channels: int = 128
  vqgan_channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  vqgan_res_blocks: int = 2
  vqgan_z_channels: int = maskgit_vqgan.VQGAN_DIM
  ln_eps: float = 1e-5
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    for field in ("image_size", "channels", "patch_size", "num_latent_tokens", "token_size"):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"TiTok.{field}={value!r}: must be an int >= 1")
    for field in ("patch_size", "decoder_patch_size"):
      p = getattr(self, field)
      if p is not None and (not isinstance(p, int) or p < 1 or self.image_size % p):
        raise ValueError(f"TiTok.{field}={p!r}: must be an int >= 1 dividing image_size={self.image_size}")
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f"TiTok.quantizer={self.quantizer!r}: must be one of {QUANTIZERS}")
    if self.quantizer == "fsq" and self.token_size != len(self.fsq_levels):
      raise ValueError(f"TiTok.token_size={self.token_size}: with quantizer='fsq' must be len(fsq_levels)="
                       f"{len(self.fsq_levels)}")
    if not self.mlp_ratio > 0:
      raise ValueError(f"TiTok.mlp_ratio={self.mlp_ratio!r}: must be > 0")
    if self.finetune_decoder:
      grid = self.image_size // (self.decoder_patch_size or self.patch_size)
      up = 2 ** (len(self.vqgan_channel_mult) - 1)
      if not self.is_legacy or grid * up != self.image_size:
        raise ValueError(f"TiTok.finetune_decoder=True needs is_legacy=True (the 1024-logit head) and the VQGAN "
                         f"decoder's x{up} upsampling of the {grid}x{grid} grid to give image_size="
                         f"{self.image_size} (vqgan_channel_mult={tuple(self.vqgan_channel_mult)})")
    resolve_size("encoder", self.encoder_size, self.encoder_width, self.encoder_depth, self.encoder_heads)
    resolve_size("decoder", self.decoder_size, self.decoder_width, self.decoder_depth, self.decoder_heads)
    super().__post_init__()

  def setup(self):
    common = dict(ln_eps=self.ln_eps, attn_impl=self.attn_impl, dtype=self.dtype, is_legacy=self.is_legacy)
    w, d, h = resolve_size("encoder", self.encoder_size, self.encoder_width, self.encoder_depth, self.encoder_heads)
    self.encoder = TiTokEncoder(w, d, h, int(w * self.mlp_ratio), self.patch_size, self.num_latent_tokens,
                                self.token_size, **common)
    if self.quantizer == "vq":
      self.quantize = VectorQuantizer(self.codebook_size, self.token_size, self.commitment_cost, self.use_l2_norm)
    else:
      self.quantize = FSQ(tuple(self.fsq_levels))
    w, d, h = resolve_size("decoder", self.decoder_size, self.decoder_width, self.decoder_depth, self.decoder_heads)
    p = self.decoder_patch_size or self.patch_size
    self.decoder = TiTokDecoder(w, d, h, int(w * self.mlp_ratio), p, self.image_size // p, self.channels, **common)
    if self.finetune_decoder:  # both pretrained and frozen in the released models; loaded from the checkpoint
      self.pixel_codebook = self.param("pixel_codebook", nn.initializers.normal(1.0),
                                       (maskgit_vqgan.VQGAN_CODES, self.vqgan_z_channels))
      self.pixel_decoder = maskgit_vqgan.PixelDecoder(self.vqgan_hidden_channels, tuple(self.vqgan_channel_mult),
                                                      self.vqgan_res_blocks, self.channels, dtype=self.dtype)

  @property
  def outputs_pixels(self) -> bool:
    return not self.is_legacy or self.finetune_decoder

  def _decode(self, z_q: jax.Array, kept: jax.Array) -> jax.Array:
    out = self.decoder(z_q, kept)
    if self.finetune_decoder:
      out = self.pixel_decoder(maskgit_vqgan.mix_codes(out, self.pixel_codebook))
    return out

  # --- the common tokenizer interface -------------------------------------------------------------------------

  def encode_latents(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] in [0, 1] -> z [B, K, token_size], the encoder output before quantisation."""
    expected = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"TiTok: images {images.shape} must be [B, {self.image_size}, {self.image_size}, "
                       f"{self.channels}] (image_size, channels)")
    return self.encoder(images)

  def encode(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
    """-> (z_q [B, K, token_size] fp32, straight-through; aux: ids [B, K] and the quantizer's losses/metrics)."""
    del train  # no dropout or sampling in the encoder
    return self.quantize(self.encode_latents(images))

  def kept_mask(self, length, batch: int, train: bool) -> jax.Array:
    """[B, K] bool: the latent slots the decoder sees. TiTok: the given prefix length (None = all K)."""
    del train
    return prefix_mask(length, self.num_latent_tokens, batch)

  def decode(self, z_q: jax.Array, *, length=None, train: bool = False) -> jax.Array:
    """z_q [B, K, token_size] -> images [B, H, W, C] (legacy without finetune_decoder: VQGAN logits
    [B, g, g, 1024]), from the first `length` tokens."""
    k = self.num_latent_tokens
    if z_q.ndim != 3 or z_q.shape[1:] != (k, self.token_size):
      raise ValueError(f"TiTok.decode: z_q {z_q.shape} must be [B, {k}, {self.token_size}] "
                       f"(num_latent_tokens, token_size)")
    return self._decode(z_q.astype(jnp.float32), self.kept_mask(length, z_q.shape[0], train))

  def decode_tokens(self, ids: jax.Array, *, length=None) -> jax.Array:
    """ids [B, K] int -> decode(codebook rows)."""
    return self.decode(self.quantize.lookup(ids), length=length)

  def __call__(self, images: jax.Array, *, length=None, train: bool = False) -> dict:
    z_q, aux = self.encode(images, train=train)
    kept = self.kept_mask(length, images.shape[0], train)
    decoded = self._decode(z_q, kept)
    metrics = {name: aux[name] for name in ("perplexity", "usage", "commitment_loss", "codebook_loss")}
    metrics["kept_length"] = jnp.mean(jnp.sum(kept, axis=-1).astype(jnp.float32))
    out = {"recon": decoded, "losses": {"quantizer": aux["loss"]}, "metrics": metrics}
    if not self.outputs_pixels:  # 1024 VQGAN logits: stage-1 TiTok trains them against MaskGIT VQGAN codes
      out["recon"], out["logits"] = None, decoded
    return out

  def reconstruct(self, images: jax.Array, *, length=None) -> jax.Array:
    """Deterministic encode -> decode at `length`."""
    if not self.outputs_pixels:
      raise ValueError("TiTok.reconstruct: is_legacy=True without finetune_decoder decodes to 1024 MaskGIT VQGAN "
                       "logits, not images; use decode() for the logits, or finetune_decoder=True")
    z_q, _ = self.encode(images)
    return self.decode(z_q, length=length)

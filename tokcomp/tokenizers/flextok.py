"""FlexTok: a ViT with K register tokens, FSQ, nested dropout and a rectified-flow (or pixel) decoder.

Bachmann, Allardice, Mizrahi et al., "FlexTok: Resampling Images into 1D Token Sequences of Flexible Length",
ICML 2025, arXiv:2502.13967, §3 (architecture, nested dropout, rectified-flow decoder) and App. (training
details). Reference: apple/ml-flextok @ 87d00cc (read, never copied; its model configs live in the released
checkpoints, not the code, so the choices below that the code leaves open are marked "assumed").

Encoder. Images in [0, 1] are mapped to [-1, 1] (the reference's input range), cut into p x p patches, embedded
(Dense + learned position embedding), and concatenated with K learned registers: [patches | registers]. The
attention mask is the reference's prefix-LM mask (`generate_prefix_packed_seq_mask`, the "causal_last" packing
mode) with the patches as the prefix:
  patch i sees patch j                (patches never see the registers)
  register r sees every patch and the registers r' <= r   (causal over the registers)
so register r is a function of the image and the registers before it only. After the blocks and a LayerNorm,
the register outputs are projected to len(levels) channels and quantised by FSQ (levels default [8,8,8,5,5,5],
a 64000-entry implicit codebook; `tokcomp.tokenizers.quantizers.FSQ`, whose bound uses (1 + eps) as the
reference's `quantize_fsq.py` does: tests/test_flextok.py checks it against that file through a golden).

Nested dropout (Rippel et al. 2014; the reference's `MaskedNestedDropout`). In training a kept length k is drawn
per example from the rng stream "token_drop":
  "uniform":       k ~ U{1..K}
  "pow2":          k ~ U{1, 2, 4, ..., K}             (K must be a power of two)
  "uniform_pow2":  k ~ U{1..K}, rounded up to a power of two (capped at K)
and registers k..K-1 are REPLACED by a learned mask token (`mask_token`), never removed: the sequence keeps K
slots, so shapes are static. Decoding at a prefix length L (`length=`) is the same replacement with k = L: the
paper's inference with fewer tokens. The length is a traced int32 ([] or [B]); one compile serves every length.
A traced length cannot be range-checked, so it is clipped to 1..K (`transformer.prefix_mask`).

Flow decoder ("flow"). A transformer over [noised image patches | conditioning registers] with full attention,
adaLN-zero time conditioning with separate modulations for the patches and for the registers (the reference's
`FlexBlockAdaLN` with `adaLN_expansion=2`, `per_subseq_embs`):
  (g_msa, g_mlp, β_msa, γ_msa, β_mlp, γ_mlp) = Dense(SiLU(temb))   per token group, zero-initialised
  x += g_msa · Attn(LN(x)(1 + γ_msa) + β_msa);  x += g_mlp · MLP(LN(x)(1 + γ_mlp) + β_mlp)   (LN without affine)
temb = MLP(SiLU)(sinusoid(1000 t)), sinusoid = [cos(t f_i), sin(t f_i)], f_i = exp(-ln(256) i / (d/2)): the
reference's `TimestepEmbedder` (max_period 256) with t in [0, 1] scaled as max_timestep = 1.
The head is LN -> adaLN shift/scale -> zero-initialised Dense to pixels (the reference's `LinearHead`).
Rectified flow (the reference's `MinRFNoiseModule`, minRF convention, t = 1 is noise):
  x_t = t ε + (1 - t) x_0,   target v = ε - x_0,   loss = mean (v_θ(x_t, t, registers) - v)²,
  t ~ sigmoid(N(0, 1)) ("logit_normal", the reference's default `ln=True`) or U(0, 1) ("uniform");
  ε from the rng stream "noise". Sampling (`MinRFPipeline`): x_1 = ε, then for i = S..1, t = i / S:
  x <- x - v_θ(x, t) / S (Euler, S = `flow_steps`); the result is x_0 in [-1, 1], returned as (x_0 + 1) / 2.
`reconstruct`/`decode` draw ε from the fixed key `flow_noise_seed`, one [H, W, C] draw shared by every row, so a
row's reconstruction is a deterministic function of its own tokens, whatever the batch (up to fp32 roundoff).
Classifier-free guidance (optional): with `cond_drop_prob` > 0 training replaces every register of an example by
a learned null token with that probability (the reference's `LearnedNullCond`, drawn from "token_drop"), and
`guidance_scale` s != 1 samples with v = v_null + s (v_cond - v_null) (the reference's standard CFG; its APG
variant, `normalized_guidance`, is not implemented).

Pixel decoder ("pixel", for quick experiments; not in the paper): a learned mask token at every patch position
(+ position embedding) and the conditioning registers, the shared pre-LN `Transformer`, a LayerNorm, and a Dense
pixel head per patch; deterministic, its output is the reconstruction (train.py adds the pixel loss).

Parity: FSQ, the register attention mask, nested-dropout replacement, the time embedding, the rectified-flow
noising and the Euler sampler against the reference code (tests/goldens/flextok_reference.npz, made by
tools/goldens/make_flextok.py at apple/ml-flextok @ 87d00cc; see tools/goldens/flextok.md).

Deliberate differences from the reference (tiny, CPU/GPU-friendly, shared building blocks):
- Pixels, not VAE latents: the paper encodes SDXL-style VAE latents (2x2 patches of a 32x32x16 grid); this file
  works on image pixels directly (p x p patches), so no VAE is needed. The flow is over pixels in [-1, 1].
- Blocks: tokcomp's `Attention` (qkv and out biases, softmax scale 1/sqrt(d)) and the exact-GELU MLP, not the
  reference's SwiGLU MLP, QK-norm, bias-free projections and muP scale 8/d; learned position embeddings rather
  than the reference's sin-cos ones; no REPA loss (the paper's DINOv2 feature alignment) and no RoPE.
- The encoder blocks are the shared pre-LN `Transformer` (LN with affine, eps `ln_eps`); the reference's LNs
  have no affine parameters. The flow decoder's LNs have none (adaLN supplies shift and scale) as in the reference.
- Assumed where the released code leaves it to the config: the nested-dropout mask token lives at the decoder
  width (applied after the register projection, before the register position embedding); the decoder attends
  fully over [patches | registers]; the register position embeddings are the decoder's own parameters.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokcomp.attention import Attention
from tokcomp.models.vit import MlpBlock
from tokcomp.tokenizers.patches import patchify, unpatchify
from tokcomp.tokenizers.quantizers import FSQ
from tokcomp.tokenizers.transformer import Transformer, prefix_mask

DECODERS = ("flow", "pixel")
NESTED_DROPOUT = ("uniform", "pow2", "uniform_pow2")
FLOW_TIMESTEPS = ("logit_normal", "uniform")
TIME_MAX_PERIOD = 256.0  # the reference's TimestepEmbedder default
TIME_SCALE = 1000.0      # t in [0, 1] is embedded as 1000 t (reference: 1000 / max_timestep, max_timestep = 1)


# --- pure functions (the equations; tested against the reference and NumPy) ---------------------------------

def register_attention_mask(num_patches: int, num_registers: int) -> np.ndarray:
  """[N+K, N+K] bool, query i may attend key j, over the sequence [patches | registers]: patches see the
  patches only; register r sees all patches and registers <= r (the reference's prefix-LM mask with the patches
  as the prefix: causal(i, j) or j < N)."""
  n = num_patches + num_registers
  q, k = np.arange(n)[:, None], np.arange(n)[None, :]
  return (k < num_patches) | ((q >= num_patches) & (k <= q))


def round_up_to_power_of_two(k: jax.Array, cap: int) -> jax.Array:
  """The smallest power of two >= k (int32, k >= 1), capped at `cap`. The reference does not cap (a draw
  beyond K keeps everything, as the cap does)."""
  k = jnp.asarray(k, jnp.int32)
  powers = jnp.asarray([2 ** i for i in range(max(cap, 1).bit_length() + 1)], jnp.int32)
  up = powers[jnp.searchsorted(powers, k, side="left")]
  return jnp.minimum(up, cap)


def sample_keep_lengths(rng: jax.Array, batch: int, num_tokens: int, mode: str) -> jax.Array:
  """Nested dropout's kept length per example, int32 [B] in 1..K (see the module docstring for the modes)."""
  if mode == "uniform":
    return jax.random.randint(rng, (batch,), 1, num_tokens + 1, jnp.int32)
  if mode == "pow2":
    sizes = jnp.asarray([2 ** i for i in range(num_tokens.bit_length()) if 2 ** i <= num_tokens], jnp.int32)
    return jax.random.choice(rng, sizes, (batch,))
  if mode == "uniform_pow2":
    return round_up_to_power_of_two(jax.random.randint(rng, (batch,), 1, num_tokens + 1, jnp.int32), num_tokens)
  raise ValueError(f"FlexTok.nested_dropout={mode!r}: must be one of {NESTED_DROPOUT}")


def replace_dropped(tokens: jax.Array, keep: jax.Array, mask_token: jax.Array) -> jax.Array:
  """tokens [B, K, D] with every slot where keep [B, K] is False set to mask_token [D] (static shape)."""
  return jnp.where(keep[..., None], tokens, mask_token.astype(tokens.dtype))


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """t [B] in [0, 1] -> [B, dim]: [cos(1000 t f_i), sin(1000 t f_i)], f_i = 256^(-i / (dim/2)) (odd dim: a
  zero column appended), the reference's TimestepEmbedder.timestep_embedding with max_timestep = 1."""
  half = dim // 2
  freqs = TIME_SCALE * jnp.exp(-math.log(TIME_MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def sample_timesteps(rng: jax.Array, batch: int, mode: str) -> jax.Array:
  """Training times t [B] in (0, 1): sigmoid(N(0, 1)) ("logit_normal") or U(0, 1) ("uniform")."""
  if mode == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(rng, (batch,), jnp.float32))
  if mode == "uniform":
    return jax.random.uniform(rng, (batch,), jnp.float32)
  raise ValueError(f"FlexTok.flow_timesteps={mode!r}: must be one of {FLOW_TIMESTEPS}")


def noise_and_target(x0: jax.Array, noise: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rectified flow (minRF convention, t = 1 is noise): x_t = t ε + (1 - t) x_0 and the velocity target ε - x_0.
  t [B] broadcasts over the remaining axes."""
  tb = t.reshape(t.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return tb * noise + (1.0 - tb) * x0, noise - x0


def euler_step(x: jax.Array, velocity: jax.Array, dt: float | jax.Array) -> jax.Array:
  """One step of the sampler from t to t - dt: x - dt v."""
  return x - dt * velocity


def euler_sample(velocity, x1: jax.Array, steps: int) -> jax.Array:
  """The reference's MinRFPipeline loop: from x_1 (noise), for i = steps..1 with t = i / steps,
  x <- x - v(x, t) / steps; returns x_0. velocity(x [B, ...], t [B]) -> [B, ...]."""
  def body(j, x):
    t = jnp.full((x.shape[0],), (steps - j) / steps, jnp.float32)
    return euler_step(x, velocity(x, t), 1.0 / steps)
  return jax.lax.fori_loop(0, steps, body, x1)


# --- modules -------------------------------------------------------------------------------------------------

def _embedding_init(std: float = 0.02):
  return nn.initializers.truncated_normal(std)


class Encoder(nn.Module):
  """images [B, H, W, C] in [-1, 1] -> register latents [B, K, token_size] (before quantisation)."""
  num_latent_tokens: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  token_size: int
  ln_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    patches = patchify(images, self.patch_size)
    b, n, _ = patches.shape
    k = self.num_latent_tokens
    x = nn.Dense(self.width, dtype=self.dtype, name="patch_embed")(patches)
    x = x + self.param("pos_embed", _embedding_init(), (n, self.width), jnp.float32).astype(x.dtype)
    registers = self.param("registers", _embedding_init(), (k, self.width), jnp.float32)
    x = jnp.concatenate([x, jnp.broadcast_to(registers.astype(x.dtype), (b, k, self.width))], axis=1)
    pair = jnp.asarray(register_attention_mask(n, k))[None]
    x = Transformer(self.depth, self.num_heads, self.mlp_dim, ln_eps=self.ln_eps, dtype=self.dtype,
                    name="Transformer")(x, pair_mask=pair)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_post")(x[:, n:])
    return nn.Dense(self.token_size, dtype=self.dtype, name="to_latent")(x).astype(jnp.float32)


class RegisterConditioning(nn.Module):
  """Quantised registers z_q [B, K, C] -> decoder-width conditioning [B, K, D]: Dense, the nested-dropout mask
  token where keep [B, K] is False, the CFG null token for examples where null [B] is True, + position embedding."""
  num_latent_tokens: int
  width: int
  use_null: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_q: jax.Array, keep: jax.Array, null: jax.Array | None = None) -> jax.Array:
    x = nn.Dense(self.width, dtype=self.dtype, name="register_embed")(z_q)
    x = replace_dropped(x, keep, self.param("mask_token", _embedding_init(), (self.width,), jnp.float32))
    if self.use_null:
      null_token = self.param("null_token", _embedding_init(), (self.width,), jnp.float32)
      if null is not None:
        x = jnp.where(null[:, None, None], null_token.astype(x.dtype), x)
    pos = self.param("register_pos_embed", _embedding_init(), (self.num_latent_tokens, self.width), jnp.float32)
    return x + pos.astype(x.dtype)


class ModulatedBlock(nn.Module):
  """Pre-LN block with adaLN-zero, one modulation per token group (reference: FlexBlockAdaLN, adaLN_expansion =
  number of groups). x [B, N, D], cond [B, D], groups: a static int sequence of length N (group of each token)."""
  num_heads: int
  mlp_dim: int
  num_groups: int
  ln_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, groups: np.ndarray) -> jax.Array:
    b, n, d = x.shape
    mod = nn.Dense(self.num_groups * 6 * d, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                   name="adaLN_modulation")(nn.silu(cond))
    mod = mod.reshape(b, self.num_groups, 6, d)[:, np.asarray(groups)]  # [B, N, 6, D]
    gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = (mod[:, :, i] for i in range(6))
    norm = lambda name: nn.LayerNorm(epsilon=self.ln_eps, use_scale=False, use_bias=False, dtype=self.dtype,
                                     name=name)
    y = norm("LayerNorm_0")(x) * (1.0 + scale_msa) + shift_msa
    y, _ = Attention(self.num_heads, dtype=self.dtype, name="MultiHeadDotProductAttention_0")(
        y, jnp.ones((b, n), bool))
    x = x + gate_msa * y
    y = norm("LayerNorm_1")(x) * (1.0 + scale_mlp) + shift_mlp
    return x + gate_mlp * MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)


class FlowDecoder(nn.Module):
  """v_θ(x_t [B, H, W, C], t [B], conditioning registers [B, K, D]) -> velocity [B, H, W, C]."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  ln_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, registers: jax.Array) -> jax.Array:
    b, h, w, c = x_t.shape
    patches = patchify(x_t, self.patch_size)
    n, k = patches.shape[1], registers.shape[1]
    x = nn.Dense(self.width, dtype=self.dtype, name="patch_embed")(patches)
    x = x + self.param("pos_embed", _embedding_init(), (n, self.width), jnp.float32).astype(x.dtype)
    x = jnp.concatenate([x, registers.astype(x.dtype)], axis=1)
    temb = nn.Dense(self.width, dtype=self.dtype, name="time_embed_0")(timestep_embedding(t, 256))
    temb = nn.Dense(self.width, dtype=self.dtype, name="time_embed_1")(nn.silu(temb))
    groups = np.asarray([0] * n + [1] * k)  # patches | registers, modulated separately
    for i in range(self.depth):
      x = ModulatedBlock(self.num_heads, self.mlp_dim, 2, self.ln_eps, dtype=self.dtype,
                         name=f"block_{i}")(x, temb, groups)
    x = nn.LayerNorm(epsilon=self.ln_eps, use_scale=False, use_bias=False, dtype=self.dtype, name="ln_post")(x[:, :n])
    shift, scale = jnp.split(nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                                      name="head_modulation")(nn.silu(temb))[:, None], 2, axis=-1)
    x = x * (1.0 + scale) + shift
    out = nn.Dense(self.patch_size ** 2 * c, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(x)
    return unpatchify(out.astype(jnp.float32), self.patch_size, h, w, c)


class PixelDecoder(nn.Module):
  """Deterministic: [mask token per patch position | conditioning registers] -> Transformer -> pixels [-1, 1]."""
  image_size: int
  channels: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  ln_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, registers: jax.Array) -> jax.Array:
    b = registers.shape[0]
    g = self.image_size // self.patch_size
    n = g * g
    queries = self.param("patch_mask_token", _embedding_init(), (self.width,), jnp.float32)
    queries = queries + self.param("pos_embed", _embedding_init(), (n, self.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(queries.astype(registers.dtype), (b, n, self.width)), registers], axis=1)
    x = Transformer(self.depth, self.num_heads, self.mlp_dim, ln_eps=self.ln_eps, dtype=self.dtype,
                    name="Transformer")(x)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_post")(x[:, :n])
    out = nn.Dense(self.patch_size ** 2 * self.channels, dtype=self.dtype, name="head")(x)
    return unpatchify(out.astype(jnp.float32), self.patch_size, self.image_size, self.image_size, self.channels)


class FlexTok(nn.Module):
  """FlexTok tokenizer (see the module docstring). Images NHWC in [0, 1]; K = num_latent_tokens."""
  num_latent_tokens: int = 8
  image_size: int = 32
  channels: int = 3
  patch_size: int = 4
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  decoder: str = "flow"                      # "flow" (rectified flow, the paper) or "pixel" (deterministic)
  decoder_width: int | None = None           # None: the encoder's
  decoder_depth: int | None = None
  decoder_num_heads: int | None = None
  decoder_mlp_dim: int | None = None
  fsq_levels: Sequence[int] = (8, 8, 8, 5, 5, 5)
  nested_dropout: str = "uniform"            # "uniform", "pow2" or "uniform_pow2"
  flow_steps: int = 25                       # Euler steps of the sampler (reference default 25)
  flow_timesteps: str = "logit_normal"       # training t: "logit_normal" (reference default) or "uniform"
  flow_noise_seed: int = 0                   # the fixed key of reconstruct/decode's starting noise
  cond_drop_prob: float = 0.0                # CFG: probability of a null condition per example in training
  guidance_scale: float = 1.0                # CFG scale at sampling; 1 = off
  ln_eps: float = 1e-5                       # the reference's LayerNorms use torch's default
  dtype: Any = jnp.float32

  def __post_init__(self):
    def positive_int(name):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"FlexTok.{name}={value!r}: must be an int >= 1")
    for name in ("num_latent_tokens", "image_size", "channels", "patch_size", "width", "depth", "num_heads",
                 "mlp_dim", "flow_steps"):
      positive_int(name)
    for name in ("decoder_width", "decoder_depth", "decoder_num_heads", "decoder_mlp_dim"):
      if getattr(self, name) is not None:
        positive_int(name)
    if self.image_size % self.patch_size:
      raise ValueError(f"FlexTok.patch_size={self.patch_size} must divide image_size={self.image_size}")
    if self.width % self.num_heads:
      raise ValueError(f"FlexTok.num_heads={self.num_heads} must divide width={self.width}")
    dec_width, dec_heads = self.decoder_width or self.width, self.decoder_num_heads or self.num_heads
    if dec_width % dec_heads:
      raise ValueError(f"FlexTok.decoder_num_heads={dec_heads} must divide decoder_width={dec_width}")
    if self.decoder not in DECODERS:
      raise ValueError(f"FlexTok.decoder={self.decoder!r}: must be one of {DECODERS}")
    if self.nested_dropout not in NESTED_DROPOUT:
      raise ValueError(f"FlexTok.nested_dropout={self.nested_dropout!r}: must be one of {NESTED_DROPOUT}")
    k = self.num_latent_tokens
    if self.nested_dropout == "pow2" and k & (k - 1):
      raise ValueError(f"FlexTok.nested_dropout='pow2' needs num_latent_tokens a power of two, got {k}")
    if self.flow_timesteps not in FLOW_TIMESTEPS:
      raise ValueError(f"FlexTok.flow_timesteps={self.flow_timesteps!r}: must be one of {FLOW_TIMESTEPS}")
    if not 0.0 <= self.cond_drop_prob < 1.0:
      raise ValueError(f"FlexTok.cond_drop_prob={self.cond_drop_prob!r}: must be in [0, 1)")
    if self.guidance_scale != 1.0 and (self.decoder != "flow" or self.cond_drop_prob == 0.0):
      raise ValueError(f"FlexTok.guidance_scale={self.guidance_scale!r}: guidance needs decoder='flow' and "
                       "cond_drop_prob > 0 (a trained null condition); use 1.0 to turn it off")
    if self.cond_drop_prob > 0 and self.decoder != "flow":
      raise ValueError(f"FlexTok.cond_drop_prob={self.cond_drop_prob!r}: only for decoder='flow'")
    super().__post_init__()

  def setup(self):
    dec = dict(width=self.decoder_width or self.width, depth=self.decoder_depth or self.depth,
               num_heads=self.decoder_num_heads or self.num_heads, mlp_dim=self.decoder_mlp_dim or self.mlp_dim,
               ln_eps=self.ln_eps, dtype=self.dtype)
    self.quantizer = FSQ(tuple(self.fsq_levels))
    self.encoder = Encoder(self.num_latent_tokens, self.patch_size, self.width, self.depth, self.num_heads,
                           self.mlp_dim, len(self.fsq_levels), self.ln_eps, dtype=self.dtype)
    self.conditioning = RegisterConditioning(self.num_latent_tokens, dec["width"], use_null=self.cond_drop_prob > 0,
                                             dtype=self.dtype)
    if self.decoder == "flow":
      self.flow = FlowDecoder(self.patch_size, **dec)
    else:
      self.pixel = PixelDecoder(self.image_size, self.channels, self.patch_size, **dec)

  # --- helpers ---

  def _check_images(self, images: jax.Array) -> None:
    want = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"FlexTok: images shape {tuple(images.shape)} must be [B, {want[0]}, {want[1]}, {want[2]}] "
                       "(image_size, channels)")

  def _keep(self, length, batch: int, train: bool) -> jax.Array:
    """[B, K] bool: the prefix kept. Training with length=None draws it (nested dropout, stream "token_drop")."""
    if train and length is None:
      length = sample_keep_lengths(self.make_rng("token_drop"), batch, self.num_latent_tokens, self.nested_dropout)
    return prefix_mask(length, self.num_latent_tokens, batch)

  def _sample(self, cond: jax.Array, null_cond: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """`euler_sample` from the fixed noise (one [H, W, C] draw shared by the rows) to x_0 in [-1, 1]."""
    noise = jax.random.normal(jax.random.key(self.flow_noise_seed), shape[1:], jnp.float32)
    x1 = jnp.broadcast_to(noise, shape)
    if self.is_initializing():  # create the decoder's parameters before it is unbound
      self.flow(x1, jnp.ones((shape[0],), jnp.float32), cond)
    flow, variables = self.flow.unbind()

    def velocity(x, t):
      v = flow.apply(variables, x, t, cond)
      if null_cond is not None:  # classifier-free guidance
        v_null = flow.apply(variables, x, t, null_cond)
        v = v_null + self.guidance_scale * (v - v_null)
      return v

    return euler_sample(velocity, x1, self.flow_steps)

  # --- the common tokenizer interface ---

  def encode(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """images [B, H, W, C] in [0, 1] -> (z_q [B, K, len(levels)] fp32, FSQ aux with ids [B, K])."""
    del train  # the encoder has no train-only behaviour (nested dropout acts on the decoder's input)
    self._check_images(images)
    return self.quantizer(self.encoder(images.astype(self.dtype) * 2.0 - 1.0))

  def decode(self, z_q: jax.Array, *, length=None, train: bool = False) -> jax.Array:
    """z_q [B, K, C] -> images [B, H, W, C] (unclamped, [0, 1] scale) from the first `length` tokens."""
    b = z_q.shape[0]
    keep = self._keep(length, b, train)
    cond = self.conditioning(z_q, keep)
    if self.decoder == "pixel":
      return (self.pixel(cond) + 1.0) / 2.0
    null_cond = None
    if self.guidance_scale != 1.0:
      null_cond = self.conditioning(z_q, keep, jnp.ones((b,), bool))
    x0 = self._sample(cond, null_cond, (b, self.image_size, self.image_size, self.channels))
    return (x0 + 1.0) / 2.0

  def decode_tokens(self, ids: jax.Array, *, length=None) -> jax.Array:
    """ids int [B, K] -> images."""
    return self.decode(self.quantizer.lookup(ids), length=length)

  def reconstruct(self, images: jax.Array, *, length=None) -> jax.Array:
    """Deterministic: encode -> decode at `length` (the flow decoder samples from the fixed noise key)."""
    z_q, _ = self.encode(images)
    return self.decode(z_q, length=length)

  def flow_loss(self, images: jax.Array, z_q: jax.Array, keep: jax.Array, *, train: bool) -> jax.Array:
    """mean (v_θ(x_t, t) - (ε - x_0))². Training: t, ε (and CFG drops) from the rng streams; eval: fixed keys."""
    b = images.shape[0]
    x0 = images.astype(jnp.float32) * 2.0 - 1.0
    if train:
      t_rng, eps_rng = jax.random.split(self.make_rng("noise"))
    else:
      t_rng, eps_rng = jax.random.split(jax.random.key(self.flow_noise_seed))
    t = sample_timesteps(t_rng, b, self.flow_timesteps)
    noise = jax.random.normal(eps_rng, x0.shape, jnp.float32)
    x_t, target = noise_and_target(x0, noise, t)
    null = None
    if self.cond_drop_prob > 0:
      null = jax.random.bernoulli(self.make_rng("token_drop"), self.cond_drop_prob, (b,)) if train \
          else jnp.zeros((b,), bool)
    v = self.flow(x_t, t, self.conditioning(z_q, keep, null))
    return jnp.mean(jnp.square(v - target))

  def __call__(self, images: jax.Array, *, length=None, train: bool = False) -> dict[str, Any]:
    """Training: recon None and losses {"flow"} (flow decoder) or recon (pixel decoder), with nested dropout
    when length is None. Eval (train=False): recon from the deterministic decoder at `length`."""
    z_q, aux = self.encode(images, train=train)
    b = images.shape[0]
    keep = self._keep(length, b, train)
    metrics = {"perplexity": aux["perplexity"], "usage": aux["usage"],
               "kept_length_mean": jnp.mean(jnp.sum(keep, axis=1).astype(jnp.float32))}
    if self.decoder == "pixel":
      recon = (self.pixel(self.conditioning(z_q, keep)) + 1.0) / 2.0
      return {"recon": recon, "losses": {}, "metrics": metrics}
    losses = {"flow": self.flow_loss(images, z_q, keep, train=train)}
    if train:
      return {"recon": None, "losses": losses, "metrics": metrics}
    lengths = jnp.sum(keep, axis=1).astype(jnp.int32)
    return {"recon": self.decode(z_q, length=lengths), "losses": losses, "metrics": metrics}

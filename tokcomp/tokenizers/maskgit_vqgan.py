"""The MaskGIT VQGAN pixel decoder that the released (legacy) TiTok models decode through.

MaskGIT's VQGAN (Chang et al., "MaskGIT: Masked Generative Image Transformer", CVPR 2022, arXiv:2202.04200) is
VQGAN (Esser et al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021, arXiv:2012.09841,
§3.1) without its non-local (attention) layers. TiTok's second training stage (`finetune_decoder`, Yu et al.,
NeurIPS 2024, arXiv:2406.07550, §3.3) turns the legacy head's 1024 logits per patch into a convex mix of this
VQGAN's codebook rows and decodes the mix with the VQGAN's convolutional decoder:
  q = softmax(logits) @ E            (E: the VQGAN codebook [1024, 256])
  x = conv_in(q); mid ResBlocks; for each level from the coarsest: ResBlocks, then (except level 0)
      nearest x2 upsampling + 3x3 conv; GroupNorm, SiLU, 3x3 conv -> RGB
ResBlock: h = conv2(SiLU(GN(conv1(SiLU(GN(x)))))), convs 3x3 without bias, GroupNorm 32 groups eps 1e-6.
Default sizes are MaskGIT's (hidden 128, channel_mult (1, 1, 2, 2, 4), 2 ResBlocks per level, z 256): a 16x16
latent grid -> 256x256 pixels. "Same" padding (what the reference's Conv2dSame does for stride 1).

Reproduced quirk: where a ResBlock changes the channel count, the reference adds nin_shortcut(h), the 1x1 conv
of the block's *output*, instead of the usual shortcut of its input: out = h + nin_shortcut(h). (Inherited from
the open-muse port of the JAX weights that TiTok uses; the weights were fitted with it.)

Parity: tests/goldens/maskgit_vqgan_decoder.npz (tools/goldens/make_titok.py, bytedance/1d-tokenizer
@ 942a96fbdd873780179d1b78d5462911528bf8c8, `modeling/modules/maskgit_vqgan.py: Decoder`, a tiny config with a
channel change so the quirk runs), 1e-5. The TiTok -> mix -> decoder composition is tested in tests/test_titok.py.
Differences: NHWC; GroupNorm's variance is the two-pass E[(x - mean)²] like torch's.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

VQGAN_CODES, VQGAN_DIM = 1024, 256


def group_norm(name: str, dtype) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


def conv(features: int, kernel: int, name: str, dtype, bias: bool = True) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=bias, dtype=dtype,
                 name=name)


class ResnetBlock(nn.Module):
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = conv(self.out_channels, 3, "conv1", self.dtype, bias=False)(nn.silu(group_norm("norm1", self.dtype)(x)))
    h = conv(self.out_channels, 3, "conv2", self.dtype, bias=False)(nn.silu(group_norm("norm2", self.dtype)(h)))
    if x.shape[-1] != self.out_channels:  # the reference's shortcut acts on h, not on x (see the docstring)
      return h + conv(self.out_channels, 1, "nin_shortcut", self.dtype, bias=False)(h)
    return h + x


class PixelDecoder(nn.Module):
  """z [B, h, w, z_channels] -> images [B, h·2^(L-1), w·2^(L-1), out_channels], L = len(channel_mult)."""
  hidden_channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  out_channels: int = 3
  dtype: Any = jnp.float32

  def __post_init__(self):
    bad = [m for m in self.channel_mult if (self.hidden_channels * m) % 32]
    if not self.channel_mult or bad or self.num_res_blocks < 1:
      raise ValueError(f"PixelDecoder: hidden_channels={self.hidden_channels} x channel_mult="
                       f"{tuple(self.channel_mult)} must be non-empty multiples of 32 (GroupNorm has 32 groups), "
                       f"num_res_blocks={self.num_res_blocks} >= 1")
    super().__post_init__()

  @property
  def upsampling(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    mult, width = tuple(self.channel_mult), self.hidden_channels
    x = conv(width * mult[-1], 3, "conv_in", self.dtype)(z)
    for j in range(self.num_res_blocks):
      x = ResnetBlock(width * mult[-1], self.dtype, name=f"mid_{j}")(x)
    for level in reversed(range(len(mult))):
      for j in range(self.num_res_blocks):
        x = ResnetBlock(width * mult[level], self.dtype, name=f"up_{level}_block_{j}")(x)
      if level:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        x = conv(width * mult[level], 3, f"up_{level}_upsample_conv", self.dtype)(x)
    x = nn.silu(group_norm("norm_out", self.dtype)(x))
    return conv(self.out_channels, 3, "conv_out", self.dtype)(x)


def mix_codes(logits: jax.Array, codebook: jax.Array) -> jax.Array:
  """softmax over the last axis of logits [..., 1024], times the VQGAN codebook [1024, D] -> [..., D] (fp32)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.einsum("...n,nd->...d", probs, codebook.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

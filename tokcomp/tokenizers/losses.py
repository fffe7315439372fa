"""Reconstruction losses for training the 1D tokenizers (train.py, `config.task = "reconstruct"`).

- Pixel losses: "l1" (mean |x̂ - x|), "l2" (mean (x̂ - x)²), or "l1+l2".
- An optional perceptual loss from a frozen feature network the user supplies. The LPIPS recipe (Zhang et al.,
  "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018, eq. 1) on the tokens of a
  trained tokcomp ViT instead of VGG: at each chosen block l, both images' tokens are unit-normalised over
  channels and the squared difference is averaged over tokens and channels, then summed over the blocks. Without
  LPIPS's learned per-channel weights (w_l = 1: the "baseline" variant of the paper, §3). Any ViT that tokcomp
  loads (a train.py workdir, a timm or big_vision file) serves; on Fashion-MNIST the trained classifier from
  configs/fmnist_vit.py does. Nothing is downloaded.
- Or real LPIPS (the same paper's eq. 1 with its VGG16 trunk and learned lin weights, checked against the `lpips`
  package): `tokcomp.tokenizers.lpips.LPIPSLoss` on params from `tokcomp.checkpoints.lpips.load` (torchvision
  VGG16 + the package's weights/v0.1/vgg.pth, which the user supplies); `perceptual_loss` takes either.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp.tokenizers.lpips import LPIPSLoss
from tokcomp.tokenizers.quantizers import l2_normalize

PIXEL_LOSSES = ("l1", "l2", "l1+l2")


def pixel_loss(recon: jax.Array, target: jax.Array, kind: str = "l1") -> jax.Array:
  if kind not in PIXEL_LOSSES:
    raise ValueError(f"reconstruction loss kind={kind!r}: must be one of {PIXEL_LOSSES}")
  diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
  l1, l2 = jnp.mean(jnp.abs(diff)), jnp.mean(jnp.square(diff))
  return {"l1": l1, "l2": l2, "l1+l2": l1 + l2}[kind]


class ViTFeatures:
  """The perceptual loss's frozen feature network: a tokcomp ViT and its params, returning the token states
  after `blocks` for images in [0, 1] (normalised with the ViT's own `mean`/`std` first)."""

  def __init__(self, model, params, blocks: Sequence[int], mean: Sequence[float], std: Sequence[float]):
    depth = model.depth
    bad = [b for b in blocks if not 0 <= b < depth]
    if not blocks or bad:
      raise ValueError(f"perceptual blocks={list(blocks)}: each must be a block index in 0..{depth - 1}")
    self.model, self.params, self.blocks = model.clone(reduce=None), params, tuple(blocks)
    self.mean, self.std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  def __call__(self, params, images: jax.Array) -> list[jax.Array]:
    from tokcomp.models.vit import Encoder1DBlock
    x = (images.astype(jnp.float32) - self.mean) / self.std
    names = {f"encoderblock_{b}" for b in self.blocks}
    _, state = self.model.apply(params, x, capture_intermediates=lambda m, method: (
        method == "__call__" and isinstance(m, Encoder1DBlock) and m.name in names), mutable=["intermediates"])
    found = state["intermediates"]["Transformer"]
    return [found[f"encoderblock_{b}"]["__call__"][0].x for b in self.blocks]


def perceptual_loss(features: ViTFeatures | LPIPSLoss, recon: jax.Array, target: jax.Array) -> jax.Array:
  """Σ_l mean_{tokens, channels} (f̂_l - f_l)² over unit-normalised token features; the network is frozen.
  An `LPIPSLoss` gives the batch mean of LPIPS-VGG instead (tokcomp/tokenizers/lpips.py)."""
  if isinstance(features, LPIPSLoss):
    return features(recon, target)
  params = jax.lax.stop_gradient(features.params)
  unit = lambda f: l2_normalize(f, 1e-10)
  total = jnp.zeros((), jnp.float32)
  for a, b in zip(features(params, recon), features(params, jax.lax.stop_gradient(target))):
    total = total + jnp.mean(jnp.square(unit(a.astype(jnp.float32)) - unit(b.astype(jnp.float32))))
  return total

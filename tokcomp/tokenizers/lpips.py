r"""LPIPS with a VGG16 trunk: a learned perceptual distance between images, as a pure JAX function.

Paper: R. Zhang, P. Isola, A. A. Efros, E. Shechtman, O. Wang, "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric", CVPR 2018, arXiv:1801.03924, §3 and eq. 1:

  d(x, x₀) = Σ_l 1/(H_l W_l) Σ_{h,w} ‖ w_l ⊙ (ŷ^l_hw − ŷ^l_0hw) ‖²₂

with ŷ^l the trunk's features at layer l unit-normalised over channels. Reference: the `lpips` package (PyPI 0.1.4,
github.com/richzhang/PerceptualSimilarity, BSD-2-Clause), `LPIPS(net="vgg", version="0.1")`, which computes, per
layer l ∈ {relu1_2, relu2_2, relu3_3, relu4_3, relu5_3} of torchvision's VGG16 (its `features` slices [0:4],
[4:9], [9:16], [16:23], [23:30]):

  z      = (x' − shift) / scale          x' ∈ [-1, 1]; shift = (-.030, -.088, -.188), scale = (.458, .448, .450)
                                         (the package's `ScalingLayer`: ImageNet mean/std mapped to [-1, 1])
  ŷ^l    = f^l / (‖f^l‖₂ + 1e-10)        over channels at each position (`normalize_tensor`, eps 1e-10)
  d_l    = mean_{h,w} Σ_c a_lc (ŷ^l_c(x) − ŷ^l_c(x₀))²     a_l: the 1x1 "lin" conv, one output, no bias
  d      = Σ_l d_l                                          -> [B]

The package's lin weights a_l multiply the *squared* difference, so they are eq. 1's w_l², and are non-negative
(its trainer clamps them at 0; `tokcomp.checkpoints.lpips` rejects negative ones).

Here: `lpips(params, x, y)` takes NHWC images in **[0, 1]** (the package's default input is [-1, 1]; this is its
`normalize=True` path, x' = 2x − 1) and returns the [B] distances. fp32 throughout (inputs are cast; the convs run
at the backend's default fp32 precision unless `precision=` says otherwise: on GPUs/TPUs the default may use
TF32/bf16 passes, `jax.lax.Precision.HIGHEST` gives the fp32 result the golden was checked at on CPU). Grayscale
(C = 1) is repeated to 3 channels. H and W must be >= 32 (MIN_SIZE): VGG16 pools 4 times before relu5_3, and at 32
px relu5_3 still has 2x2 positions; smaller images are a ValueError (resize them first, as
`LPIPSLoss(resize=...)` does for training). Rows are independent: the trunk runs on x and on y separately (no
concat along the batch), so a batch-sharded jit has no collectives (checked on 8 simulated CPU devices, value
and gradient). One compile per input shape.

Params: {"params": {"vgg": {"conv1_1": {kernel [3,3,3,64], bias}, ..., "conv5_3": ...},
"lin0".."lin4": {kernel [C_l, 1]}}}, from `tokcomp.checkpoints.lpips.load(vgg_path, lin_path)` (torchvision vgg16
`features.*` + the package's `weights/v0.1/vgg.pth`). The stage widths are read off the params, so a narrower VGG
of the same layout (tests) runs through the same code.

Parity: tests/goldens/lpips_vgg.npz (tools/goldens/make_lpips.py; lpips 0.1.4, torch 2.13 CPU): seeded random VGG16
weights + the package's real lin weights; distances and per-layer terms at 64x64 (batch 3), 32x32, 48x72 and
grayscale 40x56 agree to rtol 1e-5 in fp32 (measured: distances within 2.4e-7, layers within 2.6e-6 relative).
Deliberate differences from the package: inputs in [0, 1] and NHWC; the channel norm is written so its gradient
is finite where a feature vector is exactly zero (a position where every ReLU of a layer is off: a plain sqrt has
an infinite derivative at 0, and inf x 0 = NaN; the value is unchanged); no `spatial=True` map, no alex/squeeze
trunks, no v0.0.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# (convs per stage); LPIPS taps the ReLU after each stage's last conv: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_CONVS = (2, 2, 3, 3, 3)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
SHIFT = (-0.030, -0.088, -0.188)  # lpips/lpips.py ScalingLayer (v0.1)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10                  # lpips/__init__.py normalize_tensor
MIN_SIZE = 32


def conv_names() -> list[str]:
  """conv1_1, conv1_2, conv2_1, ..., conv5_3: the 13 convs in order."""
  return [f"conv{s + 1}_{j + 1}" for s, n in enumerate(VGG16_CONVS) for j in range(n)]


class VGG16Features(nn.Module):
  """torchvision's vgg16 `features[:30]` in NHWC: 3x3 convs (padding 1) + ReLU, 2x2 max pools between stages
  (floor, as torch's ceil_mode=False). Returns the five LPIPS taps."""
  widths: Sequence[int] = VGG16_WIDTHS
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps, names = [], iter(conv_names())
    for stage, (width, convs) in enumerate(zip(self.widths, VGG16_CONVS)):
      if stage:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for _ in range(convs):
        x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), precision=self.precision, name=next(names))(x))
      taps.append(x)
    return taps


def unit_normalize(f: jax.Array) -> jax.Array:
  """f / (‖f‖₂ + 1e-10) over the last (channel) axis, as the package; finite gradient at f = 0."""
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return f / (norm + NORM_EPS)


class LPIPS(nn.Module):
  """The trunk and the five lin heads. __call__(x, y) on images already scaled ((x' − shift)/scale) -> [B]."""
  widths: Sequence[int] = VGG16_WIDTHS
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    vgg = VGG16Features(self.widths, self.precision, name="vgg")
    # two calls of the one trunk, not one on concat([x, y]): a concat along a batch-sharded axis needs collectives
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for l, (fx, fy) in enumerate(zip(vgg(x), vgg(y))):
      diff = jnp.square(unit_normalize(fx) - unit_normalize(fy))              # [B, h, w, C]
      weighted = nn.Dense(1, use_bias=False, precision=self.precision, name=f"lin{l}")(diff)  # a 1x1 conv
      total = total + jnp.mean(weighted, axis=(1, 2, 3))
    return total


def widths_of(params) -> tuple[int, ...]:
  """The five stage widths, read off the params (the last conv of each stage)."""
  try:
    vgg = params["params"]["vgg"]
    ends = [f"conv{s + 1}_{n}" for s, n in enumerate(VGG16_CONVS)]
    return tuple(int(vgg[name]["kernel"].shape[-1]) for name in ends)
  except (KeyError, TypeError) as e:
    raise ValueError("lpips params must be {'params': {'vgg': {'conv1_1': ..., 'conv5_3': ...}, 'lin0'..'lin4': ...}} "
                     f"(tokcomp.checkpoints.lpips.load); missing {e}") from e


def check_images(x: jax.Array, y: jax.Array) -> None:
  if x.shape != y.shape:
    raise ValueError(f"lpips: the two image batches differ in shape: {x.shape} vs {y.shape}")
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"lpips: images must be NHWC [B, H, W, C] with C = 1 or 3, got shape {x.shape}")
  if min(x.shape[1:3]) < MIN_SIZE:
    raise ValueError(f"lpips: images are {x.shape[1]}x{x.shape[2]}; H and W must be >= {MIN_SIZE} (VGG16 pools 4 "
                     "times before relu5_3); resize smaller images first (LPIPSLoss(resize=...))")


def lpips(params, x: jax.Array, y: jax.Array, *, precision: Any = None) -> jax.Array:
  """LPIPS-VGG distance between NHWC images in [0, 1] (C = 1 or 3, H, W >= 32) -> [B] float32."""
  check_images(x, y)
  x, y = (jnp.asarray(v).astype(jnp.float32) for v in (x, y))
  if x.shape[-1] == 1:
    x, y = (jnp.repeat(v, 3, axis=-1) for v in (x, y))
  shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
  x, y = (((2.0 * v - 1.0) - shift) / scale for v in (x, y))  # [0, 1] -> [-1, 1] -> the package's ScalingLayer
  return LPIPS(widths_of(params), precision).apply(params, x, y)


class LPIPSLoss:
  """The training loss: mean over the batch of lpips(params, recon, target) on a frozen network (no gradient to
  the params or the target). resize: a side (int) or (H, W): both images are bilinearly resized to it first, for
  images smaller than 32 px (Fashion-MNIST's 28) or to compare at a fixed scale; 0/None keeps their size."""

  def __init__(self, params, *, resize: int | Sequence[int] | None = None, precision: Any = None):
    widths_of(params)  # fail early on a malformed tree
    if resize:
      hw = (int(resize), int(resize)) if isinstance(resize, (int, float)) else tuple(int(r) for r in resize)
      if len(hw) != 2 or min(hw) < MIN_SIZE:
        raise ValueError(f"perceptual resize={resize!r}: must be a side or (H, W) with each >= {MIN_SIZE}")
      self.resize = hw
    else:
      self.resize = None
    self.params, self.precision = params, precision

  def __call__(self, recon: jax.Array, target: jax.Array) -> jax.Array:
    target = jax.lax.stop_gradient(target)
    if self.resize is not None:
      recon, target = (jax.image.resize(v.astype(jnp.float32), (v.shape[0], *self.resize, v.shape[-1]), "bilinear")
                       for v in (recon, target))
    return jnp.mean(lpips(jax.lax.stop_gradient(self.params), recon, target, precision=self.precision))

r"""LPIPS-VGG weights -> `tokcomp.tokenizers.lpips` params, without torch and without pickle.

  params = checkpoints.lpips.load("vgg16_features.safetensors", "lpips_vgg_lin.safetensors")
  params = checkpoints.lpips.load("lpips_vgg.safetensors")      # one file holding an LPIPS module's state dict
  d = tokenizers.lpips.lpips(params, x, y)                       # x, y: NHWC in [0, 1] -> [B]

Two sources, each a .safetensors or .npz file (read by `common.read_arrays`; never pickle):
  (a) the VGG16 trunk: torchvision's `vgg16(weights="IMAGENET1K_V1")` (what `lpips.LPIPS(net="vgg")` loads through
      `tv.vgg16(pretrained=True)`), as `features.N.{weight,bias}` (a whole vgg16 state dict; `classifier.*` is
      ignored), bare `N.{weight,bias}` (`vgg16().features.state_dict()`), or `net.sliceK.N.{weight,bias}` (an
      `lpips.LPIPS` module's state dict). N: torchvision's layer index, convs at 0, 2, 5, 7, 10, 12, 14, 17, 19,
      21, 24, 26, 28 (relu1_2 = features[3], ..., relu5_3 = features[29]).
  (b) the lin heads: the lpips package's `lpips/weights/v0.1/vgg.pth` (`lin{0..4}.model.1.weight`, [1, C, 1, 1];
      `model.0` when saved without dropout); an LPIPS state dict's `lins.k.*` duplicates are ignored. Its
      `scaling_layer.shift/scale`, when present, must equal tokcomp.tokenizers.lpips.SHIFT/SCALE.

.pth files are torch pickles: convert them once in an environment that has torch (and, for the lin weights,
`pip install lpips`):

  python -c "import torchvision; from safetensors.torch import save_file; save_file(torchvision.models.vgg16(weights='IMAGENET1K_V1').features.state_dict(), 'vgg16_features.safetensors')"
  python -c "import os, torch, lpips; from safetensors.torch import save_file; save_file(torch.load(os.path.join(os.path.dirname(lpips.__file__), 'weights/v0.1/vgg.pth'), map_location='cpu'), 'lpips_vgg_lin.safetensors')"

(`numpy.savez(path, **{k: v.numpy() for k, v in state_dict.items()})` writes the .npz form instead.)

Layout: Conv [O, I, 3, 3] -> vgg/convS_J/kernel [3, 3, I, O] (+ bias [O]); lin{l} [1, C, 1, 1] -> lin{l}/kernel
[C, 1]. Stage widths are read off the shapes (a narrower VGG of the same layout loads too) and every array is
checked against the model's own shapes. Negative lin weights are an error (the package's trainer clamps them at 0;
a negative one can make the distance negative). Nothing is downloaded and nothing falls back to random init.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp.checkpoints.common import check_shapes, read_arrays, unflatten
from tokcomp.tokenizers import lpips as lpips_model

# torchvision vgg16 `features` indices of the 13 convs, in order (conv1_1 ... conv5_3).
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONVERT_HINT = (
    "convert .pth files to .safetensors once with torch: python -c \"import torchvision; from safetensors.torch "
    "import save_file; save_file(torchvision.models.vgg16(weights='IMAGENET1K_V1').features.state_dict(), "
    "'vgg16_features.safetensors')\" and python -c \"import os, torch, lpips; from safetensors.torch import "
    "save_file; save_file(torch.load(os.path.join(os.path.dirname(lpips.__file__), 'weights/v0.1/vgg.pth'), "
    "map_location='cpu'), 'lpips_vgg_lin.safetensors')\" (see tokcomp/checkpoints/lpips.py)")
_VGG_KEY = re.compile(r"^(?:features\.|net\.slice[1-5]\.)?(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lin([0-4])\.model\.[01]\.weight$")


def _read(source: str | os.PathLike | Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
  if not isinstance(source, (str, os.PathLike)):
    return {k: np.asarray(v) for k, v in source.items()}
  path = os.fspath(source)
  if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
    raise ValueError(f"{what}={path!r} is a torch pickle, which tokcomp never loads; {CONVERT_HINT}")
  return read_arrays(path)


def vgg_params(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{torchvision features key: array} -> {"vgg/convS_J/kernel" | ".../bias": array}."""
  by_index: dict[int, dict[str, np.ndarray]] = {}
  for key, value in arrays.items():
    m = _VGG_KEY.match(key)
    if m:
      by_index.setdefault(int(m.group(1)), {})[m.group(2)] = np.asarray(value, np.float32)
  if not by_index:
    sample = ", ".join(sorted(arrays)[:6])
    raise ValueError("no VGG16 conv weights found: expected torchvision `features.N.weight` (or `N.weight`, "
                     f"`net.sliceK.N.weight`) keys; first keys: {sample}")
  if tuple(sorted(by_index)) != CONV_INDICES or any(set(v) != {"weight", "bias"} for v in by_index.values()):
    hint = " (batch-norm keys: vgg16_bn is not the LPIPS trunk)" if any(
        k.endswith(("running_mean", "running_var")) for k in arrays) else ""
    raise ValueError(f"VGG16 weights: conv layers at features indices {sorted(by_index)}, each with weight and "
                     f"bias, expected exactly {list(CONV_INDICES)}{hint}")
  out = {}
  for name, index in zip(lpips_model.conv_names(), CONV_INDICES):
    w, b = by_index[index]["weight"], by_index[index]["bias"]
    if w.ndim != 4 or w.shape[2:] != (3, 3):
      raise ValueError(f"VGG16 weights: features.{index}.weight has shape {w.shape}, expected [O, I, 3, 3]")
    out[f"vgg/{name}/kernel"] = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    out[f"vgg/{name}/bias"] = b
  return out


def lin_params(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{`lin{l}.model.1.weight` [1, C, 1, 1]} -> {"lin{l}/kernel": [C, 1]}; all five, non-negative."""
  out = {}
  for key, value in arrays.items():
    m = _LIN_KEY.match(key)
    if m:
      w = np.asarray(value, np.float32)
      if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
        raise ValueError(f"LPIPS lin weights: {key} has shape {w.shape}, expected [1, C, 1, 1]")
      if (w < 0).any():
        raise ValueError(f"LPIPS lin weights: {key} has negative entries (min {w.min():.3g}); LPIPS's lin weights "
                         "are non-negative (the package clamps them at 0 in training)")
      out[f"lin{m.group(1)}/kernel"] = np.ascontiguousarray(w[0, :, 0, 0][:, None])
  missing = [f"lin{l}.model.1.weight" for l in range(5) if f"lin{l}/kernel" not in out]
  if missing:
    raise ValueError(f"LPIPS lin weights: missing {missing}; they are the lpips package's weights/v0.1/vgg.pth "
                     f"(lin0..lin4.model.1.weight); {CONVERT_HINT}")
  for name, value in (("shift", lpips_model.SHIFT), ("scale", lpips_model.SCALE)):
    key = f"scaling_layer.{name}"
    if key in arrays and not np.allclose(np.ravel(arrays[key]), value, rtol=0, atol=1e-6):
      raise ValueError(f"LPIPS weights: {key} = {np.ravel(arrays[key]).tolist()} differs from v0.1's {value}")
  return out


def convert(vgg_arrays: Mapping[str, np.ndarray], lin_arrays: Mapping[str, np.ndarray] | None = None) -> dict:
  """Arrays of (a) the VGG16 trunk and (b) the lin heads (None: taken from `vgg_arrays`) -> checked params."""
  flat = {**vgg_params(vgg_arrays), **lin_params(vgg_arrays if lin_arrays is None else lin_arrays)}
  params = unflatten(flat)
  widths = lpips_model.widths_of(params)
  z = jax.ShapeDtypeStruct((1, lpips_model.MIN_SIZE, lpips_model.MIN_SIZE, 3), jnp.float32)
  expected = jax.eval_shape(lambda a, b: lpips_model.LPIPS(widths).init(jax.random.key(0), a, b), z, z)["params"]
  check_shapes(expected, params["params"], "LPIPS weights do not fit VGG16 + lin heads")
  return params


def load(weights: str | os.PathLike | Mapping[str, np.ndarray],
         lin_weights: str | os.PathLike | Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """LPIPS-VGG params from (a) a VGG16 file and (b) the lin-weights file (None: the same file holds both)."""
  vgg = _read(weights, "weights")
  lin = None if lin_weights is None else _read(lin_weights, "lin_weights")
  return jax.tree_util.tree_map(jnp.asarray, convert(vgg, lin))

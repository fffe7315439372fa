"""Load the ViT weights people already have, without torch and without pickle.

  model, params = checkpoints.load("vit_small.safetensors")          # timm / DeiT state dict
  model, params = checkpoints.load("S_16-i21k-300ep.npz")           # big_vision or AugReg (vit_jax) .npz
  model, params = checkpoints.load(path, image_size=384, reduce="tome:r=13")

The format is detected from probe keys (timm: `patch_embed.proj.weight`; big_vision/vit_jax:
`embedding/kernel`, optionally under `params/` or `opt/target/`). The model config is read off the shapes
(width, depth, MLP width, classes, patch, prefix tokens, pooling); heads cannot be, so they come from the
standard width -> heads table unless `num_heads` is given. Every converted array is checked against the
model's own parameter shapes; a mismatch names the key and both shapes. Nothing falls back to random init.

`checkpoints.lpips.load(vgg16_file, lin_file)`: the LPIPS-VGG perceptual metric's weights (torchvision VGG16 +
the lpips package's lin heads) for `tokcomp.tokenizers.lpips`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from tokcomp.checkpoints import big_vision, lpips, timm
from tokcomp.checkpoints.common import check_against_model, image_size_of, read_arrays, resample_posemb

__all__ = ["load", "read_arrays", "detect_format", "resample_posemb", "check_against_model", "timm", "big_vision",
           "lpips"]


def detect_format(arrays: Mapping[str, np.ndarray]) -> str:
  if timm.PROBE in arrays:
    return "timm"
  if big_vision.find_prefix(arrays) is not None:
    return "big_vision"
  sample = ", ".join(sorted(arrays)[:5])
  raise ValueError(f"unrecognised checkpoint: no {timm.PROBE!r} (timm) or 'embedding/kernel' (big_vision) key; "
                   f"first keys: {sample}")


def load(path_or_arrays: str | os.PathLike | Mapping[str, np.ndarray], *, num_heads: int | None = None,
         image_size: int | tuple[int, int] | None = None, **model_overrides: Any):
  """Returns (ViT module, params) for a timm/DeiT or big_vision/AugReg checkpoint.

  image_size: the resolution to run at; the position embedding is resampled (bilinear) when it differs
    from the checkpoint's. model_overrides go to the ViT (e.g. reduce="tome:r=13", dtype=jnp.bfloat16).
  """
  arrays = read_arrays(path_or_arrays) if isinstance(path_or_arrays, (str, os.PathLike)) else dict(path_or_arrays)
  fmt = detect_format(arrays)
  module = timm if fmt == "timm" else big_vision
  model, params = module.convert(arrays, num_heads=num_heads, image_size=image_size, **model_overrides)
  check_against_model(model, params, image_size=image_size_of(model, params))
  return model, params

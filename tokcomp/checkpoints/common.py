"""What the converters share: reading files without pickle, posemb resampling, and shape checking."""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tokcomp.models import vit

# Standard heads per width (Dosovitskiy et al. 2021; Touvron et al. 2021), used when a checkpoint cannot say.
HEADS_BY_WIDTH = {w: h for w, _, _, h in vit.VARIANTS.values()}


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A checkpoint file -> {key: float32 array}. .safetensors or .npz only: no pickle is ever loaded."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      arrays = load_file(path)
    except Exception as e:  # bf16 tensors have no numpy dtype: read them through flax's reader instead
      raise ValueError(f"checkpoint {path!r}: could not read as safetensors ({e})") from e
  elif path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  else:
    raise ValueError(f"checkpoint {path!r}: must be .safetensors or .npz (no pickle formats such as .pth/.bin; "
                     f"convert those with safetensors.torch.save_file in a torch environment)")
  return {k: np.asarray(v, np.float32) if np.issubdtype(np.asarray(v).dtype, np.floating) else np.asarray(v)
          for k, v in arrays.items()}


def heads_for(width: int, num_heads: int | None) -> int:
  if num_heads is not None:
    if width % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide the checkpoint width {width}")
    return num_heads
  if width not in HEADS_BY_WIDTH:
    raise ValueError(f"checkpoint width {width} is not a standard ViT size {sorted(HEADS_BY_WIDTH)}: "
                     f"pass num_heads=")
  return HEADS_BY_WIDTH[width]


def square_side(n: int, what: str) -> int:
  side = int(round(n ** 0.5))
  if side * side != n:
    raise ValueError(f"{what}: {n} positions is not a square grid; pass image_size=")
  return side


def image_size_of(model: vit.ViT, params: Mapping[str, Any]) -> tuple[int, int]:
  """The (square) image size a model's loaded position embedding was made for."""
  n = params["params"]["pos_embedding"].shape[1] - (model.num_prefix if model.posemb_prefix else 0)
  side = square_side(n, "pos_embedding")
  return side * model.patch_size[0], side * model.patch_size[1]


def resample_posemb(posemb: np.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int],
                    num_prefix: int) -> np.ndarray:
  """Bilinear resampling of the patch part of a [1, P + h*w, D] position embedding to a new grid."""
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
  if grid.shape[1] != old_grid[0] * old_grid[1]:
    raise ValueError(f"pos_embedding has {grid.shape[1]} patch positions, not {old_grid[0]}x{old_grid[1]}")
  if tuple(old_grid) == tuple(new_grid):
    return posemb
  d = grid.shape[-1]
  grid = jax.image.resize(jnp.asarray(grid.reshape(old_grid[0], old_grid[1], d)),
                          (new_grid[0], new_grid[1], d), method="bilinear", antialias=False)
  return np.concatenate([prefix, np.asarray(grid).reshape(1, -1, d)], axis=1)


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  return {"params": traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})}


def check_against_model(model: vit.ViT, params: Mapping[str, Any], image_size: tuple[int, int]) -> None:
  """Asserts that `params` has exactly the model's keys and shapes; names every offender."""
  images = jax.ShapeDtypeStruct((1, image_size[0], image_size[1], 3), jnp.float32)
  check_shapes(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"], params["params"],
               "checkpoint does not fit the model")


def check_shapes(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
  """`got` (a params tree) has exactly the keys and shapes of `expected` (e.g. from jax.eval_shape of an init);
  otherwise a ValueError starting with `what` that names every missing, unexpected or misshapen leaf."""
  exp = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(expected).items()}
  got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(got).items()}
  missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
  bad = [f"{k}: checkpoint {got[k]} vs model {exp[k]}" for k in sorted(set(exp) & set(got)) if got[k] != exp[k]]
  if missing or extra or bad:
    raise ValueError(f"{what}:" + (f"\n  missing: {missing}" if missing else "")
                     + (f"\n  unexpected: {extra}" if extra else "") + "".join(f"\n  shape {b}" for b in bad))


def overlay(fresh: Mapping[str, Any], loaded: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """Fine-tuning init: `fresh` params with every leaf that `loaded` also has replaced by the loaded value.

  Returns (params, names kept fresh). Leaves only in `fresh` (a new reducer's or head's weights) keep their
  initialisation; a leaf only in `loaded`, or one whose shape differs, is an error that names it.
  """
  new = traverse_util.flatten_dict(dict(fresh), sep="/")
  old = traverse_util.flatten_dict(dict(loaded), sep="/")
  extra = sorted(set(old) - set(new))
  bad = [f"{k}: loaded {np.shape(old[k])} vs model {np.shape(new[k])}"
         for k in sorted(set(old) & set(new)) if np.shape(old[k]) != np.shape(new[k])]
  if extra or bad:
    raise ValueError("init_from does not fit the model:" + (f"\n  not in the model: {extra}" if extra else "")
                     + "".join(f"\n  shape {b}" for b in bad))
  merged = {k: jnp.asarray(old[k], dtype=jnp.asarray(v).dtype) if k in old else v for k, v in new.items()}
  return traverse_util.unflatten_dict(merged, sep="/"), sorted(set(new) - set(old))

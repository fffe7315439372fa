"""Pictures of what a reducer did, drawn from the token state alone (no extra bookkeeping).

Every reduction composes `Tokens.index` [B, N0] (for each original token, the slot that now holds it, or -1 if
it was dropped), so the stage outputs of a forward pass are all a drawing needs:

  stages = vis.stage_tokens(model, params, images)        # [(block, Tokens)] after every reducing block
  vis.merge_map(images[0], stages[-1][1].index[0], ...)   # [H, W, 3]: each merged group in its mean colour
  vis.plot_stages(images[0], stages, model.grid(hw), "tome.png")   # one panel per reducer stage, as a PNG
  vis.heatmap(images[0], cls_attn_row, grid)              # a score per patch over the image

Merge maps follow ToMe's visualisation (Bolya et al., ICLR 2023, Fig. 4; `tome/vis.py`): every group of patches
that now lives in one slot is painted in the group's mean image colour, with a thin border where neighbouring
pixels belong to different groups; pruned patches are darkened. Large flat regions merging first (the
background) then show as large single-colour areas.
Tokenizer reconstructions against the number of tokens: `tokenizer_grid` (= tokcomp.tokenizers.evaluation.
reconstruction_grid).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from tokcomp.tokens import Tokens


def stage_tokens(model, params, images, **apply_kwargs) -> list[tuple[int, Tokens]]:
  """The token state after every block that runs a reducer: [(block index, Tokens)], in block order.

  `model` is a `tokcomp.models.vit.ViT` (its schedule decides which blocks reduce); `params` its variables.
  """
  from tokcomp.models.vit import Encoder1DBlock, unscanned  # models depend on vis's inputs, not the other way round

  model, params = unscanned(model, params)
  reducing = {f"encoderblock_{i}" for i, step in enumerate(model.plan(images.shape[1:3])[0]) if step is not None}
  @jax.jit
  def run(p, x):  # jitted: eager reducers dispatch op by op (7x slower on a tiny ViT)
    _, state = model.apply(p, x, capture_intermediates=lambda m, method: (
        method == "__call__" and isinstance(m, Encoder1DBlock) and m.name in reducing),
        mutable=["intermediates"], **apply_kwargs)
    return state.get("intermediates", {}).get("Transformer", {})  # nothing captured for a dense model

  found = run(params, images)
  out = [(int(name.rsplit("_", 1)[1]), found[name]["__call__"][0]) for name in found]
  return sorted(out, key=lambda t: t[0])


def _patch_groups(index: np.ndarray, grid: tuple[int, int], num_prefix: int) -> np.ndarray:
  """[gh, gw] slot id of every patch (-1: dropped), from a row of `Tokens.index` [N0]."""
  index = np.asarray(index)
  gh, gw = grid
  if index.ndim != 1 or index.shape[0] != num_prefix + gh * gw:
    raise ValueError(f"index shape {index.shape}: must be [num_prefix + gh*gw] = [{num_prefix + gh * gw}] "
                     f"for grid={grid}, num_prefix={num_prefix} (pass one image's row of Tokens.index)")
  return index[num_prefix:].reshape(gh, gw)


def _to_rgb(image) -> np.ndarray:
  image = np.asarray(image, np.float32)
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"image shape {image.shape}: must be [H, W, 1] or [H, W, 3]")
  lo, hi = float(image.min()), float(image.max())
  image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)  # any value range -> [0, 1]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def merge_map(image, index, grid: tuple[int, int], num_prefix: int = 1, border: bool = True,
              dropped_alpha: float = 0.25, min_side: int = 224,
              border_colour: Sequence[float] = (1.0, 0.35, 0.0)) -> np.ndarray:
  """[H, W, 3] in [0, 1]: every group of patches sharing a slot painted in the group's mean colour.

  image: [H, W, C] (C = 1 or 3, any range); index: one image's `Tokens.index` row [N0]; grid: the patch grid
  (gh, gw) of the original tokens, H and W multiples of it. Pruned patches (-1) keep dropped_alpha of their
  colour. Borders (one pixel of `border_colour`, orange by default: it shows on black and on white) mark where horizontally or vertically neighbouring pixels are in different
  groups; small images are first enlarged (nearest) to at least `min_side` pixels so the borders stay thin.
  """
  rgb = _to_rgb(image)
  up = max(1, -(-min_side // min(rgb.shape[:2])))
  rgb = np.repeat(np.repeat(rgb, up, axis=0), up, axis=1)
  h, w, _ = rgb.shape
  gh, gw = grid
  if h % gh or w % gw:
    raise ValueError(f"image {h}x{w}: must be a multiple of grid={grid}")
  groups = np.kron(_patch_groups(index, grid, num_prefix), np.ones((h // gh, w // gw), np.int64))  # [H, W]
  out = np.zeros_like(rgb)
  flat_groups = groups.reshape(-1)
  valid = flat_groups >= 0
  ids, inverse = np.unique(flat_groups[valid], return_inverse=True)
  sums = np.zeros((len(ids), 3))
  np.add.at(sums, inverse, rgb.reshape(-1, 3)[valid])
  counts = np.bincount(inverse, minlength=len(ids))[:, None]
  flat = out.reshape(-1, 3)
  flat[valid] = (sums / np.maximum(counts, 1))[inverse]
  flat[~valid] = dropped_alpha * rgb.reshape(-1, 3)[~valid]
  if border:
    edge = np.zeros((h, w), bool)
    edge[:, 1:] |= groups[:, 1:] != groups[:, :-1]  # the pixel right of / below a change
    edge[1:, :] |= groups[1:, :] != groups[:-1, :]
    out[edge] = np.asarray(border_colour, np.float32)
  return out


def heatmap(image, scores, grid: tuple[int, int], alpha: float = 0.6, cmap: str = "inferno") -> np.ndarray:
  """[H, W, 3]: a per-patch score ([gh*gw] or [gh, gw], e.g. the CLS attention row over the patches) min-max
  normalised, coloured by `cmap` and blended over the image."""
  import matplotlib
  rgb = _to_rgb(image)
  h, w, _ = rgb.shape
  gh, gw = grid
  scores = np.asarray(scores, np.float32)
  if scores.size != gh * gw:
    raise ValueError(f"scores has {scores.size} values: must be one per patch, gh*gw = {gh * gw}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores: must be finite")
  s = scores.reshape(gh, gw)
  s = (s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else np.zeros_like(s)
  colour = matplotlib.colormaps[cmap](np.kron(s, np.ones((h // gh, w // gw))))[..., :3]
  return (1 - alpha) * rgb + alpha * colour


def plot_stages(image, stages: Sequence[tuple[int, Tokens]], grid: tuple[int, int], path: str | None = None,
                example: int = 0, title: str = "") -> Any:
  """A matplotlib figure: the image, then one merge map per reducer stage (from `stage_tokens`), with the number
  of valid slots left. `grid` is the model's patch grid (`model.grid(image_hw)`). Saved as a PNG when `path` is
  given."""
  import matplotlib.pyplot as plt  # no backend forced: inline in notebooks, Agg when headless

  if not stages:
    raise ValueError("stages is empty: the model runs no reducer (pass stage_tokens of a reduced model)")
  fig, axes = plt.subplots(1, len(stages) + 1, figsize=(2.1 * (len(stages) + 1), 2.4), squeeze=False)
  axes[0, 0].imshow(_to_rgb(image))
  axes[0, 0].set_title("input", fontsize=8)
  for ax, (block, tokens) in zip(axes[0, 1:], stages):
    index = np.asarray(jax.device_get(tokens.index))[example]
    ax.imshow(merge_map(image, index, grid, tokens.num_protected))
    alive = int(np.asarray(tokens.mask)[example].sum())
    ax.set_title(f"after block {block}: {alive} tokens", fontsize=8)
  for ax in axes[0]:
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=120)
  return fig


def tokenizer_grid(*args, **kwargs):
  """Originals, then one row of reconstructions per kept length (see tokcomp.tokenizers.evaluation)."""
  from tokcomp.tokenizers.evaluation import reconstruction_grid
  return reconstruction_grid(*args, **kwargs)

"""HiRED: a fixed token budget split across the AnyRes views by early-layer [CLS] attention, then top-k per view
by final-layer [CLS] attention (Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
High-Resolution Vision-Language Models", AAAI 2025, arXiv:2408.10945, §3).

Views: the thumbnail (LLaVA-NeXT's base image) and C crops, n = h w patches each; a_l(v) = Σ_h A^(l)_h[cls, :]
over view v's patches (heads summed) at the early layer l = `early` or the feature layer f.
  T = int(V n budget) (V = C + 1; or budget itself when it is an int count)
  T_thumb = min(int(T alpha), n),  T_crops = min(T - T_thumb, C n)
  thumbnail: the T_thumb patches of highest a_f(thumb)
  crop budgets: M = the int(n (1 - alpha)) patches of highest a_early(thumb); c_i = |M ∩ R_i| for the thumbnail
    region R_i of crop i; T_i = min(floor(c_i / Σ c · T_crops), n)
  crop i: the T_i patches of highest a_f(crop i)
Regions: split="region" (default): crop i's area of the thumbnail on the crop arrangement layout="RxC" (default
         2x2, LLaVA-NeXT's most common; it fixes C and so the static count);
         split="raster": the i-th of C consecutive raster chunks of n / C thumbnail patches (what the official
         code's reshape to (rows, cols, -1) computes).
Count: capacity T_thumb + T_crops (static); the floors can leave up to C slots unused: they come last with
       mask false and hold nothing. "hired:budget=0.2,alpha=0.5" (the official script's defaults).
Order: thumbnail patches, then each crop's patches, each in original order (the reference's boolean masks);
       every view's prefix ([CLS]) is dropped. `index` runs over [thumbnail tokens, crop tokens] (AnyRes).
Signals: cls_attn of the crops (stacked views) and of the thumbnail, with layers 0..f (early defaults to 0, the
       official code's layer 0; its selection layer 22 of CLIP-L is our feature layer).
Parity: tests/goldens/hired_*.npz (tools/goldens/make_hired.py, hasanar1f/HiRED @ 502d6dd (MIT),
        `HiRED_token_selection` and `HiRED_sub_img_budgets` in its LLaVA-NeXT model file, on synthetic [CLS] rows):
        kept sets exact with split="raster" (tests/test_hired.py); tests/test_vlm_visual_refs.py checks a NumPy loop
        of the rules above (both splits).
Differences: batched with static capacity; the region split follows the paper where the official code uses
        raster chunks (split="raster" reproduces it).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from tokcomp import vlm
from tokcomp.tokens import batched_scatter
from tokcomp.vlm import _common

NAME = "hired"
SPLITS = ("region", "raster")


@dataclasses.dataclass(frozen=True)
class HiREDConfig:
  budget: int | float = 0.2  # total tokens kept: a fraction of all views' patches, or a count
  alpha: float = 0.5         # share of the budget for the thumbnail
  early: int = 0             # tower layer of the budget split
  split: str = "region"
  layout: tuple[int, int] = (2, 2)  # crop arrangement (rows, cols): C = rows * cols crops


def parse(args) -> HiREDConfig:
  a = _common.args(NAME, args, {"budget": 0.2, "alpha": 0.5, "early": 0, "split": "region", "layout": "2x2"})
  alpha = a["alpha"]
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
    raise ValueError(f"{NAME} alpha={alpha!r}: must be a number in [0, 1]")
  if a["split"] not in SPLITS:
    raise ValueError(f"{NAME} split={a['split']!r}: must be one of {SPLITS}")
  return HiREDConfig(budget=_common.budget(NAME, "budget", a["budget"]), alpha=float(alpha),
                     early=_common.integer(NAME, "early", a["early"], 0), split=a["split"],
                     layout=_common.target_grid(NAME, "layout", a["layout"]))


def budgets(config: HiREDConfig, n: int, crops: int) -> tuple[int, int]:
  """(T_thumb, T_crops) for n patches per view and C crops, computed as the official code (Python ints)."""
  views = crops + 1
  total = config.budget if isinstance(config.budget, int) else int(views * n * config.budget)
  if not 1 <= total <= views * n:
    raise ValueError(f"{NAME} budget={config.budget!r}: gives {total} tokens, must be in [1, {views * n}]")
  thumb = min(int(total * config.alpha), n)
  return thumb, min(total - thumb, crops * n)


def out_count(config: HiREDConfig, n: int) -> int:
  """n: the patches of all crops (C = rows * cols of `layout`)."""
  crops = config.layout[0] * config.layout[1]
  return sum(budgets(config, n // crops, crops))


def partition(config: HiREDConfig, grid, crops: int) -> np.ndarray:
  n = grid[0] * grid[1]
  if config.split == "raster":
    if n % crops:
      raise ValueError(f"{NAME} split=raster: {n} thumbnail patches do not split into {crops} equal chunks")
    return np.arange(n) // (n // crops)
  return _common.region_of(grid, config.layout)


def apply(signals: vlm.VisualSignals, *, config: HiREDConfig):
  crops, p, grid = _common.anyres_views(NAME, signals, config.layout)
  _common.require(NAME, signals, "cls_attn")
  _common.require(NAME, signals.thumbnail, "cls_attn")
  n, b, layers = grid[0] * grid[1], signals.x.shape[0], signals.cls_attn.shape[1]
  if not config.early < layers:
    raise ValueError(f"{NAME} early={config.early}: must be a tower layer in [0, {layers - 1}]")
  t_thumb, t_crops = budgets(config, n, crops)
  thumb_attn = signals.thumbnail.cls_attn.astype(jnp.float32)  # [B, L, H, P + n]
  crop_attn = signals.cls_attn[:, -1].astype(jnp.float32).reshape(b, -1, crops, p + n)  # [B, H, C, P + n]
  final_thumb = jnp.sum(thumb_attn[:, -1, :, p:], axis=1)  # [B, n]
  early_thumb = jnp.sum(thumb_attn[:, config.early, :, p:], axis=1)
  final_crop = jnp.sum(crop_attn[..., p:], axis=1)  # [B, C, n]

  def rank(score):  # position of every patch in its view's descending order (stable: lower index first)
    return jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1)

  keep_thumb = rank(final_thumb) < t_thumb  # [B, n]
  spatial = rank(early_thumb) < int(n * (1 - config.alpha))  # [B, n]
  part = jnp.asarray(partition(config, grid, crops))
  counts = batched_scatter(jnp.zeros((b, crops), jnp.float32), jnp.broadcast_to(part, (b, n)),
                           spatial.astype(jnp.float32), "add")
  total = jnp.sum(counts, axis=1, keepdims=True)
  share = jnp.where(total > 0, counts / jnp.where(total > 0, total, 1.0), 0.0)
  per_crop = jnp.minimum(jnp.floor(share * t_crops).astype(jnp.int32), n)  # [B, C]
  keep_crop = rank(final_crop) < per_crop[:, :, None]  # [B, C, n]

  def with_prefix(keep):  # [..., n] -> [..., P + n], prefix never kept
    return jnp.concatenate([jnp.zeros(keep.shape[:-1] + (p,), bool), keep], axis=-1)

  valid = jnp.concatenate([with_prefix(keep_thumb), with_prefix(keep_crop).reshape(b, -1)], axis=1)
  return _common.anyres_tokens(signals).compact(valid, t_thumb + t_crops)


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count,
                        needs=("cls_attn", "thumbnail"), example="hired:budget=0.3,alpha=0.4,layout=1x2"))

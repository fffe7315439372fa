"""GlobalCom²: the thumbnail as "commander" of the crops' compression in AnyRes models (Liu et al., "Global
Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution Large Vision-Language Models",
AAAI 2026, arXiv:2501.05179, §4).

Views: a thumbnail and C crops (arrangement layout="RxC", default 2x2), n = h w patches each; s(v) = the
head-mean [CLS] attention row of view v over its patches at the feature layer; r = `keep`.
  thumbnail: the int(n r) patches of highest s(thumb)
  crop retention: S_i = Σ_{j in R_i} s(thumb)_j over crop i's region R_i of the thumbnail;
                  σ = softmax(S / temperature); r_i = min(r (1 + σ_i - mean σ), 1); k_i = int(n r_i)
  crop i: the k_i patches of highest  s(crop i) / ||s(crop i)||_2 + g_i / ||g_i||_2, with g_i the thumbnail
          score map bilinearly resized (half-pixel centres, torch's align_corners=False) to the R h x C w
          stitched-crop grid and cut to crop i's block
Count: capacity int(n r) + min(C n, floor(C n r)) (static; Σ k_i <= C n r); slots the floors leave unused come
       last with mask false. "globalcom2:keep=0.25" (the official default), temperature=10.
Order: thumbnail patches, then each crop's patches, each in original order; every view's prefix is dropped.
       `index` runs over [thumbnail tokens, crop tokens] (AnyRes).
Signals: thumbnail and crops' cls_attn (or cls_logits with score=logits), last layer.
Scores: score="attn" (default) s = the head-mean softmax CLS row (`cls_attn`); score="logits" s = the head mean of
        the PRE-softmax CLS logits (`cls_logits`), what the official patched CLIP attention returns.
Parity: tests/goldens/globalcom2_*.npz (tools/goldens/make_globalcom2.py, xuyang-liu16/GlobalCom2 @ 96b2d00,
        `llava/model/llava_arch.py`: `compress_thumbnail`, `generate_scale_for_crop_features`,
        `interpolate_and_split_cls_attn_scores`, `select_topk_crop_features` on synthetic logits): thumbnail and
        per-crop kept sets exact with score=logits (tests/test_globalcom2.py); tests/test_vlm_visual_refs.py checks
        a NumPy loop of the rules above.
Differences: (1) score="attn" (the default, as the tower fills cls_attn today) ranks by probabilities where the
        reference ranks by logits (the choice can differ; the golden shows it does). The crop ratios are computed
        in fp32 (the reference: float64 NumPy with +1e-8 in the softmax denominator): int(n r_i) can differ when
        n r_i lies within ~1e-6 of an integer (the goldens keep >= 5e-3 away).
        (2) LLaVA-NeXT's "unpad" crop trimming is not
        modelled: every crop patch is valid (static shapes). (3) The official thumbnail keeps its tokens in
        descending score order and lays the crops out on the stitched grid with newline tokens; here every view
        is in original order and the stitched layout is left to the consumer (`index` has the positions).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp import vlm
from tokcomp.ops.merge import normalize
from tokcomp.tokens import batched_scatter
from tokcomp.vlm import _common

NAME = "globalcom2"
SCORES = ("attn", "logits")


@dataclasses.dataclass(frozen=True)
class GlobalComConfig:
  keep: float = 0.25          # base retention ratio r
  temperature: float = 10.0   # softmax temperature of the crop scores
  layout: tuple[int, int] = (2, 2)
  score: str = "attn"         # "attn": head-mean softmax CLS row; "logits": head-mean pre-softmax row (official)


def parse(args) -> GlobalComConfig:
  a = _common.args(NAME, args, {"keep": 0.25, "temperature": 10.0, "layout": "2x2", "score": "attn"})
  if a["score"] not in SCORES:
    raise ValueError(f"{NAME} score={a['score']!r}: must be one of {SCORES}")
  keep = a["keep"]
  if isinstance(keep, bool) or not isinstance(keep, float) or not 0.0 < keep <= 1.0:
    raise ValueError(f"{NAME} keep={keep!r}: must be a float retention ratio in (0, 1]")
  t = a["temperature"]
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
    raise ValueError(f"{NAME} temperature={t!r}: must be a number > 0")
  return GlobalComConfig(keep=keep, temperature=float(t), layout=_common.target_grid(NAME, "layout", a["layout"]),
                         score=a["score"])


def capacities(config: GlobalComConfig, n: int, crops: int) -> tuple[int, int]:
  thumb = int(n * config.keep)
  if thumb < 1:
    raise ValueError(f"{NAME} keep={config.keep}: keeps int({n} * {config.keep}) = 0 thumbnail patches; must be >= 1")
  return thumb, min(crops * n, int(math.floor(crops * n * config.keep + 1e-6)))


def out_count(config: GlobalComConfig, n: int) -> int:
  """n: the patches of all crops (C = rows * cols of `layout`)."""
  crops = config.layout[0] * config.layout[1]
  return sum(capacities(config, n // crops, crops))


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] 1D linear interpolation, torch's align_corners=False (source clamped at 0 and n_in - 1)."""
  out = np.zeros((n_out, n_in))
  for i in range(n_out):
    src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = min(int(np.floor(src)), n_in - 1)
    hi = min(lo + 1, n_in - 1)
    lam = src - lo
    out[i, lo] += 1.0 - lam
    out[i, hi] += lam
  return out


def crop_guides(grid: tuple[int, int], arrangement: tuple[int, int]) -> np.ndarray:
  """[C, n, n] float32: thumbnail scores [n] -> each crop's block of the resized map, raster order."""
  (h, w), (gh, gw) = grid, arrangement
  big = np.kron(bilinear_matrix(h, gh * h), bilinear_matrix(w, gw * w))  # [(gh h)(gw w), h w]
  big = big.reshape(gh, h, gw, w, h * w).transpose(0, 2, 1, 3, 4)  # [gh, gw, h, w, hw]
  return big.reshape(gh * gw, h * w, h * w).astype(np.float32)


def apply(signals: vlm.VisualSignals, *, config: GlobalComConfig):
  crops, p, grid = _common.anyres_views(NAME, signals, config.layout)
  field = "cls_attn" if config.score == "attn" else "cls_logits"
  _common.require(NAME, signals, field)
  _common.require(NAME, signals.thumbnail, field)
  n, b = grid[0] * grid[1], signals.x.shape[0]
  t_thumb, t_crops = capacities(config, n, crops)
  rows, thumb_rows = getattr(signals, field), getattr(signals.thumbnail, field)
  thumb = jnp.mean(thumb_rows[:, -1, :, p:].astype(jnp.float32), axis=1)  # [B, n]
  crop = jnp.mean(rows[:, -1].astype(jnp.float32).reshape(b, -1, crops, p + n)[..., p:], axis=1)

  def rank(score):  # position in the view's descending order (stable)
    return jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1)

  keep_thumb = rank(thumb) < t_thumb
  region = jnp.asarray(_common.region_of(grid, config.layout))
  sums = batched_scatter(jnp.zeros((b, crops), jnp.float32), jnp.broadcast_to(region, (b, n)), thumb, "add")
  sigma = jax.nn.softmax(sums / config.temperature, axis=1)
  ratio = jnp.minimum(config.keep * (1.0 + sigma - jnp.mean(sigma, axis=1, keepdims=True)), 1.0)
  k = jnp.floor(n * ratio).astype(jnp.int32)  # [B, C]
  guide = jnp.einsum("cmn,bn->bcm", jnp.asarray(crop_guides(grid, config.layout)), thumb,
                     precision=jax.lax.Precision.HIGHEST)  # [B, C, n]
  score = normalize(crop) + normalize(guide)
  keep_crop = rank(score) < k[:, :, None]

  def with_prefix(keep):
    return jnp.concatenate([jnp.zeros(keep.shape[:-1] + (p,), bool), keep], axis=-1)

  valid = jnp.concatenate([with_prefix(keep_thumb), with_prefix(keep_crop).reshape(b, -1)], axis=1)
  return _common.anyres_tokens(signals).compact(valid, t_thumb + t_crops)


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count,
                        needs=("cls_attn", "thumbnail"), example="globalcom2:keep=0.3,layout=1x2"))

"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity (Yang et al.,
CVPR 2025, arXiv:2412.04467, §3.2), on the vision tower's feature layer, before the projector.

Dominant: s_n = Σ_h A_h[cls, n] over the patches n (the feature layer's CLS attention row, summed over heads);
the kd = dominant - P highest-scoring patches are kept, with the P prefix tokens (CLIP's CLS).
Contextual: the M = n - kd remaining patches in their original order; targets are the remaining patches at
positions 0, s, 2s, ... (s = max(1, M // contextual)), the first `contextual` of them. Every other remaining patch
joins the target of highest cosine similarity of the head-mean keys k̄ (argmax, lowest index on ties), and
    c_j = x_{t_j} + (1 / |G_j|) Σ_{i in G_j} x_i        (an empty group adds nothing).
Count: P + n patches -> dominant + contextual (the public `dominant` counts the prefix, as the reference's:
       "visionzip:dominant=54,contextual=10" gives 64 tokens). Needs 0 <= dominant - P <= n and
       1 <= contextual <= n - (dominant - P), else ValueError (the reference fails with a shape error).
Order: prefix, dominant patches in original order, contextual tokens in target order (the reference's).
       `index` sends each merged patch to its contextual token; sizes count 1 + |G_j| there.
Signals: cls_attn (only its last layer, the feature layer) and keys.
Parity: tests/goldens/visionzip_*.npz (tools/goldens/make_visionzip.py, dvlab-research/VisionZip @ 3151f6d,
        `CLIPVisionTower_VisionZip.forward` called on the same arrays at batch 1, sample by sample).
Differences: none in the output. The reference also returns the kept indices in top-k order; `index` holds the
        same information. The mean is taken as Σ (x_i / |G_j|) (one scatter) rather than (Σ x_i) / |G_j|
        (rounding only).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp import vlm
from tokcomp.ops.merge import normalize
from tokcomp.tokens import batched_scatter
from tokcomp.vlm import _common

NAME = "visionzip"


@dataclasses.dataclass(frozen=True)
class VisionZipConfig:
  dominant: int    # tokens kept by [CLS] attention, prefix included
  contextual: int  # merged tokens


def parse(args) -> VisionZipConfig:
  a = _common.args(NAME, args, {"dominant": None, "contextual": None}, required=("dominant", "contextual"))
  return VisionZipConfig(dominant=_common.integer(NAME, "dominant", a["dominant"], 1),
                         contextual=_common.integer(NAME, "contextual", a["contextual"], 1))


def out_count(config: VisionZipConfig, n: int) -> int:
  return config.dominant + config.contextual


def targets(m: int, contextual: int) -> np.ndarray:
  """Positions (among the M remaining patches) of the contextual targets: every step-th, the first `contextual`."""
  step = max(1, m // contextual)
  return np.arange(0, m, step)[:contextual]


def apply(signals: vlm.VisualSignals, *, config: VisionZipConfig):
  _common.require(NAME, signals, "cls_attn", "keys")
  p, n = signals.num_prefix, _common.num_patches(signals)
  if p < 1:
    raise ValueError(f"{NAME} needs a [CLS] prefix token (VisualSignals.num_prefix={p})")
  kd, c = config.dominant - p, config.contextual
  if not 0 <= kd <= n:
    raise ValueError(f"{NAME} dominant={config.dominant}: must be in [{p}, {p + n}] (prefix {p} + {n} patches)")
  m = n - kd
  if not 1 <= c <= m:
    raise ValueError(f"{NAME} contextual={c}: must be in [1, {m}] (the patches left after {kd} dominant ones)")
  b = signals.x.shape[0]

  # Dominant: the CLS row of the feature layer, summed over heads.
  score = jnp.sum(signals.cls_attn[:, -1, :, p:].astype(jnp.float32), axis=1)  # [B, n]
  dominant = _common.topk_ascending(score, kd)  # [B, kd] patch indices
  is_dominant = batched_scatter(jnp.zeros((b, n), bool), dominant, True)
  rest = jnp.argsort(is_dominant.astype(jnp.int32), axis=1, stable=True)[:, :m].astype(jnp.int32)  # by position

  # Contextual: static target positions in the remaining list; the others go to their most similar target.
  t = targets(m, c)
  others = np.setdiff1d(np.arange(m), t)
  keys = normalize(signals.keys[:, p:])
  rest_keys = jnp.take_along_axis(keys, rest[..., None], axis=1)  # [B, M, d]
  sim = jnp.einsum("bid,bjd->bij", rest_keys[:, others], rest_keys[:, t], precision=jax.lax.Precision.HIGHEST)
  group = jnp.argmax(sim, axis=-1).astype(jnp.int32)  # [B, M - c] target of each merged patch
  count = batched_scatter(jnp.zeros((b, c), jnp.float32), group, 1.0, "add")
  share = 1.0 / jnp.maximum(jnp.take_along_axis(count, group, axis=1), 1.0)

  # One reassign over the original slots: dest (-1 none) and weight (1, or 1/|G| for a merged patch).
  dest = jnp.full((b, p + n), -1, jnp.int32).at[:, :p].set(jnp.arange(p, dtype=jnp.int32))
  weight = jnp.ones((b, p + n), jnp.float32)
  dest = batched_scatter(dest, p + dominant, p + jnp.arange(kd, dtype=jnp.int32))
  dest = batched_scatter(dest, p + rest[:, t], p + kd + jnp.arange(c, dtype=jnp.int32))
  dest = batched_scatter(dest, p + rest[:, others], p + kd + group)
  weight = batched_scatter(weight, p + rest[:, others], share)
  return _common.start(signals).reassign(dest, p + kd + c, weight=weight, normalize=False)


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count,
                        needs=("cls_attn", "keys"), example="visionzip:dominant=9,contextual=6"))

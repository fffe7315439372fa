"""Sampling: deterministic inverse-transform sampling of slots by a score distribution, with a static count.

`inverse_transform_sample` turns non-negative scores over M slots into a pick mask [B, M]: the scores are
normalised into a distribution, sorted ascending, accumulated into a CDF, and each of `num_samples` evenly
spaced points on the CDF's y-axis picks the slot whose CDF value is nearest. A slot picked by several points
counts once, so the number of picked slots is data-dependent but at most min(num_samples, valid slots): a
static capacity of that size never loses a pick. This is the sampling rule of ATS (Fayyaz et al., ECCV 2022,
arXiv:2111.15667, §3), exactly as the official code places the points (see the function's docstring).

Everything is per example (sort, cumulative sum and argmin along the slot axis, one batched scatter), so a
batch-sharded jit runs it without collectives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcomp.tokens import batched_scatter


def normalized_cdf(score: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Ascending sort order [B, M] and the min-max normalised CDF [B, M] of `score` restricted to `valid`.

  p_m = s_m / sum_valid s (invalid slots score 0 and sort first), sorted ascending with a stable sort;
  c = cumsum(p_sorted); c' = (c - min c) / (max c - min c), so c' runs from 0 to exactly 1. As in the official
  ATS code the minimum subtracted is c_0: 0 when some slot is invalid (or scores 0), else the smallest score,
  whose slot then sits at c' = 0 and can never be picked. A zero range (no positive score) gives all zeros.
  """
  s = jnp.where(valid, score.astype(jnp.float32), 0.0)
  total = jnp.sum(s, axis=1, keepdims=True)
  s = s / jnp.where(total > 0, total, 1.0)
  order = jnp.argsort(s, axis=1, stable=True)
  cdf = jnp.cumsum(jnp.take_along_axis(s, order, axis=1), axis=1)
  lo, hi = jnp.min(cdf, axis=1, keepdims=True), jnp.max(cdf, axis=1, keepdims=True)
  return order, (cdf - lo) / jnp.where(hi > lo, hi - lo, 1.0)


def sample_points(cdf: jax.Array, num_samples: int) -> jax.Array:
  """The official ATS sample points [B, S] on the CDF's y-axis (`create_ys`): S evenly spaced values from the
  smallest positive CDF value y_0 to 1, y_i = y_0 + (i - y_0 i) / (S - 1), computed as the reference does
  (linspace(0, 1, S) * (S - 1) in place of i). S = 1 gives the single point 1 (the reference divides by zero)."""
  if num_samples < 1:
    raise ValueError(f"inverse_transform_sample num_samples={num_samples}: must be >= 1")
  b = cdf.shape[0]
  if num_samples == 1:
    return jnp.ones((b, 1), jnp.float32)
  positive = cdf > 0
  start = jnp.min(jnp.where(positive, cdf, jnp.inf), axis=1, keepdims=True)
  start = jnp.where(jnp.any(positive, axis=1, keepdims=True), start, 1.0)
  span = num_samples - 1
  grid = jnp.linspace(0.0, 1.0, num_samples, dtype=jnp.float32)[None, :] * span
  steps = jnp.arange(num_samples, dtype=jnp.float32)[None, :]
  return start + (grid - start * steps) / span


def inverse_transform_sample(score: jax.Array, valid: jax.Array, num_samples: int) -> jax.Array:
  """Picks slots by inverse-transform sampling of `score` [B, M] (>= 0) over the `valid` [B, M] slots.

  Each point y_i of `sample_points` picks the sorted position argmin_j |y_i - c'_j| (the first such j on an
  exact tie, as torch.min), mapped back through the sort to its slot. Returns the pick mask [B, M]; picked
  slots are always valid, duplicates collapse, and at most min(num_samples, valid count) slots are true.
  Cost per example: a sort of M plus an S x M distance table (no D factor).
  """
  if score.shape != valid.shape or score.ndim != 2:
    raise ValueError(f"inverse_transform_sample: score {score.shape} and valid {valid.shape} must both be [B, M]")
  order, cdf = normalized_cdf(score, valid)
  ys = sample_points(cdf, num_samples)  # [B, S]
  nearest = jnp.argmin(jnp.abs(ys[:, :, None] - cdf[:, None, :]), axis=2)  # [B, S] sorted positions
  slots = jnp.take_along_axis(order, nearest, axis=1)
  return batched_scatter(jnp.zeros(valid.shape, bool), slots, True) & valid

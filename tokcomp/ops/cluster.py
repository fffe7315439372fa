"""Soft k-means of a patch grid into a coarser grid of centres, and the top-k relation that maps back.

The building blocks of Liang et al.'s token clustering and reconstruction layers (NeurIPS 2022,
arXiv:2210.01035, §3); `tokcomp/reducers/cluster.py` and `tokcomp/models/dense.py` put them together.
Everything that depends only on the grid sizes (the pooling matrix, the locality mask) is a NumPy constant
built at trace time; everything else is per example with the batch as the leading axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def adaptive_pool_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
  """[M, N] averaging weights of 2D adaptive average pooling from an h x w grid to h' x w' (raster order).

  Output cell (i, j) averages rows [floor(i h / h'), ceil((i + 1) h / h')) and the same for columns, as
  torch's `adaptive_avg_pool2d`; when h' does not divide h neighbouring cells overlap.
  """
  (h, w), (oh, ow) = in_hw, out_hw
  if not (1 <= oh <= h and 1 <= ow <= w):
    raise ValueError(f"cluster grid {oh}x{ow}: must be between 1x1 and the patch grid {h}x{w}")

  def bins(n_in, n_out):
    out = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
      lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
      out[i, lo:hi] = 1.0 / (hi - lo)
    return out

  return np.kron(bins(h, oh), bins(w, ow)).astype(np.float32)


def initial_cells(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
  """[N] the h' x w' cell each patch starts in: nearest-neighbour upsampling of the cell grid,
  cell row floor(r h' / h), column floor(c w' / w)."""
  (h, w), (oh, ow) = in_hw, out_hw
  r, c = np.divmod(np.arange(h * w), w)
  return ((r * oh) // h) * ow + (c * ow) // w


def locality_mask(in_hw: tuple[int, int], out_hw: tuple[int, int], window: int) -> np.ndarray:
  """[N, M] bool: patch n may join centre m when m's cell is within (window - 1) / 2 cells of n's initial
  cell, in rows and in columns (a window x window neighbourhood on the cell grid)."""
  if window < 1 or window % 2 == 0:
    raise ValueError(f"cluster lam={window}: the neighbourhood window must be an odd int >= 1")
  radius = window // 2
  ow = out_hw[1]
  cell = initial_cells(in_hw, out_hw)
  m = np.arange(out_hw[0] * ow)
  d_row = np.abs(cell[:, None] // ow - m[None, :] // ow)
  d_col = np.abs(cell[:, None] % ow - m[None, :] % ow)
  return (d_row <= radius) & (d_col <= radius)


def squared_distances(x: jax.Array, c: jax.Array) -> jax.Array:
  """[B, N, M] ||x_n - c_m||^2 for x [B, N, D], c [B, M, D], in fp32, expanded as |x|^2 + |c|^2 - 2 x.c
  (the reference's form: one matmul, and the same rounding)."""
  x, c = x.astype(jnp.float32), c.astype(jnp.float32)
  return (jnp.sum(x * x, -1)[:, :, None] + jnp.sum(c * c, -1)[:, None, :]
          - 2.0 * jnp.einsum("bnd,bmd->bnm", x, c))


def soft_kmeans(x: jax.Array, weight: jax.Array, centres: jax.Array, allowed: np.ndarray, tau: float,
                iters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Locality-constrained soft k-means. x [B, N, D], token weights [B, N], initial centres [B, M, D],
  allowed [N, M]. Each iteration:

    a_nm = softmax_m over allowed m of (-tau ||x_n - c_m||^2)
    c_m  = sum_n a_nm w_n x_n / max(sum_n a_nm w_n, 1e-16)

  Returns the centres after `iters` updates, their soft mass sum_n a_nm w_n [B, M] from the last update,
  and the hard assignment [B, N]: the nearest final centre over all M (no locality), as the reference.
  """
  if iters < 1:
    raise ValueError(f"cluster iters={iters}: must be an int >= 1")
  allowed = jnp.asarray(allowed)
  x32, w = x.astype(jnp.float32), weight.astype(jnp.float32)
  c, mass = centres.astype(jnp.float32), None
  for _ in range(iters):
    logits = jnp.where(allowed, -tau * squared_distances(x32, c), -jnp.inf)
    a = jax.nn.softmax(logits, axis=-1) * w[:, :, None]  # [B, N, M]; every row has its own cell allowed
    mass = jnp.sum(a, axis=1)
    c = jnp.einsum("bnm,bnd->bmd", a, x32) / jnp.maximum(mass, 1e-16)[:, :, None]
  hard = jnp.argmin(squared_distances(x32, c), axis=-1).astype(jnp.int32)
  return c.astype(x.dtype), mass, hard


def topk_relation(x: jax.Array, centres: jax.Array, k: int, tau: float, norm: str = "l2") -> jax.Array:
  """[B, N, M] reconstruction weights of every token x_n [B, N, D] over the centres [B, M, D].

    s_nm = exp(-tau ||x_n - c_m||^2), kept where s_nm >= the k-th largest s_n. (ties all kept), zero elsewhere,
    r_n  = s_n / max(||s_n||_2, 1e-12)   (norm="l2": over m, the reference's F.normalize; its entries sum
                                          to between 1 and sqrt(k), so x̂ is scaled up where weights are even)
    r_n  = s_n / sum_m s_nm               (norm="l1": a convex combination of the centres' tokens)

  s_n is computed shifted by its row maximum, exp(-tau (d_nm - min_m d_nm)): the l2 normalisation is
  scale-free, so this is the same r_n, and a far token cannot underflow to an all-zero row. The k-th largest
  comes from a sort over the M centres (no `lax.top_k`).
  """
  m = centres.shape[1]
  if norm not in ("l1", "l2"):
    raise ValueError(f"reconstruction norm={norm!r}: must be 'l2' (the reference) or 'l1'")
  if not 1 <= k <= m:
    raise ValueError(f"reconstruction k={k}: must be in [1, {m}] (the number of clusters)")
  logits = -tau * squared_distances(x, centres)
  s = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  kth = jnp.sort(s, axis=-1)[:, :, m - k:m - k + 1]
  s = jnp.where(s >= kth, s, 0.0)
  if norm == "l1":
    return s / jnp.sum(s, axis=-1, keepdims=True)  # >= 1: the row maximum is exp(0)
  return s / jnp.maximum(jnp.linalg.norm(s, axis=-1, keepdims=True), 1e-12)


def reconstruct(relation: jax.Array, low: jax.Array) -> jax.Array:
  """High-resolution tokens [B, N, D] = relation [B, N, M] @ low-resolution tokens [B, M, D]."""
  return jnp.einsum("bnm,bmd->bnd", relation, low.astype(jnp.float32)).astype(low.dtype)

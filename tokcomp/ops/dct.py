"""The orthonormal DCT-II as a matrix, and the low-pass resize of a patch grid it gives.

  C_n[k, i] = sqrt((2 - δ_k0) / n) cos(π (2 i + 1) k / (2 n))      (C_n C_nᵀ = I)

A 2D map X [h, w] has the spectrum C_h X C_wᵀ. The low-pass resize to h' x w' keeps the h' x w' lowest
frequencies and transforms them back with the smaller inverse,

  Y = sqrt(h' w' / (h w)) C_h'ᵀ (C_h X C_wᵀ)[:h', :w'] C_w',

so a constant map stays the same constant (the DC coefficient scales with sqrt(size)). On raster-ordered tokens
this is one static matrix R [h' w', h w] = kron(R_h, R_w) with R_n = sqrt(n'/n) C_n'ᵀ C_n[:n'], applied per
channel: a [h'w', hw] x [hw, D] product per example (the FFT-based DCT of the papers computes the same numbers).
"""
from __future__ import annotations

import numpy as np


def dct_matrix(n: int) -> np.ndarray:
  """[n, n] orthonormal DCT-II (float64)."""
  k, i = np.arange(n)[:, None], np.arange(n)[None, :]
  c = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
  c[0] /= np.sqrt(2.0)
  return c


def lowpass_resize_1d(n: int, m: int) -> np.ndarray:
  """[m, n]: keep the m lowest DCT frequencies of a length-n signal, back to m samples (DC preserved)."""
  if not 1 <= m <= n:
    raise ValueError(f"DCT low-pass size {m}: must be in [1, {n}]")
  return np.sqrt(m / n) * dct_matrix(m).T @ dct_matrix(n)[:m]


def lowpass_resize_matrix(in_hw: tuple[int, int], out_hw: tuple[int, int]) -> np.ndarray:
  """[h' w', h w] float32: the 2D low-pass resize of a raster-ordered grid."""
  return np.kron(lowpass_resize_1d(in_hw[0], out_hw[0]), lowpass_resize_1d(in_hw[1], out_hw[1])).astype(np.float32)

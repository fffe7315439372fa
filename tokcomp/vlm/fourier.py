"""Fourier-VLM: low-pass compression of the patch grid in the 2D DCT domain (Wang et al., "Fourier-VLM:
Compressing Vision Tokens in the Frequency Domain for Large Vision-Language Models", arXiv:2508.06038).

Per channel, the h x w map of patch features X goes to its orthonormal 2D DCT-II spectrum C_h X C_wᵀ; only the
h' x w' lowest frequencies are kept and brought back to an h' x w' grid of tokens with the smaller inverse DCT,
  Y = sqrt(h' w' / (h w)) C_h'ᵀ (C_h X C_wᵀ)[:h', :w'] C_w'
(`ops.dct.lowpass_resize_matrix`: one static [h'w', hw] matrix, so a batched matmul; a constant map is kept).
Count: P + h w -> h' w': "fourier:grid=12" or "fourier:grid=8x6", 1 <= h' <= h, 1 <= w' <= w (ValueError).
Order: raster order of the h' x w' grid. The prefix ([CLS]) is dropped (LLaVA's patch features).
       `index` sends patch (r, c) to the output cell (floor(r h'/h), floor(c w'/w)) (every output token mixes
       all patches; this is the cell that covers it), and size counts those patches.
Signals: x and grid.
Parity: no public code was found; only the abstract could be read (2D DCT low-pass via FFT, no parameters), so
        the exact normalisation and where the inverse transform happens are our reading: the sqrt(h'w'/hw)
        scale keeps the DC (mean) feature. tests/test_vlm_visual_refs.py checks a NumPy loop of the
        equation above against scipy-free cosine sums.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.ops import dct
from tokcomp.vlm import _common

NAME = "fourier"


@dataclasses.dataclass(frozen=True)
class FourierConfig:
  grid: tuple[int, int]  # the low-pass grid (h', w')


def parse(args) -> FourierConfig:
  a = _common.args(NAME, args, {"grid": None}, required=("grid",))
  return FourierConfig(grid=_common.target_grid(NAME, "grid", a["grid"]))


def out_count(config: FourierConfig, n: int) -> int:
  return config.grid[0] * config.grid[1]


def apply(signals: vlm.VisualSignals, *, config: FourierConfig):
  h, w = _common.grid_of(NAME, signals)
  oh, ow = config.grid
  if not (oh <= h and ow <= w):
    raise ValueError(f"{NAME} grid={oh}x{ow}: must fit in the patch grid {h}x{w}")
  resize = jnp.asarray(dct.lowpass_resize_matrix((h, w), (oh, ow)))  # [h'w', hw]
  patches = signals.x[:, signals.num_prefix:]
  y = jnp.einsum("mn,bnd->bmd", resize, patches.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST).astype(signals.x.dtype)
  tokens = _common.start(signals).reassign(_common.grid_dest(signals, (oh, ow)), oh * ow)
  return tokens.replace(x=y, num_protected=0)


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count, needs=(),
                        example="fourier:grid=4x3"))

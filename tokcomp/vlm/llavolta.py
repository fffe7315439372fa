"""LLaVolta / M3: average pooling of the patch grid to a coarser grid, the nested granularities of Matryoshka
Multimodal Models (Cai et al., "Matryoshka Multimodal Models", arXiv:2405.17430, §3: 24x24 -> 12x12 -> 6x6 ->
3x3 -> 1x1 by 2D average pooling of CLIP's patch grid) and the visual-context compressor of LLaVolta (Chen et
al., "Efficient Large Multi-modal Models via Visual Context Compression", NeurIPS 2024, arXiv:2406.20092, §3.2,
average pooling of the visual tokens).

  y_(i, j) = (1 / s_h s_w) Σ_{r < s_h, c < s_w} x_(i s_h + r, j s_w + c),   s = (h / h', w / w')

Count: P + h w -> h' w': "llavolta:grid=12" (a G x G target) or "llavolta:grid=6x4"; h' must divide h and w'
       divide w (average pooling with kernel = stride, as M3), else ValueError. Pooling the original grid straight
       to h' x w' equals pooling level by level (24 -> 12 -> 6): every level averages equal-size cells.
Order: raster order of the pooled grid. The prefix ([CLS]) is dropped (LLaVA's patch features).
Signals: x and grid.
Parity: no golden (M3's and LLaVolta's code were not run here); tests/test_vlm_visual_refs.py checks a NumPy
        loop of the equation above.
Differences: pre-LLM only. LLaVolta pools inside the LLM at a chosen layer and in stages during training
        (its 1D pooling of the token sequence); here the tower's patch grid is pooled in 2D, M3's form.
"""
from __future__ import annotations

import dataclasses

from tokcomp import vlm
from tokcomp.vlm import _common

NAME = "llavolta"


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  grid: tuple[int, int]  # the pooled grid (h', w')


def parse(args) -> PoolConfig:
  a = _common.args(NAME, args, {"grid": None}, required=("grid",))
  return PoolConfig(grid=_common.target_grid(NAME, "grid", a["grid"]))


def out_count(config: PoolConfig, n: int) -> int:
  return config.grid[0] * config.grid[1]


def apply(signals: vlm.VisualSignals, *, config: PoolConfig):
  h, w = _common.grid_of(NAME, signals)
  oh, ow = config.grid
  if not (oh <= h and ow <= w and h % oh == 0 and w % ow == 0):
    raise ValueError(f"{NAME} grid={oh}x{ow}: each side must divide the patch grid {h}x{w}")
  return _common.start(signals).reassign(_common.grid_dest(signals, (oh, ow)), oh * ow).replace(num_protected=0)


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count, needs=(),
                        example="llavolta:grid=3"))

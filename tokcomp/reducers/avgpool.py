"""2D average pooling of the patch grid: the fixed spatial baseline (as in PiT/pooling ViTs, Heo et al. 2021).

x'_m = mean of the patches in the m-th stride x stride window (size-weighted); the prefix is untouched.
Count: P + h*w -> P + ceil(h/s) * ceil(w/s).  Order: prefix, then pooled windows in raster order.
Needs the full grid: only before any other reduction.
"""
from __future__ import annotations

import dataclasses

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.pool import grid_pool_dest
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class AvgPoolConfig:
  stride: int = 2


def reduce(tokens: Tokens, signals: Signals, *, config: AvgPoolConfig) -> Tokens:
  del signals
  dest, num_out, grid = grid_pool_dest(tokens, config.stride)
  return tokens.reassign(dest, num_out).replace(grid=grid)


def _build(args, depth):
  args = reducers.check_args("avgpool", args, {"stride": 2, "layers": "4"})
  stride = args["stride"]
  if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
    raise ValueError(f"avgpool stride={stride!r}: must be an int >= 1")
  layers = schedules.parse_layers(args["layers"], depth, "avgpool layers")
  return tuple(schedules.Step("avgpool", AvgPoolConfig(stride)) if i in layers else None for i in range(depth))


def _out_count(config: AvgPoolConfig, n: int, protected: int) -> int:
  side = int(round((n - protected) ** 0.5))
  if side * side != n - protected:
    raise ValueError(f"avgpool: {n - protected} patches are not a square grid; pool before other reducers")
  return protected + (-(-side // config.stride)) ** 2


reducers.register(reducers.Method(
    name="avgpool", reduce=reduce, signals=(), build=_build, out_count=_out_count,
    example="avgpool:stride=2,layers=1"))

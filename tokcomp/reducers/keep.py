"""Shared argument handling for the keep-rate family (EViT, top-k, random drop): a rate at chosen blocks."""
from __future__ import annotations

import dataclasses
from typing import Any

from tokcomp import reducers, schedules


@dataclasses.dataclass(frozen=True)
class KeepConfig:
  keep: float          # fraction of the reducible tokens kept: k = ceil(keep * (N - protected))
  fuse: bool = False   # EViT: add one token that fuses the dropped ones
  seed: int = 0        # random drop only


def check_keep(method: str, keep: Any) -> float:
  if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
    raise ValueError(f"{method} keep={keep!r}: must be a rate in (0, 1]")
  return float(keep)


def build(method: str, defaults: dict[str, Any]):
  """A `Method.build` for "keep=0.7,layers=3-6-9" (plus method-specific defaults)."""
  def _build(args, depth):
    args = reducers.check_args(method, args, {"keep": None, "layers": "3-6-9", **defaults})
    keep = check_keep(method, args.pop("keep"))
    layers = schedules.parse_layers(args.pop("layers"), depth, f"{method} layers")
    config = KeepConfig(keep, **args)
    return tuple(schedules.Step(method, config) if i in layers else None for i in range(depth))
  return _build


def kept_count(config: KeepConfig, n: int, protected: int) -> int:
  """EViT's count rule: ceil(keep * (N - protected)) reducible tokens kept (Python floats, as EViT)."""
  return schedules.ceil_count(config.keep, n - protected)


def resolve(config: KeepConfig, n: int, protected: int):
  check_keep("keep", config.keep)
  return None if kept_count(config, n, protected) >= n - protected else config


def out_count(config: KeepConfig, n: int, protected: int) -> int:
  return protected + kept_count(config, n, protected) + int(config.fuse)

"""The count rule that staged learned reducers share (DynamicViT, SiT): stage s of S keeps int(N0 ρ^s) tokens,
N0 being the model's initial patch count (the references' `int(init_n * token_ratio)` / `keeped_patches`), one
stage before each of the chosen blocks."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from tokcomp import schedules


@dataclasses.dataclass(frozen=True)
class StagedConfig:
  method: ClassVar[str] = "staged"
  rate: float                     # ρ, the per-stage keep ratio
  stage: int                      # s, 1-based
  num_stages: int                 # S
  num_patches: int | None = None  # N0, bound from the model's input when the schedule is planned

  @property
  def keep(self) -> float:
    """ρ^s: the fraction of the initial patches kept after this stage."""
    return self.rate ** self.stage

  def kept(self) -> int:
    if self.num_patches is None:
      raise ValueError(f"{self.method}: the config is not bound to a model yet (plan the schedule first)")
    return int(self.num_patches * self.keep)


def check_rate(method: str, rate: Any) -> float:
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate <= 1.0:
    raise ValueError(f"{method} keep={rate!r}: must be the per-stage keep ratio in (0, 1]")
  return float(rate)


def build(config_cls, rate: float, layers, depth: int, slot: str = "pre", **fields) -> schedules.Schedule:
  """One Step per chosen block, stage s = 1..S in block order."""
  layers = schedules.parse_layers(layers, depth, f"{config_cls.method} layers")
  if not layers:
    raise ValueError(f"{config_cls.method} layers: no block chosen at depth {depth}; give layers=...")
  stage = {l: s + 1 for s, l in enumerate(layers)}
  return tuple(schedules.Step(config_cls.method, config_cls(rate=rate, stage=stage[i], num_stages=len(layers),
                                                            **fields), slot=slot)
               if i in stage else None for i in range(depth))


def bind(config: StagedConfig, n0: int, protected: int) -> StagedConfig:
  return dataclasses.replace(config, num_patches=n0 - protected)


def resolve(config: StagedConfig, n: int, protected: int) -> StagedConfig:
  k = config.kept()
  if not 1 <= k <= n - protected:
    raise ValueError(f"{config.method} stage {config.stage} keeps int({config.num_patches} * {config.rate:.4g}^"
                     f"{config.stage}) = {k} tokens: must be in [1, {n - protected}] (the tokens entering the block)")
  return config


def out_count(config: StagedConfig, n: int, protected: int) -> int:
  return protected + config.kept()

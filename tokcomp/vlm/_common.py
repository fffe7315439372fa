"""Small helpers shared by the pre-LLM reducers: argument checks, token budgets, signal checks, the patch view.

Budgets ("keep", "tokens", ...) come in two forms, fixed at parse time and resolved against the number of patches
n when the reducer is traced:
  an int   k     keep exactly k patches, 1 <= k <= n
  a float  f     a fraction of the patches, 0 < f <= 1, k = round(f n) (Python's round, as FasterVLM's and
                 DivPrune's scripts compute their counts), at least 1
So "keep=64" keeps 64 patches and "keep=0.25" a quarter of them; "keep=1" is one patch, "keep=1.0" all.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from tokcomp.reducers import check_args
from tokcomp.tokens import Tokens


def args(method: str, given: dict[str, Any], allowed: dict[str, Any], required: tuple[str, ...] = ()
         ) -> dict[str, Any]:
  """Defaults filled in; ValueError on an unknown or a missing required argument (naming the valid ones)."""
  out = check_args(method, given, allowed)
  for name in required:
    if out[name] is None:
      raise ValueError(f"{method}: argument {name} is required (valid arguments: {sorted(allowed)})")
  return out


def budget(method: str, field: str, value: Any) -> int | float:
  """Checks a budget argument at parse time: an int >= 1 (a count) or a float in (0, 1] (a fraction)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{method} {field}={value!r}: must be an int count >= 1 or a float fraction in (0, 1]")
  if isinstance(value, int) and value < 1:
    raise ValueError(f"{method} {field}={value}: a count must be >= 1")
  if isinstance(value, float) and not 0.0 < value <= 1.0:
    raise ValueError(f"{method} {field}={value}: a fraction must be in (0, 1]")
  return value


def resolve(method: str, field: str, value: int | float, n: int, low: int = 1) -> int:
  """A budget (count or fraction) as a count of the n candidates; ValueError unless low <= count <= n."""
  count = value if isinstance(value, int) else max(1, int(round(value * n)))
  if not low <= count <= n:
    raise ValueError(f"{method} {field}={value!r}: gives {count} tokens, must be in [{low}, {n}] "
                     f"(the {n} candidate patches)")
  return count


def integer(method: str, field: str, value: Any, low: int, high: int | None = None) -> int:
  """Checks an int argument in [low, high] (no upper bound if high is None)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
    valid = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    raise ValueError(f"{method} {field}={value!r}: must be {valid}")
  return value


def require(method: str, signals, *fields: str) -> None:
  """ValueError if a signal the method reads is missing."""
  missing = [f for f in fields if getattr(signals, f) is None]
  if missing:
    raise ValueError(f"{method} needs VisualSignals.{', '.join(missing)} (the vision tower must be asked for it)")


def num_patches(signals) -> int:
  return signals.x.shape[1] - signals.num_prefix


def grid_of(method: str, signals) -> tuple[int, int]:
  if signals.grid is None:
    raise ValueError(f"{method} needs VisualSignals.grid (the patch grid (h, w))")
  return signals.grid


def start(signals) -> Tokens:
  """The tower output as a fresh token state: prefix protected, index = identity over prefix + patches."""
  return Tokens.create(signals.x, signals.num_prefix, signals.grid)


def keep_patches(signals, idx, keep_prefix: bool = False) -> Tokens:
  """Keeps the patches idx [B, K] (indices among the patches, 0-based, in the order given), after the prefix
  tokens if keep_prefix. The result has num_protected = the prefix kept (0 without it)."""
  tokens = start(signals)
  p = signals.num_prefix
  slots = idx.astype(jnp.int32) + p
  if keep_prefix and p:
    prefix = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (slots.shape[0], p))
    slots = jnp.concatenate([prefix, slots], axis=1)
  return tokens.gather(slots).replace(num_protected=p if keep_prefix else 0)


def topk_ascending(score, k: int):
  """[B, K] indices of the k largest of score [B, M] (stable: the lower index wins a tie), in ascending index
  order. A stable argsort, not lax.top_k (which all-gathers under batch sharding)."""
  return jnp.sort(jnp.argsort(-score.astype(jnp.float32), axis=-1, stable=True)[:, :k], axis=-1)


def target_grid(method: str, field: str, value: Any) -> tuple[int, int]:
  """A target grid at parse time: an int G (G x G) or a string "GhxGw", each side >= 1."""
  if isinstance(value, int) and not isinstance(value, bool):
    hw = (value, value)
  elif isinstance(value, str) and "x" in value:
    try:
      hw = tuple(int(t) for t in value.split("x"))
    except ValueError:
      hw = ()
  else:
    hw = ()
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"{method} {field}={value!r}: must be an int G >= 1 (G x G) or 'GhxGw', e.g. {field}=12")
  return hw


def grid_dest(signals, out_hw: tuple[int, int]):
  """[B, N] destination of every original token on an out_hw grid of the patches: patch (r, c) goes to cell
  (floor(r h' / h), floor(c w' / w)); the prefix is dropped (-1)."""
  import numpy as np
  from tokcomp.ops.cluster import initial_cells
  h, w = signals.grid
  dest = np.concatenate([np.full(signals.num_prefix, -1), initial_cells((h, w), out_hw)]).astype(np.int32)
  return jnp.broadcast_to(jnp.asarray(dest), signals.x.shape[:2])


def anyres_views(method: str, signals, arrangement: tuple[int, int]):
  """AnyRes layout: the thumbnail view (signals.thumbnail) and C = rows * cols crops (row-major) stacked on
  signals' token axis, each view P + h w tokens (its own prefix first). Returns (C, P, (h, w))."""
  require(method, signals, "thumbnail")
  h, w = grid_of(method, signals)
  p, per_view = signals.num_prefix, signals.num_prefix + h * w
  thumb = signals.thumbnail
  if thumb.grid != (h, w) or thumb.num_prefix != p or thumb.x.shape[1] != per_view:
    raise ValueError(f"{method}: VisualSignals.thumbnail must be one view of {per_view} tokens (prefix {p}, grid "
                     f"{h}x{w}) like each crop; got {thumb.x.shape[1]} tokens, grid {thumb.grid}")
  crops = arrangement[0] * arrangement[1]
  if signals.x.shape[1] != crops * per_view:
    raise ValueError(f"{method} layout={arrangement[0]}x{arrangement[1]}: VisualSignals.x must hold {crops} crops of "
                     f"{per_view} tokens stacked on the token axis; got {signals.x.shape[1]} tokens")
  return crops, p, (h, w)


def anyres_tokens(signals) -> Tokens:
  """The token state over [thumbnail view, crop 1, ..., crop C] (LLaVA-NeXT's order: base image first), nothing
  protected: `index` runs over the thumbnail's tokens, then the crops'."""
  return Tokens.create(jnp.concatenate([signals.thumbnail.x, signals.x], axis=1), 0, None)


def region_of(grid: tuple[int, int], arrangement: tuple[int, int]):
  """[h w] int: the crop whose region of the thumbnail each thumbnail patch lies in (row-major crops; a crop
  covers rows [i h/gh, (i+1) h/gh) and the same for columns, the last crop takes a ragged remainder)."""
  import numpy as np
  (h, w), (gh, gw) = grid, arrangement
  r, c = np.divmod(np.arange(h * w), w)
  ph, pw = max(h // gh, 1), max(w // gw, 1)
  return np.minimum(r // ph, gh - 1) * gw + np.minimum(c // pw, gw - 1)

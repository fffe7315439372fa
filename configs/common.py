"""Helpers for configs: big_vision-style `get_config("key=value,...")` argument parsing."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"variant=B/16,batch=256" -> ConfigDict over `defaults`, converting each value to its default's type.

  Unknown keys are an error that lists the valid ones. A comma-separated piece that does not start with a known
  key belongs to the previous value, so reducer specs keep their commas: "reduce=evit:keep=0.7,layers=3-6-9".
  """
  out = ml_collections.ConfigDict(defaults)
  items: list[str] = []
  for piece in filter(None, (arg or "").split(",")):
    if items and piece.partition("=")[0].strip() not in defaults:
      items[-1] += "," + piece
    else:
      items.append(piece)
  for item in items:
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config arg {key!r} unknown; valid: {sorted(defaults)}")
    default = defaults[key]
    if not eq:  # a bare flag such as "quick"
      value = "True"
    if isinstance(default, bool):
      out[key] = value.strip().lower() in ("1", "true", "yes")
    elif isinstance(default, (int, float)):
      out[key] = type(default)(value)
    else:
      out[key] = value.strip()
  return out

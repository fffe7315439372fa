"""Serialized inference functions: a ViT, its reducer schedule and its params as one `jax.export` artifact.

  art = tokcomp.export.export(model, params, image_shape=(224, 224, 3))     # batch symbolic ("b")
  art.save("vit_s16_tome13.tcx")
  fn = tokcomp.export.load("vit_s16_tome13.tcx")                            # any process, no model code
  logits = fn(images)                                                       # [B, H, W, C] normalised, any B

The artifact is StableHLO (`jax.export.Exported.serialize()`) with the params embedded as constants, plus a JSON
header (model fields, reducer spec, tokens per block, GFLOPs, input shape and dtype, platforms, JAX version),
stored together in a zip file. Loading needs only JAX, not tokcomp:

  import zipfile, jax
  exported = jax.export.deserialize(zipfile.ZipFile(path).read("exported.bin"))
  logits = exported.call(images)

Every token count is static, so the batch can stay symbolic: one artifact serves every batch size, each size
compiled once on first use. `batch=N` fixes it instead. `platforms=("cpu", "cuda")` lowers for several backends
at once. Images go in already normalised, as the model was trained (see `tokcomp.data.stats_for`).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp

EXPORTED, HEADER = "exported.bin", "header.json"


@dataclasses.dataclass
class Artifact:
  exported: jax.export.Exported
  header: dict[str, Any]

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.exported.call(images)

  def save(self, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
      z.writestr(EXPORTED, bytes(self.exported.serialize()))
      z.writestr(HEADER, json.dumps(self.header, indent=1))
    return path


def export(model, params, *, image_shape: Sequence[int], batch: int | None = None, dtype=jnp.float32,
           platforms: Sequence[str] | None = None) -> Artifact:
  """Exports `images -> logits` of `model` (a `tokcomp.models.vit.ViT`, its `reduce` schedule included) with
  `params` baked in. image_shape: (H, W, C). batch: None for a symbolic batch dimension, or a fixed size."""
  if len(image_shape) != 3 or not all(isinstance(s, int) and s > 0 for s in image_shape):
    raise ValueError(f"export image_shape={tuple(image_shape)}: must be (H, W, C), positive ints")
  if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
    raise ValueError(f"export batch={batch!r}: must be a positive int, or None for a symbolic batch")
  _, counts = model.plan(image_shape[:2])  # checks the schedule at this resolution before tracing
  fn = jax.jit(lambda images: model.apply(params, images)[0])
  lead = jax.export.symbolic_shape("b") if batch is None else (batch,)
  spec = jax.ShapeDtypeStruct((*lead, *image_shape), jnp.dtype(dtype))
  exported = jax.export.export(fn, platforms=tuple(platforms) if platforms else None)(spec)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}
  header = {
      "format": "tokcomp.export/1", "created": datetime.date.today().isoformat(), "jax": jax.__version__,
      "input": {"shape": ["b" if batch is None else batch, *image_shape], "dtype": jnp.dtype(dtype).name},
      "platforms": list(exported.platforms), "model": {k: _jsonable(v) for k, v in fields.items()},
      "tokens_per_layer": [c.n_mlp for c in counts],
      "gflops": model.flops(image_shape[:2], image_shape[2]) / 1e9,
  }
  return Artifact(exported, header)


def load(path: str | os.PathLike) -> Artifact:
  """Reads an artifact written by `Artifact.save`; calling it runs the exported function."""
  with zipfile.ZipFile(os.fspath(path)) as z:
    names = set(z.namelist())
    if not {EXPORTED, HEADER} <= names:
      raise ValueError(f"{os.fspath(path)!r} is not a tokcomp export artifact: needs {EXPORTED} and {HEADER}, "
                       f"has {sorted(names)}")
    return Artifact(jax.export.deserialize(bytearray(z.read(EXPORTED))), json.loads(z.read(HEADER)))


def _jsonable(v):
  if isinstance(v, (str, int, float, bool)) or v is None:
    return v
  if isinstance(v, (tuple, list)):
    return [_jsonable(t) for t in v]
  return str(v)

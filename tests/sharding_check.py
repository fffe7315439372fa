"""Batch-sharding checks, run by tests/test_sharding.py in its own process with 8 simulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharding_check.py

The pytest process has already initialised jax with one device, so these checks cannot run in it. Prints one
JSON object, {case: {...}}, on the last line of stdout; test_sharding.py asserts on it. Cases:
  vit/<reduce>      a tiny ViT forward with the batch sharded over ("data",) and replicated params vs the
                    unsharded forward; also the collectives in the compiled HLO
  reducer/<name>    each registered reducer alone, jitted with the batch sharded: its collectives (there should
                    be none: every reducer is per example) and sharded vs unsharded output
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import helpers  # noqa: E402
from tokcomp import reducers, schedules  # noqa: E402
from tokcomp.tokens import Tokens  # noqa: E402

COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")
VIT_REDUCE = {"dense": None, "tome": "tome:r=4", "evit": "evit:keep=0.7,layers=1-2"}
BATCH, N, GRID = 8, 37, (6, 6)


def collectives(hlo: str) -> list[str]:
  """Collective ops in compiled HLO text (also their async -start/-done forms)."""
  return sorted({m.group(1) for m in re.finditer(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start|-done)?\(", hlo)})


def max_diff(a, b) -> dict:
  """Largest absolute and relative (|a-b| - 1e-5 |b|) differences over all leaves, plus exact-equality for
  integer and boolean leaves."""
  abs_d, excess, exact = 0.0, -np.inf, True
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape:
      return {"max_abs": float("inf"), "tol_excess": float("inf"), "exact_ints": False, "shape": str(x.shape)}
    if not np.issubdtype(x.dtype, np.floating):
      exact &= bool(np.array_equal(x, y))
      continue
    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
    abs_d = max(abs_d, float(d.max(initial=0)))
    excess = max(excess, float((d - 1e-5 * np.abs(y) - 1e-6).max(initial=-np.inf)))
  return {"max_abs": abs_d, "tol_excess": excess, "exact_ints": exact}


def shards_of(x) -> list[int]:
  """Which devices hold a distinct batch slice of a sharded output (len 8 when split over all devices)."""
  return sorted({s.index[0].start or 0 for s in x.addressable_shards})


def main() -> None:
  results: dict[str, dict] = {"devices": {"count": jax.device_count(), "platform": jax.devices()[0].platform}}
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  # --- the whole model ---------------------------------------------------------------------------------------
  images = helpers.images(batch=BATCH, hw=(56, 56))
  for label, spec in VIT_REDUCE.items():
    t0 = time.perf_counter()
    model = helpers.tiny_vit(reduce=spec)
    params = helpers.random_params(model)
    ref = jax.jit(model.apply)(params, images)
    sharded = jax.jit(model.apply, in_shardings=(repl, data), out_shardings=data)
    compiled = sharded.lower(params, images).compile()
    out = compiled(jax.device_put(params, repl), jax.device_put(images, data))
    results[f"vit/{label}"] = {
        **max_diff(out, ref), "collectives": collectives(compiled.as_text()),
        "logit_shards": len(shards_of(out[0])), "tokens": int(out[1]["tokens"].n),
        "seconds": round(time.perf_counter() - t0, 2)}

  # --- each reducer alone ------------------------------------------------------------------------------------
  tokens, signals = helpers.tokens_and_signals(batch=BATCH, n=N)
  tokens = Tokens.create(tokens.x, 1, grid=GRID)  # avgpool needs the patch grid; same state otherwise
  for name in reducers.names():
    t0 = time.perf_counter()
    method = reducers.get(name)
    steps, _ = schedules.resolve(reducers.build_schedule(method.example, 4), N, tokens.num_protected)
    step = next(s for s in steps if s is not None)
    fn = lambda t, s, step=step: reducers.apply(step, t, s)
    ref = jax.jit(fn)(tokens, signals)
    sharded = jax.jit(fn, in_shardings=(data, data), out_shardings=data)
    compiled = sharded.lower(tokens, signals).compile()
    out = compiled(jax.device_put(tokens, data), jax.device_put(signals, data))
    results[f"reducer/{name}"] = {
        **max_diff(out, ref), "collectives": collectives(compiled.as_text()),
        "example": method.example, "n_out": int(out.n), "x_shards": len(shards_of(out.x)),
        "seconds": round(time.perf_counter() - t0, 2)}

  print(json.dumps(results))


if __name__ == "__main__":
  main()

"""Timing jitted ViTs with and without reducers: img/s against the analytic FLOP ratio.

Method: each model is compiled once (compile time recorded), warmed up, then timed with `block_until_ready`.
The timed calls of all rows are interleaved round-robin, so a slow spell of the machine hits every row alike;
each row reports the median over its calls. FLOPs are analytic (`schedules.vit_flops`) and cross-checked
against XLA's `cost_analysis()` of the compiled function.

  speedup             = img/s(row) / img/s(dense)
  flop_ratio          = GFLOPs(dense) / GFLOPs(row)          (the physical limit of the speedup)
  speedup / flop_ratio  how much of that limit the wall clock reaches
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp.models import vit


@dataclasses.dataclass
class Row:
  model: str
  reducer: str
  batch: int
  image_size: int
  dtype: str
  tokens_per_layer: list[int]
  gflops: float          # analytic, per image
  xla_gflops: float      # cost_analysis of the compiled forward, per image
  flop_ratio: float
  img_s: float
  speedup: float
  speedup_over_flop_ratio: float
  compile_s: float
  runs: int


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    model = platform.processor() or platform.machine()
    try:
      with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
      pass
    return f"cpu ({model}, {os.cpu_count()} cores)"
  return getattr(d, "device_kind", d.platform)


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0] if cost else {}
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def memory_bytes(compiled) -> dict[str, int] | None:
  """XLA's `memory_analysis()` of one compiled executable: argument, output, temp and alias bytes, and
  peak = argument + output + temp - alias (a donated argument that the output reuses counts once). Per
  executable, so per row; None where the backend gives no analysis."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  out = {name: int(getattr(mem, f"{name}_size_in_bytes", 0)) for name in ("argument", "output", "temp", "alias")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


@dataclasses.dataclass
class Timing:
  compiled: Any
  compile_s: float
  times: list[float]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times)


def time_models(models: dict[str, vit.ViT], params, images: jax.Array, *, warmup: int = 3, runs: int = 30,
                log=print, params_by_name: dict | None = None) -> dict[str, Timing]:
  """Compiles each model's forward once, warms it up, then times `runs` calls of each, interleaved round-robin
  so that drift in machine speed is shared by all models. Returns {name: Timing}. `params_by_name` gives some
  models their own weights (fine-tuned learned reducers); the others use `params`."""
  out, weights = {}, {}
  for name, model in models.items():
    weights[name] = (params_by_name or {}).get(name, params)
    fn = jax.jit(lambda p, x, m=model: m.apply(p, x)[0])
    t0 = time.perf_counter()
    compiled = fn.lower(weights[name], images).compile()
    out[name] = Timing(compiled, time.perf_counter() - t0, [])
    for _ in range(warmup):
      jax.block_until_ready(compiled(weights[name], images))
    log(f"compiled {name}: {out[name].compile_s:.1f}s")
  for _ in range(runs):
    for name, t in out.items():
      t0 = time.perf_counter()
      jax.block_until_ready(t.compiled(weights[name], images))
      t.times.append(time.perf_counter() - t0)
  return out


def bench_vit(variant: str, reducers: Sequence[str], *, batch: int = 8, image_size: int = 224,
              num_classes: int = 1000, dtype: str = "float32", warmup: int = 3, runs: int = 30,
              seed: int = 0, attn_impl: str | None = None, log=print) -> list[Row]:
  """Times `variant` (e.g. "S/16") densely and under each reducer spec; the first row is always dense."""
  jdtype = jnp.dtype(dtype)
  specs = ["dense"] + [r for r in reducers if r not in ("dense", "none", "")]
  images = jax.random.normal(jax.random.key(seed), (batch, image_size, image_size, 3), jdtype)
  dense = vit.make(variant, num_classes=num_classes, dtype=jdtype, attn_impl=attn_impl)
  params = jax.jit(dense.init)(jax.random.key(seed), images[:1])
  models = {spec: dense.clone(reduce=None if spec == "dense" else spec) for spec in specs}
  timings = time_models(models, params, images, warmup=warmup, runs=runs, log=log)

  rows = []
  base_flops = base_ips = None
  for spec, model in models.items():
    t = timings[spec]
    _, counts = model.plan((image_size, image_size))
    flops = model.flops((image_size, image_size))
    ips = batch / t.median_s
    if base_flops is None:
      base_flops, base_ips = flops, ips
    ratio, speed = base_flops / flops, ips / base_ips
    rows.append(Row(model=f"ViT-{variant}", reducer=spec, batch=batch, image_size=image_size, dtype=dtype,
                    tokens_per_layer=[c.n_mlp for c in counts], gflops=flops / 1e9,
                    xla_gflops=xla_flops(t.compiled) / batch / 1e9, flop_ratio=ratio, img_s=ips,
                    speedup=speed, speedup_over_flop_ratio=speed / ratio, compile_s=t.compile_s, runs=runs))
    log(f"{variant:6s} {spec:28s} {ips:8.1f} img/s  x{speed:.2f} (FLOP ratio {ratio:.2f})")
  return rows


def markdown(rows: Sequence[Row], device: str, date: str) -> str:
  head = (f"Device: {device}. Date: {date}. JAX {jax.__version__}. Median of {rows[0].runs} timed runs per row, "
          f"interleaved.\n\n"
          "| model | reducer | batch | dtype | tokens per layer (after reducer) | GFLOPs | XLA GFLOPs | FLOP ratio "
          "| img/s | speedup | speedup ÷ FLOP ratio | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
  body = "".join(
      f"| {r.model}@{r.image_size} | {r.reducer} | {r.batch} | {r.dtype} | {_short(r.tokens_per_layer)} | "
      f"{r.gflops:.2f} | {r.xla_gflops:.2f} | {r.flop_ratio:.2f} | {r.img_s:.1f} | {r.speedup:.2f} | "
      f"{r.speedup_over_flop_ratio:.2f} | {r.compile_s:.1f} |\n" for r in rows)
  return head + body


def _short(counts: Sequence[int]) -> str:
  return "-".join(str(c) for c in counts)


def write(rows: Sequence[Row], workdir: str, name: str = "bench") -> dict[str, Any]:
  """Writes `<workdir>/<name>.json` and `.md`; returns the JSON payload."""
  os.makedirs(workdir, exist_ok=True)
  date = datetime.date.today().isoformat()
  device = device_name()
  payload = {"device": device, "date": date, "jax": jax.__version__, "rows": [dataclasses.asdict(r) for r in rows]}
  with open(os.path.join(workdir, name + ".json"), "w") as f:
    json.dump(payload, f, indent=1)
  with open(os.path.join(workdir, name + ".md"), "w") as f:
    f.write(markdown(rows, device, date))
  return payload


def check_rows(rows: Sequence[Row]) -> None:
  """Sanity checks a benchmark must pass before its numbers are written anywhere."""
  for r in rows:
    if not (np.isfinite(r.img_s) and r.img_s > 0):
      raise RuntimeError(f"bench row {r.reducer}: img/s={r.img_s}")

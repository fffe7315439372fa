r"""Compile time and training memory of ViT(scan=..., remat=...) (issue 9: nn.scan over equal-count runs, remat).

  python benchmarks/scan_remat/bench.py [--variant B/16] [--batch 8] [--out benchmarks/scan_remat]

For each reducer spec: the forward's lower+compile wall time and one timed call, per-block (`scan=False`) against
stacked (`scan=True`). For the training step (softmax CE, grad, SGD update; jitted, params donated): compile time,
step time and XLA's memory_analysis (temp bytes: the activations kept for the backward pass) under each remat
policy. Writes scan_remat.{json,md}. Times are single measurements on a shared machine: compile times vary a few
percent from run to run.
"""
import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tokcomp import bench  # noqa: E402
from tokcomp.models import vit  # noqa: E402


@dataclasses.dataclass
class Row:
  kind: str      # "forward" or "train step"
  reducer: str
  scan: bool
  remat: str
  compile_s: float
  run_ms: float  # median of `runs` calls after one warm-up
  temp_mib: float


def measure(fn, args, runs):
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2 ** 20 if mem is not None else float("nan")
  return compile_s, 1e3 * statistics.median(times), temp


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--variant", default="B/16")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--image_size", type=int, default=224)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--reducers", default="dense;tome:r=13;evit:keep=0.7,layers=3-6-9")
  ap.add_argument("--remats", default="none;full;dots_saveable")
  ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = ap.parse_args(argv)
  images = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3))
  labels = jnp.arange(args.batch) % 1000
  base = vit.make(args.variant, num_classes=1000)
  params = jax.jit(base.init)(jax.random.key(0), images[:1])["params"]
  stacked = vit.stack_blocks(params)
  rows = []

  def log(r):
    rows.append(r)
    print(f"{r.kind:10s} {r.reducer:28s} scan={r.scan!s:5s} remat={r.remat:14s} compile {r.compile_s:6.1f} s  "
          f"run {r.run_ms:8.1f} ms  temp {r.temp_mib:8.1f} MiB", flush=True)

  for spec in args.reducers.split(";"):
    for scan in (False, True):
      model = base.clone(reduce=None if spec == "dense" else spec, scan=scan)
      p = stacked if scan else params
      log(Row("forward", spec, scan, "none",
              *measure(lambda p, x, m=model: m.apply({"params": p}, x)[0], (p, images), args.runs)))

  for spec in args.reducers.split(";"):
    for scan in (False, True):
      for remat in args.remats.split(";"):
        model = base.clone(reduce=None if spec == "dense" else spec, scan=scan, remat=remat)

        def step(p, x, y, m=model):
          def loss(p):
            logits = m.apply({"params": p}, x)[0]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
          g = jax.grad(loss)(p)
          return jax.tree_util.tree_map(lambda a, b: a - 1e-3 * b, p, g)

        p = stacked if scan else params
        log(Row("train step", spec, scan, remat, *measure(step, (p, images, labels), args.runs)))

  device, date = bench.device_name(), datetime.date.today().isoformat()
  payload = dict(device=device, date=date, jax=jax.__version__, variant=args.variant, batch=args.batch,
                 image_size=args.image_size, runs=args.runs, rows=[dataclasses.asdict(r) for r in rows])
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "scan_remat.json"), "w") as f:
    json.dump(payload, f, indent=1)
  md = (f"ViT-{args.variant} at {args.image_size}, batch {args.batch}, fp32. Device: {device}. Date: {date}. "
        f"JAX {jax.__version__}. run ms: median of {args.runs} calls; temp MiB: XLA memory_analysis temp bytes.\n\n"
        "| kind | reducer | scan | remat | compile s | run ms | temp MiB |\n|---|---|---|---|---|---|---|\n")
  md += "".join(f"| {r.kind} | {r.reducer} | {r.scan} | {r.remat} | {r.compile_s:.1f} | {r.run_ms:.1f} | "
                f"{r.temp_mib:.0f} |\n" for r in rows)
  with open(os.path.join(args.out, "scan_remat.md"), "w") as f:
    f.write(md)


if __name__ == "__main__":
  main()

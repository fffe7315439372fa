r"""Prefill FLOPs and latency of the LLaVA-style test bed against the number of visual tokens kept (issue 7).

  python benchmarks/vlm_prefill/bench.py [--quick] [--out benchmarks/vlm_prefill]

A small random-weight test bed (`tokcomp.models.vlm.VLM`): a CLIP-style tower (width 256, 6 layers, patch 14 at
224 px -> 256 patches + CLS, feature layer -2) -> projector -> a Llama-style decoder (hidden 512, 4 layers, 8 heads,
4 KV heads) over [16 system ids, the image tokens, 32 user ids], batch 4. Every pre-LLM reducer the single-view
test bed can feed (HiRED and GlobalCom² need AnyRes crops) runs at 4 budgets (192/128/64/32 of 256 patches;
Fourier-VLM at the nearest square grid, LLaVolta at half the grid side), FastV keeps the same image-token budgets
after layer 2, and PyramidDrop halves the image tokens before layers 1, 2 and 3 (its row's "image tokens" is
the count entering the decoder). What is timed is the whole prefill (tower + reducer + projector + decoder prefill with its KV cache):
jitted once per setting, warmed up, then the median of `runs` calls, interleaved round-robin so machine drift is
shared. FLOPs are XLA's cost analysis of each compiled prefill (what the program executes, reducer included).
Random weights: the numbers are costs, not answers; answers are the parity tests' job.
Writes bench.json and bench.md (with device and date) into --out.
"""
from __future__ import annotations

import argparse
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
from tokcomp.models.llm import Llama, LlamaConfig  # noqa: E402
from tokcomp.models.vlm import VLM, CLIPVisionTower  # noqa: E402


def settings(patches: int, budgets: list[int]) -> list[tuple[str, str | None, str | None, int]]:
  """(label, visual spec, prefill spec, image tokens kept)."""
  rows = [("dense", None, None, patches)]
  for k in budgets:
    rows += [
        (f"fastervlm {k}", f"fastervlm:keep={k}", None, k),
        (f"vtc_cls {k}", f"vtc_cls:keep={k},start=1", None, k),
        (f"visionzip {k}", f"visionzip:dominant={k - k // 6},contextual={k // 6}", None, k),
        (f"divprune {k}", f"divprune:keep={k}", None, k),
        (f"todre {k}", f"todre:keep={k}", None, k),
        (f"fopru {k}", f"fopru:keep={k}", None, k),
        (f"fourier {int(k ** 0.5)}x{int(k ** 0.5)}", f"fourier:grid={int(k ** 0.5)}x{int(k ** 0.5)}", None,
         int(k ** 0.5) ** 2),
        (f"fastv {k}", None, f"fastv:k=2,keep={k}", k),
    ]
  side = int(round(patches ** 0.5))
  rows += [(f"llavolta {side // 2}x{side // 2}", f"llavolta:grid={side // 2}", None, (side // 2) ** 2),
           ("pyramiddrop 0.5 at 1-2-3", None, "pyramiddrop:layers=1-2-3,ratio=0.5", patches),
           (f"todre_prune {patches // 4} at 2", None, f"todre_prune:layer=2,keep={patches // 4}", patches // 4)]
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  ap.add_argument("--quick", action="store_true", help="tiny sizes, 3 runs: a smoke test")
  ap.add_argument("--runs", type=int, default=15)
  ap.add_argument("--batch", type=int, default=4)
  args = ap.parse_args(argv)

  if args.quick:
    image, tower_kw, llm_kw, budgets, runs = 56, dict(width=64, depth=3, mlp_dim=128, num_heads=4), dict(
        hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2), [8], 3
  else:
    image, tower_kw, llm_kw, budgets, runs = 224, dict(width=256, depth=6, mlp_dim=1024, num_heads=8), dict(
        hidden_size=512, intermediate_size=1376, num_layers=4, num_heads=8, num_kv_heads=4), [192, 128, 64, 32], \
        args.runs
  tower = CLIPVisionTower(patch_size=(14, 14), select_layer=-2, **tower_kw)
  cfg = LlamaConfig(vocab_size=1000, **llm_kw)
  patches = tower.grid((image, image))[0] * tower.grid((image, image))[1]
  b = args.batch
  images = jax.random.uniform(jax.random.key(0), (b, image, image, 3))
  system = jax.random.randint(jax.random.key(1), (b, 16), 0, cfg.vocab_size)
  user = jax.random.randint(jax.random.key(2), (b, 32), 0, cfg.vocab_size)
  params = VLM(tower, Llama(cfg)).init(jax.random.key(3), (image, image))

  compiled, meta = {}, {}
  for label, visual, prefill, kept in settings(patches, budgets):
    model = VLM(tower, Llama(cfg, reduce=prefill), visual=visual)
    fn = jax.jit(lambda p, x, s, u, m=model: m.prefill(p, x, s, u)[0])
    t0 = time.perf_counter()
    c = fn.lower(params, images, system, user).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
      jax.block_until_ready(c(params, images, system, user))
    compiled[label] = c
    meta[label] = dict(setting=label, visual=visual or "", prefill=prefill or "", image_tokens=kept,
                       gflops=bench.xla_flops(c) / 1e9 / b, compile_s=compile_s, times=[])
    print(f"compiled {label}: {compile_s:.1f}s, {meta[label]['gflops']:.2f} GFLOPs/example", flush=True)
  for _ in range(runs):
    for label, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(params, images, system, user))
      meta[label]["times"].append(time.perf_counter() - t0)
  dense = meta["dense"]
  dense_ms = statistics.median(dense["times"]) * 1e3
  rows = []
  for m in meta.values():
    ms = statistics.median(m.pop("times")) * 1e3
    rows.append({**m, "prefill_ms": ms, "flop_ratio": dense["gflops"] / m["gflops"], "speedup": dense_ms / ms})
  device, date = bench.device_name(), datetime.date.today().isoformat()
  payload = dict(device=device, date=date, jax=jax.__version__, batch=b, image=image, patches=patches,
                 tower=tower_kw, llm=llm_kw, text_tokens=16 + 32, runs=runs, rows=rows)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench.json"), "w") as f:
    json.dump(payload, f, indent=1)
  lines = [f"VLM prefill (tower + reducer + projector + decoder prefill), batch {b}, {image}px -> {patches} patches, "
           f"{device}, JAX {jax.__version__}, {date}; median of {runs} runs", "",
           "| setting | image tokens | GFLOPs / example | FLOP ratio | prefill ms | speedup | compile s |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['setting']} | {r['image_tokens']} | {r['gflops']:.2f} | {r['flop_ratio']:.2f} | "
                 f"{r['prefill_ms']:.1f} | {r['speedup']:.2f} | {r['compile_s']:.1f} |")
  with open(os.path.join(args.out, "bench.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

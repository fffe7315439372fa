r"""Benchmark: dense ViT against ToMe and EViT, jitted, same fused attention, img/s against the FLOP ratio.

Runs: tokcomp.bench.bench_vit over random images and random weights (timing does not depend on the weights).
Reproduces: the README's CPU table (ViT-S/16@224, batch 8: dense, ToMe r=8/13, EViT 0.7 at blocks 3-6-9).
Expect: on 2 CPU cores (AMD EPYC, 2026-11-21) ToMe r=13 1.59x for a FLOP ratio of 1.70, EViT 1.55x for 1.52;
the README table has the full run. The workdir gets bench.json and bench.md.

  python eval.py --mode=bench --config configs/bench_vit.py --workdir workdirs/bench
  python eval.py --mode=bench --config configs/bench_vit.py:variant=B/16,batch=256,dtype=bfloat16 --workdir workdirs/bench_b16
  python eval.py --mode=bench --config configs/bench_vit.py:quick --workdir workdirs/bench_quick   # ~1 min on 2 cores

Args after the colon: variant (S/16), batch (8), image_size (224), dtype (float32|bfloat16), runs (30),
warmup (3), reducers (';'-joined specs), attn_impl ('' = JAX default | xla | cudnn), quick (small and fast).
"""
from configs.common import parse_arg

DEFAULT_REDUCERS = "tome:r=8;tome:r=13;evit:keep=0.7,layers=3-6-9"


def get_config(arg: str | None = None):
  config = parse_arg(arg, variant="S/16", batch=8, image_size=224, dtype="float32", runs=30, warmup=3,
                     reducers=DEFAULT_REDUCERS, attn_impl="", quick=False, num_classes=1000)
  if config.quick:  # the README's first command: the same comparison with fewer timed runs (~1 min on 2 cores)
    config.runs, config.warmup = 10, 2
  return config

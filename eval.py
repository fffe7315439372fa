r"""Evaluation entry point (big_vision style): `python eval.py --mode=MODE --config configs/x.py:arg --workdir DIR`.

Modes:
  bench   time dense vs reduced ViTs (tokcomp.bench); writes bench.json and bench.md to the workdir.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/eval", "Where outputs are written.")
_MODE = flags.DEFINE_enum("mode", "bench", ["bench"], "What to run.")


def run_bench(config, workdir: str) -> dict:
  from tokcomp import bench
  reducers = [s for s in config.reducers.split(";") if s.strip()]
  rows = bench.bench_vit(config.variant, reducers, batch=config.batch, image_size=config.image_size,
                         num_classes=config.num_classes, dtype=config.dtype, warmup=config.warmup,
                         runs=config.runs, attn_impl=config.attn_impl or None)
  bench.check_rows(rows)
  payload = bench.write(rows, workdir)
  print(bench.markdown(rows, payload["device"], payload["date"]))
  return payload


def main(argv):
  del argv
  if _CONFIG.value is None:
    sys.exit("eval.py: --config is required, e.g. --config configs/bench_vit.py")
  if _MODE.value == "bench":
    run_bench(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

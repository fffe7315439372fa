r"""Evaluation entry point (big_vision style): `python eval.py --mode=MODE --config configs/x.py:arg --workdir DIR`.

Modes:
  eval    accuracy of the latest checkpoint in DIR/ckpt on the config's test split -> DIR/eval.json
  sweep   that checkpoint under every reducer in `config.sweep`, training-free -> DIR/sweep.{json,md,png}
  bench   time dense vs reduced ViTs on random weights (tokcomp.bench) -> DIR/bench.{json,md}
  recon   a trained 1D tokenizer (config.task = "reconstruct"): PSNR and SSIM on the test split at every kept
          length 1..K (or config.eval_lengths) -> DIR/recon.{json,md,png}, and DIR/recon_grid.png
  compare the recon.json of several runs (config.compare: workdirs joined by ';') in one table and plot
          -> DIR/tokenizers.{json,md,png}
  vis     merge / prune maps of the trained checkpoint under every reducer in `config.vis` (';'-joined) on the
          first `config.vis_images` test images (default 4), one panel per reducer stage -> DIR/vis_<name>.png
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/eval", "Where checkpoints are read and outputs written.")
_MODE = flags.DEFINE_enum("mode", "eval", ["eval", "sweep", "bench", "recon", "compare", "vis"], "What to run.")


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


def _trained(config, workdir: str):
  from tokcomp import data, evaluation, models
  params, step = evaluation.restore_params(workdir)
  model = models.get(config.get("model_name", "vit"))(**config.model)
  source = data.get_source(config.data.source, config.data.test_split)
  mean, std = data.stats_for(config.data.source)
  return model, params, step, source, mean, std


def run_eval(config, workdir: str) -> dict:
  from tokcomp import evaluation
  model, params, step, source, mean, std = _trained(config, workdir)
  result = evaluation.accuracy(model.clone(reduce=config.get("reduce") or None), params, source,
                               batch=config.eval_batch, mean=mean, std=std, limit=config.get("eval_limit", None),
                               image_size=config.data.get("image_size", None))
  result.update(step=step, reduce=config.get("reduce", ""), source=config.data.source)
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))
  return result


def _fine_tuned_run(run: str):
  """(label, params, model) of a finished train.py run for `evaluation.sweep`: the model its summary.json records
  (any architecture, e.g. LookupViT) with the run's reducer; the label is that reducer spec, or the model name
  when it has none."""
  from tokcomp import evaluation, models
  summary = os.path.join(run, "summary.json")
  if not os.path.exists(summary):
    raise FileNotFoundError(f"config.fine_tuned entry {run!r}: no summary.json (not a finished train.py run)")
  with open(summary) as f:
    s = json.load(f)
  if "test_accuracy" not in s:
    raise ValueError(f"config.fine_tuned entry {run!r}: not a classification run (its summary.json has no "
                     f"test_accuracy)")
  model = None  # runs from before summary.json recorded the model: the swept ViT with the run's reducer
  if "model" in s:
    tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, list) else v  # JSON lists back to tuples
    model = models.get(s.get("model_name", "vit"))(**{k: tuples(v) for k, v in s["model"].items()})
    model = model.clone(reduce=s["reduce"]) if s["reduce"] else model
  return s["reduce"] or s.get("model_name", "vit"), evaluation.restore_params(run)[0], model


def run_sweep(config, workdir: str) -> dict:
  from tokcomp import evaluation
  model, params, step, source, mean, std = _trained(config, workdir)
  specs = [s for s in config.sweep.split(";") if s.strip()]
  fine_tuned = []  # config.fine_tuned: train.py workdirs of models fine-tuned with a reducer, joined by ';'
  for run in filter(None, (r.strip() for r in config.get("fine_tuned", "").split(";"))):
    fine_tuned.append(_fine_tuned_run(run))
  rows = evaluation.sweep(model, params, source, specs, batch=config.eval_batch, mean=mean, std=std,
                          limit=config.get("eval_limit", None), image_size=config.data.get("image_size", None),
                          runs=config.get("sweep_runs", 10), fine_tuned=fine_tuned)
  title = (f"ViT (width {config.model['width']}, depth {config.model['depth']}, patch "
           f"{config.model['patch_size'][0]}) on {config.data.source} test, checkpoint step {step}")
  payload = evaluation.write_sweep(rows, workdir, title)
  with open(os.path.join(workdir, "sweep.md")) as f:
    print(f.read())
  return payload


def run_recon(config, workdir: str) -> dict:
  import numpy as np
  from tokcomp import data, evaluation, tokenizers
  from tokcomp.tokenizers import evaluation as recon_eval
  params, step = evaluation.restore_params(workdir)
  model = tokenizers.get(config.model_name)(**config.model)
  source = data.get_source(config.data.source, config.data.test_split)
  k = model.num_latent_tokens
  lengths = list(config.get("eval_lengths", None) or range(1, k + 1))
  image_size = config.data.get("image_size", None)
  curve = recon_eval.length_curve(model, params, source, lengths, batch=config.eval_batch,
                                  limit=config.get("eval_limit", None), image_size=image_size)
  label = config.get("label", "") or config.model_name
  title = f"{label} (K = {k}) on {config.data.source} test, checkpoint step {step}"
  payload = recon_eval.write_curves({label: curve}, workdir, title, extra={"step": step, "model": config.model.to_dict()})
  shown = next(data.eval_batches(source, batch=8, mean=(0.0,), std=(1.0,), image_size=image_size))["image"]
  grid_lengths = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n < k} | {k})
  recon_eval.reconstruction_grid(model, params, np.asarray(shown), grid_lengths,
                                 os.path.join(workdir, "recon_grid.png"), title)
  with open(os.path.join(workdir, "recon.md")) as f:
    print(f.read())
  return payload


def run_compare(config, workdir: str) -> dict:
  from tokcomp.tokenizers import evaluation as recon_eval
  runs = [r.strip() for r in config.get("compare", "").split(";") if r.strip()]
  if len(runs) < 1:
    raise ValueError("config.compare: give the workdirs of eval.py --mode=recon runs, joined by ';'")
  curves, sources = {}, []
  for run in runs:
    path = os.path.join(run, "recon.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"config.compare entry {run!r}: no recon.json (run eval.py --mode=recon there first)")
    with open(path) as f:
      payload = json.load(f)
    sources.append(f"{run}: {payload['title']} ({payload['device']}, {payload['date']})")
    for name, rows in payload["curves"].items():
      curves[name] = [recon_eval.CurveRow(**r) for r in rows]
  title = config.get("title", "") or "1D tokenizers: reconstruction quality against tokens kept"
  out = recon_eval.write_curves(curves, workdir, title, name="tokenizers", extra={"runs": sources})
  with open(os.path.join(workdir, "tokenizers.md")) as f:
    print(f.read())
  return out


def run_vis(config, workdir: str) -> list[str]:
  import numpy as np
  from tokcomp import data, vis
  model, params, step, source, mean, std = _trained(config, workdir)
  specs = [s.strip() for s in config.get("vis", "tome:r=16;evit:keep=0.7,layers=1-3;ats:keep=0.7,layers=1-3").split(";")
           if s.strip()]
  count = int(config.get("vis_images", 4))
  if count < 1:
    raise ValueError(f"config.vis_images={count}: must be >= 1")
  batch = next(data.eval_batches(source, batch=count, mean=mean, std=std, limit=count,
                                 image_size=config.data.get("image_size", None)))
  raw = batch["image"] * np.asarray(std, np.float32) + np.asarray(mean, np.float32)  # back to [0, 1] to draw
  paths = []
  for spec in specs:
    reduced = model.clone(reduce=spec)
    stages = vis.stage_tokens(reduced, params, batch["image"])
    name = spec.split(":")[0]
    for i in range(count):
      path = os.path.join(workdir, f"vis_{name}_{i}.png" if count > 1 else f"vis_{name}.png")
      fig = vis.plot_stages(raw[i], stages, reduced.grid(raw.shape[1:3]), path, example=i,
                            title=f"{spec} (checkpoint step {step}, test image {i})")
      import matplotlib.pyplot as plt
      plt.close(fig)
      paths.append(path)
  print("\n".join(paths))
  return paths


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    sys.exit("eval.py: --config is required, e.g. --config configs/bench_vit.py")
  {"bench": run_bench, "eval": run_eval, "sweep": run_sweep, "recon": run_recon,
   "compare": run_compare, "vis": run_vis}[_MODE.value](_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

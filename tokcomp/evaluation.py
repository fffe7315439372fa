"""Evaluation: accuracy on a split, trained params from a workdir, and the training-free reducer sweep.

The sweep takes one trained checkpoint and evaluates it under many reducers and strengths with no retraining:
accuracy on the split, analytic GFLOPs, and img/s of the jitted forward (timed as `bench.time_models`: compiled
once, warmed up, interleaved, median). It writes a table (JSON + markdown) and a plot of accuracy against
GFLOPs and against img/s.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from tokcomp import bench, data
from tokcomp.models import vit


def accuracy(model: vit.ViT, params, source, *, batch: int, mean=(0.5,), std=(0.5,),
             limit: int | None = None, image_size: int | None = None) -> dict[str, float]:
  """Top-1 accuracy over a split: every example once; the padded last batch is masked out.

  Also `valid_tokens`: the mean number of valid slots after the last block. It equals the static count except
  for methods with a capacity plus a validity mask (ATS), where it is their effective count.
  """
  @jax.jit
  def correct(p, images, labels, mask):
    logits, aux = model.apply(p, images)
    valid = jnp.sum(aux["tokens"].mask, axis=1)
    return jnp.sum((jnp.argmax(logits, -1) == labels) & mask), jnp.sum(jnp.where(mask, valid, 0))

  hits, total, valid = 0, 0, 0
  for b in data.eval_batches(source, batch=batch, mean=mean, std=std, limit=limit, image_size=image_size):
    h, v = correct(params, b["image"], b["label"], b["mask"])
    hits, valid = hits + int(h), valid + int(v)
    total += int(b["mask"].sum())
  return {"accuracy": hits / total, "examples": total, "valid_tokens": valid / total}


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """The model params of the latest (or given) orbax checkpoint that train.py wrote in `workdir/ckpt`."""
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.path.join(workdir, "ckpt"))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoints in {path!r}: train first (python train.py --workdir {workdir})")
  mngr = ocp.CheckpointManager(path, item_names=("state", "data"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint steps in {path!r}")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree_util.tree_map(jnp.asarray, restored["state"]["params"]), step


@dataclasses.dataclass
class SweepRow:
  reducer: str
  accuracy: float
  gflops: float
  flop_ratio: float
  img_s: float
  speedup: float
  tokens_per_layer: list[int]
  valid_tokens: float = 0.0  # mean valid slots after the last block (< the static count only for masked methods)


FINE_TUNED = " [fine-tuned]"  # the label suffix of rows whose model was fine-tuned with its reducer


def sweep(model: vit.ViT, params, source, specs: Sequence[str], *, batch: int, mean=(0.5,), std=(0.5,),
          limit: int | None = None, image_size: int | None = None, runs: int = 10, warmup: int = 2,
          log=print, fine_tuned: Sequence[tuple] = ()) -> list[SweepRow]:
  """Evaluates `model` (dense weights) under every reducer spec, training-free. The first row is dense.
  fine_tuned: (spec, params) pairs of models fine-tuned with their reducer (learned reducers, or training-free
  ones trained in), or (label, params, other_model) triples for a fine-tuned model of another architecture
  (e.g. LookupViT; other_model None means `model`), measured in the same run and labelled
  "<spec> [fine-tuned]"."""
  specs = ["dense"] + [s for s in specs if s not in ("dense", "none", "")]
  models = {s: model.clone(reduce=None if s == "dense" else s) for s in specs}
  own = {}
  for spec, p, *other in fine_tuned:
    other = other[0] if other else None
    models[spec + FINE_TUNED] = model.clone(reduce=spec) if other is None else other
    own[spec + FINE_TUNED] = p
  timing_batch = next(data.eval_batches(source, batch=batch, mean=mean, std=std, image_size=image_size))["image"]
  image_hw, channels = timing_batch.shape[1:3], timing_batch.shape[3]
  timings = bench.time_models(models, params, jnp.asarray(timing_batch), warmup=warmup, runs=runs, log=log,
                              params_by_name=own)
  rows = []
  for s, m in models.items():
    acc = accuracy(m, own.get(s, params), source, batch=batch, mean=mean, std=std, limit=limit,
                   image_size=image_size)
    _, counts = m.plan(image_hw)
    rows.append(SweepRow(reducer=s, accuracy=acc["accuracy"], gflops=m.flops(image_hw, channels) / 1e9,
                         flop_ratio=0.0, img_s=batch / timings[s].median_s, speedup=0.0,
                         tokens_per_layer=[c.n_mlp for c in counts], valid_tokens=acc["valid_tokens"]))
    log(f"{s:32s} acc {acc['accuracy']:.4f}  {rows[-1].gflops:.3f} GFLOPs  {rows[-1].img_s:.0f} img/s")
  for r in rows:
    r.flop_ratio, r.speedup = rows[0].gflops / r.gflops, r.img_s / rows[0].img_s
  return rows


def family(spec: str) -> str:
  """The method of a row: "tome:r=8" -> "tome"; a fine-tuned row is its own family, "tome (fine-tuned)"."""
  name = spec.split(":")[0].removesuffix(FINE_TUNED)
  return name + " (fine-tuned)" if spec.endswith(FINE_TUNED) else name


def best_at_flops(rows: Sequence[SweepRow], targets: Sequence[float]) -> dict[str, list[tuple[str, float]]]:
  """{"50 %": [(method, accuracy), ...] best first} at each fraction of the dense GFLOPs (rows[0] is dense),
  interpolated linearly between a method's two measured points around the fraction. Methods whose measured
  FLOPs do not span it are left out (no extrapolation), and so are fine-tuned rows: each is its own model, so two
  of one method (e.g. TokenLearner v1 and v1.1) are not points of one curve."""
  out = {}
  for t in targets:
    g = t * rows[0].gflops
    ranking = []
    for fam in sorted({family(r.reducer) for r in rows[1:] if not r.reducer.endswith(FINE_TUNED)}):
      pts = sorted((r.gflops, r.accuracy) for r in rows[1:] if family(r.reducer) == fam)
      for (g0, a0), (g1, a1) in zip(pts, pts[1:]):
        if g0 <= g <= g1:
          ranking.append((fam, a0 if g1 == g0 else a0 + (a1 - a0) * (g - g0) / (g1 - g0)))
          break
    if ranking:
      out[f"{100 * t:.0f} %"] = sorted(ranking, key=lambda fa: -fa[1])
  return out


def write_sweep(rows: Sequence[SweepRow], workdir: str, title: str, name: str = "sweep",
                targets: Sequence[float] = (0.5, 0.7)) -> dict:
  """`<name>.json`, `<name>.md` and `<name>.png` (accuracy vs GFLOPs and vs img/s) in `workdir`, plus which
  method is best at each of `targets` (fractions of the dense FLOPs)."""
  os.makedirs(workdir, exist_ok=True)
  device, date = bench.device_name(), datetime.date.today().isoformat()
  payload = {"title": title, "device": device, "date": date, "jax": jax.__version__,
             "rows": [dataclasses.asdict(r) for r in rows]}
  md = (f"{title}\n\nDevice: {device}. Date: {date}. JAX {jax.__version__}. Training-free: one checkpoint, "
        f"reducers applied at evaluation; rows marked [fine-tuned] are models fine-tuned with their reducer. "
        f"FLOP ratio = dense / reduced GFLOPs; valid = mean valid tokens after "
        f"the last block (below the static count only for masked methods such as ATS).\n\n"
        f"| reducer | accuracy | GFLOPs | FLOP ratio | img/s | speedup | tokens after each block | valid |\n"
        f"|---|---|---|---|---|---|---|---|\n")
  md += "".join(f"| {r.reducer} | {100 * r.accuracy:.2f} % | {r.gflops:.3f} | {r.flop_ratio:.2f} | {r.img_s:.0f} | "
                f"{r.speedup:.2f} | {'-'.join(map(str, r.tokens_per_layer))} | {r.valid_tokens:.1f} |\n"
                for r in rows)
  best = best_at_flops(rows, targets)
  payload["best_at_flops"] = best
  if best:
    md += ("\nAccuracy at a fraction of the dense FLOPs, interpolated linearly along each method's measured curve "
           "(methods whose curve spans the fraction):\n\n| fraction of dense GFLOPs | best | accuracy | all |\n"
           "|---|---|---|---|\n")
    for frac, ranking in best.items():
      cells = ", ".join(f"{m} {100 * a:.2f} %" for m, a in ranking)
      md += f"| {frac} | {ranking[0][0]} | {100 * ranking[0][1]:.2f} % | {cells} |\n"
  with open(os.path.join(workdir, name + ".json"), "w") as f:
    json.dump(payload, f, indent=1)
  with open(os.path.join(workdir, name + ".md"), "w") as f:
    f.write(md)
  plot_sweep(rows, os.path.join(workdir, name + ".png"), f"{title}\n{device}, {date}")
  return payload


def plot_sweep(rows: Sequence[SweepRow], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  families: dict[str, list[SweepRow]] = {}
  for r in rows[1:]:
    families.setdefault(family(r.reducer), []).append(r)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, label in ((axes[0], "gflops", "GFLOPs per image"), (axes[1], "img_s", "img/s")):
    for i, (fam, rs) in enumerate(sorted(families.items())):
      rs = sorted(rs, key=lambda r: getattr(r, key))
      line = "none" if rs[0].reducer.endswith(FINE_TUNED) else "-"  # fine-tuned rows are separate models
      ax.plot([getattr(r, key) for r in rs], [100 * r.accuracy for r in rs], linestyle=line,
              marker="osv^DPXh<>"[i % 10], color=plt.get_cmap("tab20")(i % 20), label=fam, ms=4)
    ax.plot([getattr(rows[0], key)], [100 * rows[0].accuracy], "k*", ms=12, label="dense")
    ax.set_xlabel(label)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

"""Every learned reducer (a registered Method with a linen `module`) trains through train.py with its config in
configs/fmnist_learned.py: a fine-tune from a dense run, its own parameters fresh, its sown losses and the
configured distillation in the objective, then inference at its static counts."""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from configs import fmnist_learned  # noqa: E402
from tokcomp import evaluation, reducers  # noqa: E402

LEARNED = [n for n in reducers.names() if reducers.get(n).module is not None]


def test_every_learned_reducer_has_a_config():
  assert set(LEARNED) <= set(fmnist_learned.METHODS)


# sit_frd runs in tests/test_sit.py::test_frd_trains_through_train_py, with FRD's own checks.
@pytest.mark.parametrize("name", sorted(set(fmnist_learned.METHODS) - {"sit_frd"}))
def test_fine_tunes_through_train_py(name, dense_run, tmp_path):
  c = fmnist_learned.get_config(f"method={name},runlocal,init_from={dense_run}")
  c.steps, c.log_every = 3, 1
  if c.get("reduce_anneal"):  # stretch the anneal over the 3 steps: keep 1, then the cosine midpoint, then base
    c.reduce_anneal.update(start=1, steps=2, stages=2)
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["steps"] == 3 and summary["reduce"] == c.reduce
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  for row in rows:
    assert np.isfinite(row["loss"])
    total = sum(v for k, v in row.items() if k.startswith("loss_"))
    np.testing.assert_allclose(total, row["loss"], rtol=1e-5)  # the logged parts make up the objective
    for part in ("distill_logits", "distill_tokens"):
      if c.get("distill") and c.distill[part.split("_")[1]]:
        assert row[f"loss_{part}"] >= 0
  if c.get("reduce_anneal"):  # EViT's anneal: stages of growing reduction, logged per step
    assert [r["reduce"] for r in rows] == ["evit:keep=1.0,layers=1", "evit:keep=0.775,layers=1", c.reduce]
    assert [r["tokens_per_layer"] for r in rows] == [[50, 50], [50, 40], [50, 29]]
  # The fine-tuned model holds the reducer's own parameters beside every dense one of the run it started from.
  params, _ = evaluation.restore_params(str(tmp_path))
  dense, _ = evaluation.restore_params(dense_run)
  blocks = params["params"]["Transformer"]
  own = {k: v for k, v in blocks.items() if k.startswith("encoderblock_")}
  method = c.reduce.split(":")[0]  # a config entry may be a variant of its method (tokenlearner_v1, sit_frd)
  if method in LEARNED:
    assert any(method in b for b in own.values()), f"no {method} parameters in the fine-tuned model"
  else:  # a training-free method trained in: exactly the dense parameters
    assert set(own) == {k for k in dense["params"]["Transformer"] if k.startswith("encoderblock_")}
  if method in LEARNED and reducers.get(method).export is not None:  # a search: its export runs training-free
    from tokcomp.models import vit
    path = tmp_path / "compression_rate.json"
    model = vit.ViT(**c.model, reduce=f"diffrate:schedule={path}")
    assert model.flops((28, 28), 1) < vit.ViT(**c.model).flops((28, 28), 1)
  else:
    assert summary["tokens_per_layer"][-1] < summary["tokens_per_layer"][0]  # inference reduces
  assert set(dense["params"]) <= set(params["params"])


def test_sweep_adds_fine_tuned_rows(dense_run, tmp_path):
  """eval.py --mode=sweep with config.fine_tuned: each fine-tuned model is measured beside the training-free rows,
  as its own family: a ViT with a learned reducer, and a model of another architecture (LookupViT), which the
  sweep builds from its run's summary.json."""
  import subprocess
  from configs import fmnist_lookupvit
  run, lookup_run = str(tmp_path / "dyn"), str(tmp_path / "lookup")
  c = fmnist_learned.get_config(f"method=dynamicvit,runlocal,init_from={dense_run}")
  train.train_and_evaluate(c, run)
  lookup = train.train_and_evaluate(fmnist_lookupvit.get_config("runlocal"), lookup_run)
  r = subprocess.run([sys.executable, "eval.py", "--mode=sweep",
                      f"--config=configs/fmnist_vit.py:runlocal,fine_tuned={run};{lookup_run}",
                      f"--workdir={dense_run}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(dense_run, "sweep.json")) as f:
    rows = {row["reducer"]: row for row in json.load(f)["rows"]}
  label = c.reduce + evaluation.FINE_TUNED
  assert label in rows and rows[label]["gflops"] < rows["dense"]["gflops"]
  assert evaluation.family(label) == "dynamicvit (fine-tuned)" and evaluation.family("tome:r=4") == "tome"
  row = rows["lookupvit" + evaluation.FINE_TUNED]  # its own model: its FLOPs and accuracy, not the ViT's
  np.testing.assert_allclose(row["gflops"], lookup["gflops"], rtol=1e-9)
  np.testing.assert_allclose(row["accuracy"], lookup["test_accuracy"], atol=1e-6)
  assert row["tokens_per_layer"] == lookup["tokens_per_layer"] != rows["dense"]["tokens_per_layer"]

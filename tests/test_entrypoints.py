"""train.py / eval.py run end to end on small settings; every config builds."""
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_builds(path):
  name = os.path.basename(path)[:-3]
  if name in ("__init__", "common"):
    return
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(None)
  assert len(config) > 0
  assert "python " in module.__doc__, f"{name}: the docstring must hold the command that runs it"


def test_config_args_reject_unknown_keys():
  from configs import bench_vit
  with pytest.raises(ValueError, match="unknown; valid"):
    bench_vit.get_config("nosuch=1")


def test_eval_bench_cli(tmp_path):
  """The README's main job, as a user runs it, on a tiny setting."""
  out = subprocess.run(
      [sys.executable, "eval.py", "--mode=bench", "--config",
       "configs/bench_vit.py:variant=Ti/16,image_size=64,batch=2,runs=2,warmup=1,"
       "reducers=tome:r=2;evit:keep=0.7,layers=1-2", "--workdir", str(tmp_path)],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
  assert [r["reducer"] for r in rows] == ["dense", "tome:r=2", "evit:keep=0.7,layers=1-2"]
  assert rows[1]["flop_ratio"] > 1.0 and all(r["img_s"] > 0 for r in rows)
  assert "| ViT-Ti/16@64 | tome:r=2 |" in (tmp_path / "bench.md").read_text()


def _cli(*args, timeout=600):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_train_then_eval_and_sweep_cli(tmp_path):
  """train.py -> eval.py --mode=eval -> eval.py --mode=sweep, as a user runs them (tiny config)."""
  w = str(tmp_path)
  _cli("train.py", "--config", "configs/fmnist_vit.py:runlocal", "--workdir", w)
  _cli("eval.py", "--mode=eval", "--config", "configs/fmnist_vit.py:runlocal", "--workdir", w)
  result = json.loads((tmp_path / "eval.json").read_text())
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert result["step"] == 2 and result["accuracy"] == summary["test_accuracy"]
  _cli("eval.py", "--mode=sweep", "--config", "configs/fmnist_vit.py:runlocal", "--workdir", w)
  rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
  assert [r["reducer"] for r in rows] == ["dense", "tome:r=4", "evit:keep=0.7,layers=1"]
  assert rows[0]["accuracy"] == summary["test_accuracy"]
  assert all(r["img_s"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows) and rows[1]["flop_ratio"] > 1
  assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  out = subprocess.run([sys.executable, "eval.py", "--mode=eval", "--config", "configs/fmnist_vit.py:runlocal",
                        "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "train first" in out.stderr

"""train.py: a real run on the embedded Fashion-MNIST subset, auto-resume, and sharded training."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from configs import fmnist_vit  # noqa: E402


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def config(steps, **kw):
  c = fmnist_vit.get_config("runlocal," + ",".join(f"{k}={v}" for k, v in kw.items()))
  c.steps = steps
  return c


def test_two_steps_with_reducer(tmp_path):
  summary = train.train_and_evaluate(config(2, reduce="tome:r=4"), str(tmp_path))
  assert summary["steps"] == 2 and summary["tokens_per_layer"] == [46, 42]
  assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_examples"] == 256
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_resume_continues_exactly(tmp_path):
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  train.train_and_evaluate(config(4), straight)
  train.train_and_evaluate(config(2), split)
  summary = train.train_and_evaluate(config(4), split)  # resumes model, optimiser and data at step 2
  assert summary["steps"] == 4
  a, b = losses(straight), losses(split)
  with open(os.path.join(split, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == [1, 2, 3, 4]  # no duplicated rows after the resume
  np.testing.assert_allclose([b[3], b[4]], [a[3], a[4]], rtol=1e-5)


def test_bad_mesh_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="mesh_fsdp=3"):
    train.train_and_evaluate(config(1, mesh_fsdp=3), str(tmp_path))


SHARDED = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import train
from configs import fmnist_vit
out = {}
for fsdp in (1, 2):
  c = fmnist_vit.get_config("runlocal,reduce=evit:keep=0.7,layers=1,mesh_fsdp=%d" % fsdp)
  c.steps, c.lr, c.model["width"], c.model["mlp_dim"] = 5, 1e-2, 64, 128  # FSDP splits some kernels
  out[fsdp] = train.train_and_evaluate(c, sys.argv[2] + "/fsdp%d" % fsdp)["final_loss"]
c.batch = 12  # not a multiple of 8 devices
try:
  train.train_and_evaluate(c, sys.argv[2] + "/bad")
except ValueError as e:
  out["bad_batch"] = str(e)
print(json.dumps(out))
"""


def test_sharded_training_matches_single_device(tmp_path):
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", SHARDED, ROOT, str(tmp_path)], env=env, capture_output=True, text=True,
                     timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-4000:]
  eight = json.loads(r.stdout.strip().splitlines()[-1])
  c = config(5, reduce="evit:keep=0.7,layers=1")
  c.lr, c.model["width"], c.model["mlp_dim"] = 1e-2, 64, 128
  one = train.train_and_evaluate(c, str(tmp_path / "one"))["final_loss"]
  assert abs(one - np.log(10)) > 1e-3, "the loss must have moved for this comparison to mean anything"
  np.testing.assert_allclose([eight["1"], eight["2"]], [one, one], rtol=1e-4)
  assert "config.batch=12: must be divisible by the 8 devices" in eight["bad_batch"]


def test_staged_reduction_schedule(tmp_path):
  c = config(3)
  c.reduce_schedule = "evit:keep=0.9,layers=1@0|evit:keep=0.7,layers=1@2|tome:r=4@3"
  summary = train.train_and_evaluate(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert [r["reduce"] for r in rows] == ["evit:keep=0.9,layers=1", "evit:keep=0.7,layers=1", "tome:r=4"]
  assert [r["tokens_per_layer"] for r in rows] == [[50, 47], [50, 37], [46, 42]]  # 1 + ceil(.9·49) + fused
  assert summary["reduce"] == "tome:r=4"


@pytest.mark.parametrize("change,error,match", [
    (dict(reduce="nosuch:r=1"), ValueError, "unknown reducer 'nosuch'"),
    (dict(reduce="tome:r=-1"), ValueError, "r at layer 0"),
    (dict(source="npz:/no/such/data.npz"), FileNotFoundError, "/no/such/data.npz"),
    (dict(source="hub:fashion_mnist"), ValueError, "must start with"),
])
def test_bad_configs_are_clear_errors(tmp_path, change, error, match):
  c = config(1)
  if "source" in change:
    c.data["source"] = change.pop("source")
  c.update(change)
  with pytest.raises(error, match=match):
    train.train_and_evaluate(c, str(tmp_path))


def test_bad_reduce_schedule(tmp_path):
  c = config(1)
  c.reduce_schedule = "tome:r=4"
  with pytest.raises(ValueError, match="must be 'spec@step'"):
    train.train_and_evaluate(c, str(tmp_path))


def test_bad_reduce_anneal():
  c = config(1)
  c.reduce_anneal = dict(spec="evit:keep=0.7,layers=1", start=0, steps=2, base=0.5)
  with pytest.raises(ValueError, match="must contain '{keep}'"):
    train.reduce_stages(c)
  c.reduce_anneal.spec, c.reduce_schedule = "evit:keep={keep},layers=1", "tome:r=4@1"
  with pytest.raises(ValueError, match="exclusive"):
    train.reduce_stages(c)


def test_distillation_needs_a_teacher(tmp_path):
  c = config(1, reduce="dynamicvit:keep=0.7,layers=1")
  c.distill = dict(teacher="init", logits=0.5, tokens=0.5)
  with pytest.raises(ValueError, match="needs config.init_from"):
    train.train_and_evaluate(c, str(tmp_path))


def test_per_block_run_fine_tunes_into_a_scan_model(tmp_path):
  """init_from converts a per-block checkpoint to the scan layout; with lr=0 the scan run keeps those weights."""
  from tokcomp import evaluation
  from tokcomp.models import vit
  dense = str(tmp_path / "dense")
  train.train_and_evaluate(config(1), dense)
  c = config(1, scan=True, remat="full", reduce="evit:keep=0.7,layers=1", init_from=dense)
  c.lr, c.weight_decay = 0.0, 0.0
  summary = train.train_and_evaluate(c, str(tmp_path / "scan"))
  assert np.isfinite(summary["final_loss"])
  before, _ = evaluation.restore_params(dense)
  after, _ = evaluation.restore_params(str(tmp_path / "scan"))
  before, after = before["params"], after["params"]
  assert "encoderblock" in after["Transformer"] and "encoderblock_0" not in after["Transformer"]
  for a, b in zip(*(jax.tree_util.tree_leaves(t) for t in (vit.stack_blocks(before), after))):
    np.testing.assert_array_equal(a, b)


def test_imagenet_config_one_step_on_mock_data(tmp_path):
  """configs/imagenet_vit_s16.py as written (ViT-S/16 at 224, inception crop, mixup), one step on tfds mock data."""
  import tensorflow_datasets as tfds
  from configs import imagenet_vit_s16
  c = imagenet_vit_s16.get_config("batch=2,dtype=float32,workers=0")
  c.steps, c.warmup_steps, c.log_every, c.ckpt_every, c.eval_batch, c.eval_limit = 1, 1, 1, 1, 2, 2
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["steps"] == 1 and summary["test_examples"] == 2 and np.isfinite(summary["final_loss"])
  assert summary["tokens_per_layer"] == [197] * 12


def test_bf16_compute_trains(tmp_path):
  c = config(3, dtype="bfloat16", reduce="tome:r=4")
  c.lr = 1e-2
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(summary["final_loss"]) and abs(summary["final_loss"] - np.log(10)) > 1e-3


def test_kept_fresh_leaves_are_reported_per_module():
  leaves = ["params/Transformer/encoderblock_1/sit/hidden/bias", "params/Transformer/encoderblock_1/sit/rtsm/norm1/scale",
            "params/Transformer/encoderblock_2/sit/scale", "params/head/kernel"]
  assert train._modules(leaves) == ("4 leaves in Transformer/encoderblock_1/sit, Transformer/encoderblock_2/sit, "
                                    "head")

"""docs/tpu.md's pod configuration, traced on 8 simulated CPU devices: configs/imagenet_vit_s16.py with
mesh_fsdp=2 (a data=4 x fsdp=2 mesh), shrunk to a 2-block ViT on 64 px tfds mock data, with ToMe trained in and
bf16 compute as on TPU. train.py's own sharded step is lowered, compiled and run once; the test checks the
layout the doc describes: the batch split over (data, fsdp), large kernels and their Adam moments split on fsdp,
small arrays replicated, fp32 parameters. Also: train.main reaches `jax.distributed.initialize()` (with
TOKCOMP_DISTRIBUTED=1) before anything has started a JAX backend.

The pytest process already runs jax on one device, so both checks run in subprocesses (as tests/test_sharding.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.train_and_evaluate as written, with jax.jit wrapped so that train.py's step (the functools.partial of
# `train_step` it jits with in/out shardings and a donated state) is lowered and compiled explicitly: the
# compiled executable's input/output shardings are recorded, then it runs the step. Prints one JSON line.
POD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import jax
import tensorflow_datasets as tfds
import train
from configs import imagenet_vit_s16

config = imagenet_vit_s16.get_config("reduce=tome:r=4,batch=16,mesh_fsdp=2,workers=0")  # dtype: bfloat16
config.model.update(width=64, depth=2, mlp_dim=256, num_heads=2)  # tiny; patch 16, 1000 classes as ViT-S/16
config.data.image_size = 64
config.steps, config.warmup_steps, config.log_every, config.ckpt_every = 1, 1, 1, 1
config.eval_batch, config.eval_limit = 16, 16

def name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

def layout(shardings, values):
  out = {}
  for (path, s), v in zip(jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree_util.tree_leaves(values),
                          strict=True):
    spec = list(getattr(s, "spec", ())) + [None] * (v.ndim - len(getattr(s, "spec", ())))
    out[name(path)] = {"shape": list(v.shape), "dtype": str(v.dtype), "shard_shape": list(s.shard_shape(v.shape)),
                       "spec": [list(p) if isinstance(p, tuple) else p for p in spec]}
  return out

seen = {}
real_jit = jax.jit

def recording_jit(fun, *args, **kwargs):
  jitted = real_jit(fun, *args, **kwargs)
  if getattr(getattr(fun, "func", None), "__name__", None) != "train_step":
    return jitted
  def step(state, batch, rng, teacher_params):
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch, rng, teacher_params)
    compiled = lowered.compile()
    seen["compile_s"] = round(time.perf_counter() - t0, 2)
    (state_in, batch_in, _, _), _ = compiled.input_shardings
    seen["mesh"] = dict(batch["image"].sharding.mesh.shape)
    seen["state_in"] = layout(state_in, state)
    seen["state_out"] = layout(compiled.output_shardings[0], state)
    seen["batch"] = layout(batch_in, batch)
    new_state, metrics = compiled(state, batch, rng, teacher_params)
    seen["loss"] = float(metrics["loss"])
    seen["state_returned"] = layout(jax.tree.map(lambda a: a.sharding, new_state), new_state)
    return new_state, metrics
  return step

jax.jit = recording_jit
with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
  summary = train.train_and_evaluate(config, sys.argv[2])
jax.jit = real_jit
seen["devices"] = [jax.device_count(), jax.devices()[0].platform]
seen["summary"] = {k: summary[k] for k in ("steps", "tokens_per_layer", "final_loss")}
print(json.dumps(seen))
"""

# train.main with TOKCOMP_DISTRIBUTED=1: jax.distributed.initialize is the real one, given a one-process
# localhost cluster (it raises RuntimeError if a backend was started before it); the run itself is stubbed.
DISTRIBUTED = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
import jax
from absl import flags
import train

with socket.socket() as s:
  s.bind(("localhost", 0))
  port = s.getsockname()[1]
calls = []
real_initialize = jax.distributed.initialize
def initialize():
  calls.append(port)
  real_initialize(coordinator_address=f"localhost:{port}", num_processes=1, process_id=0)
jax.distributed.initialize = initialize
train.train_and_evaluate = lambda config, workdir: calls.append(jax.process_count())
flags.FLAGS(["train.py", "--workdir", sys.argv[2]])
train.main([])
print(json.dumps({"calls": calls}))
jax.distributed.shutdown()
"""


def _env(**extra) -> dict:
  return {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
          "JAX_PLATFORMS": "cpu", **extra}


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-c", POD, ROOT, str(tmp_path_factory.mktemp("pod"))], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"pod config run failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
  out = json.loads(r.stdout.strip().splitlines()[-1])
  out["_seconds"] = time.perf_counter() - t0
  return out


P = "params/params/"
BLOCK = P + "Transformer/encoderblock_0/"
# (path under the state, global shape, spec over the (data, fsdp) mesh): what docs/tpu.md says train.py does.
EXPECTED = [
    (BLOCK + "MlpBlock_0/Dense_0/kernel", [64, 256], [None, "fsdp"]),       # 16384 elements: split
    (BLOCK + "MlpBlock_0/Dense_1/kernel", [256, 64], ["fsdp", None]),
    (P + "embedding/kernel", [16, 16, 3, 64], [None, None, None, "fsdp"]),  # largest axis first
    (P + "head/kernel", [64, 1000], [None, "fsdp"]),
    (BLOCK + "MultiHeadDotProductAttention_0/query/kernel", [64, 2, 32], [None, None, None]),  # 4096: whole
    (BLOCK + "MlpBlock_0/Dense_0/bias", [256], [None]),
    (P + "cls", [1, 1, 64], [None, None, None]),
]


def test_eight_devices_as_a_data_by_fsdp_mesh(pod):
  assert pod["devices"] == [8, "cpu"]
  assert pod["mesh"] == {"data": 4, "fsdp": 2}


def test_the_step_lowers_compiles_and_trains_one_step(pod):
  assert pod["summary"]["steps"] == 1
  assert pod["summary"]["tokens_per_layer"] == [13, 9]  # 1 + 16 patches, ToMe r=4 in each of the 2 blocks
  assert pod["loss"] == pod["summary"]["final_loss"]
  assert abs(pod["loss"] - math.log(1000)) < 1e-3  # the head starts at zero: uniform over 1000 classes


def test_batch_is_split_over_data_and_fsdp(pod):
  image, label = pod["batch"]["image"], pod["batch"]["label"]
  assert image["shape"] == [16, 64, 64, 3] and image["shard_shape"] == [2, 64, 64, 3]
  assert image["spec"] == [["data", "fsdp"], None, None, None]
  assert label["shard_shape"] == [2] and label["spec"] == [["data", "fsdp"]]


@pytest.mark.parametrize("path,shape,spec", EXPECTED, ids=["/".join(e[0].split("/")[-3:]) for e in EXPECTED])
def test_param_layout(pod, path, shape, spec):
  leaf = pod["state_in"][path]
  assert (leaf["shape"], leaf["spec"]) == (shape, spec)
  split = [n // 2 if s == "fsdp" else n for n, s in zip(shape, spec)]
  assert leaf["shard_shape"] == split


def test_every_param_is_fp32_and_split_iff_large(pod):
  params = {k: v for k, v in pod["state_in"].items() if k.startswith(P)}
  assert len(params) > 20
  for path, leaf in params.items():
    assert leaf["dtype"] == "float32", path  # bf16 is the compute dtype only
    size = 1
    for n in leaf["shape"]:
      size *= n
    assert leaf["spec"].count("fsdp") == (1 if size >= 2 ** 14 else 0), (path, leaf)
    assert all(s in (None, "fsdp") for s in leaf["spec"]), (path, leaf)  # never split over "data"


def test_adam_moments_follow_their_params(pod):
  state = pod["state_in"]
  params = {k[len(P):]: v["spec"] for k, v in state.items() if k.startswith(P)}
  for moment in ("mu", "nu"):
    got = {k.split(f"/{moment}/params/", 1)[1]: v["spec"] for k, v in state.items() if f"/{moment}/params/" in k}
    assert got == params, moment
  assert state["step"]["spec"] == [] and state["step"]["shard_shape"] == []


def test_step_keeps_the_layout(pod):
  assert pod["state_out"] == pod["state_in"]
  assert pod["state_returned"] == pod["state_in"]


def test_pod_check_is_fast(pod):
  """A guard against blow-ups, not a benchmark."""
  assert pod["_seconds"] < 120, f"the pod config run took {pod['_seconds']:.0f} s"


def test_main_initializes_distributed_before_any_backend(tmp_path):
  r = subprocess.run([sys.executable, "-c", DISTRIBUTED, ROOT, str(tmp_path)], cwd=ROOT,
                     env=_env(TOKCOMP_DISTRIBUTED="1"), capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, f"train.main with TOKCOMP_DISTRIBUTED=1 failed:\n{r.stderr[-4000:]}"
  calls = json.loads(r.stdout.strip().splitlines()[-1])["calls"]
  assert len(calls) == 2 and calls[1] == 1  # initialised once, then the (stubbed) run saw one process

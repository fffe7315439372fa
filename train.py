r"""Training entry point (big_vision style): `python train.py --config configs/x.py:arg --workdir DIR`.

One story, top to bottom: mesh -> input -> model -> sharded state -> step -> checkpoint (auto-resume) -> loop ->
evaluation. The work is in `train_and_evaluate(config, workdir)`, which tests and notebooks import.

- Mesh: devices reshaped to (data, fsdp); the batch is split over both axes, parameters are replicated or,
  with fsdp > 1, sharded FSDP-style along their largest divisible axis. One jit with in/out shardings and a
  donated state; token ops never cross examples, so they add no collectives.
- Input: grain over a tfds / npz / embedded source; each host reads its own shard
  (`jax.make_array_from_process_local_data` builds the global batch).
- Optimiser: optax AdamW, linear warmup + cosine decay, global-norm clipping, label smoothing, optional mixup,
  optional bf16 compute (params and optimiser state stay fp32).
- Any registered reducer can be trained in (`config.reduce`, e.g. "tome:r=8" or "evit:keep=0.7,layers=3-6-9").
- Orbax `CheckpointManager` in `workdir/ckpt`: keeps `config.keep_ckpts`, saves every `config.ckpt_every` steps
  and at the end, and resumes the model, optimiser and data iterator from the latest step.
- Logs: `workdir/metrics.jsonl` (loss, lr, img/s, tokens per layer) and a progress line on stdout.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from tokcomp import data
from tokcomp.models import vit

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/train", "Checkpoints, metrics.jsonl and summary.json.")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# --- mesh and sharding -----------------------------------------------------------------------------------------

def make_mesh(config) -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices())
  fsdp = int(config.get("mesh_fsdp", 1))
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"config.mesh_fsdp={fsdp}: must divide the device count {len(devices)}")
  return jax.sharding.Mesh(devices.reshape(-1, fsdp), ("data", "fsdp"))


def param_sharding(mesh: jax.sharding.Mesh, tree, min_size: int = 2 ** 14):
  """Replicated, or with fsdp > 1 the largest axis divisible by the fsdp size is split (small arrays stay whole)."""
  n = mesh.shape["fsdp"]

  def spec(x):
    if n == 1 or x.size < min_size:
      return NamedSharding(mesh, P())
    for axis in np.argsort(x.shape)[::-1]:
      if x.shape[axis] % n == 0:
        parts = [None] * x.ndim
        parts[axis] = "fsdp"
        return NamedSharding(mesh, P(*parts))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(spec, tree)


def global_batch(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# --- the run -------------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config)

  # Input.
  train_src = data.get_source(config.data.source, config.data.train_split)
  test_src = data.get_source(config.data.source, config.data.test_split)
  mean, std = data.stats_for(config.data.source)
  loader = data.train_loader(train_src, global_batch=config.batch, seed=config.seed, crop_pad=config.data.crop_pad,
                             flip=config.data.flip, mean=mean, std=std)
  image_hw = tuple(np.asarray(train_src[0]["image"]).shape[:2])
  in_channels = int(np.asarray(train_src[0]["image"]).reshape(*image_hw, -1).shape[-1])

  # Model.
  dtype = jnp.dtype(config.get("dtype", "float32"))
  model = vit.ViT(**config.model, reduce=config.reduce or None, dtype=dtype)
  _, counts = model.plan(image_hw)
  tokens_per_layer = [c.n_mlp for c in counts]
  num_classes = config.model["num_classes"]

  # Optimiser.
  lr = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.steps,
                                          end_value=config.lr * config.get("lr_end_factor", 0.0))
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                   optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=config.weight_decay))

  # Sharded state: parameters are created directly in their sharding.
  def init(rng):
    dummy = jnp.zeros((1, *image_hw, in_channels))
    params = model.clone(reduce=None).init(rng, dummy)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  state_sharding = param_sharding(mesh, abstract)
  state_sharding = state_sharding.replace(step=NamedSharding(mesh, P()))
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(config.seed))

  # Step.
  def train_step(state: TrainState, batch, rng):
    def loss_fn(params):
      images = batch["image"].astype(dtype)
      labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), config.label_smoothing)
      images, labels = data.mixup(rng, images, labels, config.get("mixup", 0.0))
      logits, _ = model.apply(params, images, train=True)
      return optax.softmax_cross_entropy(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
        "loss": loss, "grad_norm": optax.tree.norm(grads)}

  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  step_fn = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, NamedSharding(mesh, P())),
                    out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=0)

  # Checkpoints: resume model, optimiser and data position from the latest step.
  ckpt = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "ckpt")), item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_ckpts, save_interval_steps=config.ckpt_every,
                                           enable_async_checkpointing=False))
  it = iter(loader)
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    restored = ckpt.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)),
        data=data.grain.PyGrainCheckpointRestore(it)))
    state = restored["state"]
    print(f"resumed from step {start} in {workdir}", flush=True)

  # Loop.
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  rng = jax.random.key(config.seed + 1)
  t_log, n_log, loss = time.perf_counter(), 0, float("nan")
  for step in range(start + 1, config.steps + 1):
    batch = global_batch(mesh, {k: v for k, v in next(it).items() if k in ("image", "label")})
    state, m = step_fn(state, batch, jax.random.fold_in(rng, step))
    n_log += config.batch
    if step % config.log_every == 0 or step == config.steps:
      loss = float(m["loss"])  # the only host sync in the loop, once per log interval
      if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}")
      dt = time.perf_counter() - t_log
      row = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(lr(step)),
             "img_per_s": n_log / dt, "tokens_per_layer": tokens_per_layer}
      with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
      print(f"[{step}/{config.steps}] loss {loss:.4f}  lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s", flush=True)
      t_log, n_log = time.perf_counter(), 0
    if ckpt.should_save(step) or step == config.steps:
      ckpt.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=data.grain.PyGrainCheckpointSave(it)), force=step == config.steps)
  ckpt.wait_until_finished()

  # Evaluation.
  summary = evaluate(model, state.params, test_src, mean, std, config, mesh)
  summary.update(steps=int(state.step), final_loss=loss, reduce=config.reduce, tokens_per_layer=tokens_per_layer,
                 gflops=model.flops(image_hw, in_channels) / 1e9)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary), flush=True)
  return summary


def evaluate(model, params, source, mean, std, config, mesh) -> dict:
  """Top-1 accuracy over a split (every example once; padded last batch masked out)."""
  @jax.jit
  def correct(p, images, labels, mask):
    pred = jnp.argmax(model.apply(p, images)[0], -1)
    return jnp.sum((pred == labels) & mask)

  hits, total = 0, 0
  for b in data.eval_batches(source, batch=config.get("eval_batch", config.batch), mean=mean, std=std,
                             limit=config.get("eval_limit", None)):
    hits += int(correct(params, b["image"], b["label"], b["mask"]))
    total += int(b["mask"].sum())
  return {"test_accuracy": hits / total, "test_examples": total}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if jax.process_count() > 1 or os.environ.get("TOKCOMP_DISTRIBUTED"):
    jax.distributed.initialize()
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

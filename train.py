r"""Training entry point (big_vision style): `python train.py --config configs/x.py:arg --workdir DIR`.

Minimal for now: an in-memory Fashion-MNIST npz, optax AdamW with warmup + cosine, grad clipping and label
smoothing, any registered reducer trained in (`reduce=`), and a summary.json with the final loss and test
accuracy. The platform issue grows it (tfds/grain input, orbax auto-resume, mesh sharding, metric logs).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from tokcomp.models import vit

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/train", "Where summary.json is written.")


def load_npz(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data_path={path!r} does not exist")
  with np.load(path, allow_pickle=False) as f:
    prep = lambda x: (x.astype(np.float32)[..., None] / 255.0 - 0.286) / 0.353  # Fashion-MNIST mean / std
    return prep(f["train_images"]), f["train_labels"].astype(np.int32), prep(f["test_images"]), \
        f["test_labels"].astype(np.int32)


def train_and_evaluate(config, workdir: str) -> dict:
  xtr, ytr, xte, yte = load_npz(config.data_path)
  model = vit.ViT(**config.model, reduce=config.reduce or None)
  params = jax.jit(model.clone(reduce=None).init)(jax.random.key(config.seed), jnp.asarray(xtr[:1]))
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.steps)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                   optax.adamw(schedule, weight_decay=config.weight_decay))
  opt_state = tx.init(params)

  def loss_fn(p, x, y):
    logits, _ = model.apply(p, x, train=True)
    onehot = optax.smooth_labels(jax.nn.one_hot(y, config.model["num_classes"]), config.label_smoothing)
    return optax.softmax_cross_entropy(logits, onehot).mean()

  @jax.jit
  def step(p, o, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  @jax.jit
  def predict(p, x):
    return jnp.argmax(model.apply(p, x)[0], -1)

  rng = np.random.default_rng(config.seed)
  t0, loss = time.time(), float("nan")
  for i in range(config.steps):
    idx = rng.integers(0, len(xtr), config.batch)
    params, opt_state, loss = step(params, opt_state, xtr[idx], ytr[idx])
    if (i + 1) % 100 == 0 or i + 1 == config.steps:
      print(f"step {i + 1}/{config.steps} loss {float(loss):.4f} ({time.time() - t0:.0f}s)", flush=True)
  n_eval = len(xte) if config.steps > 10 else 256
  preds = np.concatenate([np.asarray(predict(params, xte[i:min(i + 500, n_eval)])) for i in range(0, n_eval, 500)])
  summary = {"steps": config.steps, "final_loss": float(loss), "test_accuracy": float((preds == yte[:n_eval]).mean()),
             "test_examples": n_eval, "reduce": config.reduce, "gflops": model.flops(xtr.shape[1:3], 1) / 1e9}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary))
  return summary


def main(argv):
  del argv
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)

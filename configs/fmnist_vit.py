r"""A small ViT on Fashion-MNIST (28x28, patch 2 -> 196 tokens, as many as a 224/16 ViT), optionally with a
reducer trained in.

Runs: train.py's minimal loop (optax AdamW, warmup + cosine, label smoothing) on the npz in `data_path`.
This is the foundation's minimal trainer; the platform issue adds tfds/grain input, orbax, sharding and logs.

  python train.py --config configs/fmnist_vit.py --workdir workdirs/fmnist
  python train.py --config configs/fmnist_vit.py:reduce=tome:r=8 --workdir workdirs/fmnist_tome   # ToMe trained in
  python train.py --config configs/fmnist_vit.py:runlocal --workdir /tmp/smoke                      # 2 steps, seconds

Args after the colon: reduce (''), steps (2000), batch (128), runlocal (tiny model, 2 steps).
Expect: not yet measured at full length; see the platform issue for the trained results.
"""
import os

from configs.common import parse_arg

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fashion_mnist.npz")


def get_config(arg: str | None = None):
  c = parse_arg(arg, reduce="", steps=2000, batch=128, runlocal=False, lr=1e-3, seed=0)
  c.data_path = DATA
  c.model = dict(num_classes=10, patch_size=(2, 2), width=192, depth=6, mlp_dim=384, num_heads=3)
  c.warmup_steps = min(200, c.steps // 10)
  c.weight_decay = 0.05
  c.label_smoothing = 0.1
  c.grad_clip = 1.0
  if c.runlocal:
    c.model = dict(num_classes=10, patch_size=(4, 4), width=32, depth=2, mlp_dim=64, num_heads=2)
    c.steps, c.batch, c.warmup_steps = 2, 16, 1
  return c

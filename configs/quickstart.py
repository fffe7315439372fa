r"""Quickstart: train a tiny ViT on the embedded real Fashion-MNIST subset, then sweep reducers training-free.

Runs: train.py on `embedded:fashion_mnist` (5,000 train / 1,000 test images shipped in the package, offline),
then eval.py --mode=sweep on the trained checkpoint: accuracy, GFLOPs and img/s for dense, ToMe, EViT, top-k
and random drop. This is the README's main job (`./run.sh demo`), a few minutes on 2 CPU cores.

  python train.py --config configs/quickstart.py --workdir workdirs/quickstart
  python eval.py --mode=sweep --config configs/quickstart.py --workdir workdirs/quickstart

Args after the colon: steps (1000), batch (64).
Expect: see the README's quickstart table (measured there with device and date); the dense tiny ViT reaches
roughly 80 % on the 1,000 test images, and ToMe/EViT trade a few points for up to ~2x fewer FLOPs.
"""
from configs.common import parse_arg


def get_config(arg: str | None = None):
  c = parse_arg(arg, steps=1000, batch=64, seed=0, lr=2e-3)
  c.data = dict(source="embedded:fashion_mnist", train_split="train", test_split="test", crop_pad=0, flip=True)
  # 4x4 patches of a 28x28 image: 49 tokens + CLS.
  c.model = dict(num_classes=10, patch_size=(4, 4), width=64, depth=4, mlp_dim=128, num_heads=2)
  c.reduce = ""
  c.warmup_steps = 50
  c.weight_decay = 0.05
  c.label_smoothing = 0.1
  c.grad_clip = 1.0
  c.log_every = 100
  c.ckpt_every = 1000
  c.keep_ckpts = 1
  c.eval_batch = 250
  c.sweep = ";".join([f"tome:r={r}" for r in (2, 4, 6, 8)]
                     + [f"evit:keep={k},layers=1-2" for k in (0.8, 0.6, 0.4)]
                     + ["topk:keep=0.6,layers=1-2", "random:keep=0.6,layers=1-2"])
  c.sweep_runs = 10
  return c

r"""ViT-S/16 on ImageNet-1k from scratch, DeiT recipe (Touvron et al. 2021, Table 9), optionally with a reducer
trained in: for real users on TPU/GPU. Reads `imagenet2012` through `tfds.data_source` (prepare it once with
`tfds build imagenet2012` and the manual download); no TensorFlow is needed at training time.

  python train.py --config configs/imagenet_vit_s16.py --workdir gs://bucket/vit_s16
  python train.py --config configs/imagenet_vit_s16.py:reduce=tome:r=13 --workdir gs://bucket/vit_s16_tome
  python train.py --config configs/imagenet_vit_s16.py:reduce_schedule=evit:keep=0.9,layers=3-6-9@0|evit:keep=0.7,layers=3-6-9@94000 --workdir W
  python eval.py --mode=sweep --config configs/imagenet_vit_s16.py --workdir W     # training-free reducer sweep

Args after the colon: reduce, reduce_schedule, batch (1024), epochs (300), dtype (bfloat16), mesh_fsdp (1),
data_dir (tfds data dir), workers (grain worker processes, 16), scan (False) and remat ('none'): stacked blocks
scanned, and rematerialised in the backward pass (big_vision's TPU setting is scan + remat=full).
Expect: DeiT-S reports 79.8 % top-1 after 300 epochs (with RandAugment and repeated augmentation, which this
config does not have yet); not run here: this repository has no ImageNet. CI builds the config and runs one step
of it on tfds mock data (tests/test_train.py).
"""
from configs.common import parse_arg
from tokcomp.models.vit import decode_variant

TRAIN_IMAGES = 1_281_167


def get_config(arg: str | None = None):
  c = parse_arg(arg, reduce="", reduce_schedule="", batch=1024, epochs=300, dtype="bfloat16", mesh_fsdp=1,
                data_dir="", workers=16, seed=0, scan=False, remat="none")
  c.data = dict(source="tfds:imagenet2012", train_split="train", test_split="validation", image_size=224,
                inception_crop=True, flip=True, workers=c.workers)
  c.model = dict(num_classes=1000, **decode_variant("S/16"), scan=c.scan, remat=c.remat)
  steps_per_epoch = TRAIN_IMAGES // c.batch
  c.steps = c.epochs * steps_per_epoch
  c.warmup_steps = 5 * steps_per_epoch
  c.lr = 5e-4 * c.batch / 512  # DeiT's linear scaling rule
  c.lr_end_factor = 1e-2
  c.weight_decay = 0.05
  c.label_smoothing = 0.1
  c.mixup = 0.8
  c.grad_clip = 1.0
  c.log_every = 100
  c.ckpt_every = 2000
  c.keep_ckpts = 3
  c.eval_batch = 500
  c.sweep = ";".join([f"tome:r={r}" for r in (4, 8, 13, 16)]
                     + [f"evit:keep={k},layers=3-6-9" for k in (0.9, 0.8, 0.7, 0.6, 0.5)])
  return c

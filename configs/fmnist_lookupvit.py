r"""LookupViT (Koner et al., ECCV 2024; tokcomp/models/lookupvit.py) on Fashion-MNIST at about half of the dense
FLOPs of the trained depth-6 width-96 patch-2 ViT (configs/fmnist_vit.py).

Runs: train.py with `model_name="lookupvit"`: 196 lookup tokens (14x14 patches of 2x2) and CLS plus 4x4 compressed
tokens at inference (49.7 % of the dense ViT's 0.264 GFLOPs: 0.131 GFLOPs), trained multi-resolution (a compressed
grid drawn per step among 3x3, 4x4, 7x7; one compile holds all three). By default it fine-tunes from the dense
run `benchmarks/fmnist_vit`: the compressed stream uses vit.ViT's parameter names, so the embedding, position
embedding, CLS, every block's attention/MLP/norms, the final norm and the head load through
`checkpoints.common.overlay`; the cross-attentions and the lookup MLPs start fresh (train.py prints them).
No distillation: train.py's teacher is `model.clone(reduce=None)`, the LookupViT itself, not the ViT.

  python train.py --config configs/fmnist_lookupvit.py --workdir workdirs/fm_lookupvit
  python train.py --config configs/fmnist_lookupvit.py:init_from=,steps=3000,lr=1e-3 --workdir W   # from scratch
  python train.py --config configs/fmnist_lookupvit.py:runlocal --workdir /tmp/smoke                # 2 steps
  python eval.py --mode=eval --config configs/fmnist_lookupvit.py --workdir workdirs/fm_lookupvit
  python eval.py --mode=eval --config configs/fmnist_lookupvit.py:compressed=7 --workdir workdirs/fm_lookupvit

Args after the colon: compressed (4: the inference grid is compressed x compressed; any grid works with the same
params), lookup_mlp_ratio (0.375 of mlp_dim), multires (True: draw among 3x3, 4x4, 7x7 per step; False: train
at `compressed`), plus every fmnist_vit argument but reduce (source, steps (1000), batch, lr (2e-4), seed, dtype,
init_from (benchmarks/fmnist_vit; '' in runlocal), runlocal: 2 blocks of width 32 on 4x4 patches (7x7 lookup
grid), compressed 3x3, drawn among 2x2, 3x3, 4x4, 2 steps).
Expect: 72.92 % test accuracy at 4x4 (0.131 GFLOPs; 3x3 72.79 %, 7x7 76.28 % from the same run) after 300 steps
from benchmarks/fmnist_vit (CPU AMD EPYC 2 cores, 2026-12-07; 74.75 % after 500 steps; the fresh cross-attentions
need far longer: benchmarks/fmnist_learned/README.md).
"""
from configs import fmnist_vit
from configs.common import parse_arg


def get_config(arg: str | None = None):
  a = parse_arg(arg, compressed=4, lookup_mlp_ratio=0.375, multires=True, source="embedded:fashion_mnist",
                steps=1000, batch=128, lr=2e-4, seed=0, dtype="float32", init_from="benchmarks/fmnist_vit",
                runlocal=False)
  init_from = "" if a.runlocal and a.init_from == "benchmarks/fmnist_vit" else a.init_from
  c = fmnist_vit.get_config(f"source={a.source},steps={a.steps},batch={a.batch},lr={a.lr},seed={a.seed},"
                            f"dtype={a.dtype},init_from={init_from}" + (",runlocal" if a.runlocal else ""))
  c.model_name = "lookupvit"
  grids = ((2, 2), (3, 3), (4, 4)) if a.runlocal else ((3, 3), (4, 4), (7, 7))
  compressed = 3 if a.runlocal and a.compressed == 4 else a.compressed
  c.model = {k: v for k, v in c.model.items() if k not in ("scan", "remat")}  # vit.ViT-only options
  c.model = dict(c.model, compressed=(compressed, compressed), lookup_mlp_ratio=a.lookup_mlp_ratio,
                 train_compressed=grids if a.multires else ())
  c.reduce = ""  # the compression is built into the model
  c.warmup_steps = max(1, min(100, c.steps // 10))
  c.sweep = ""  # the training-free reducer sweep applies to vit.ViT only
  return c

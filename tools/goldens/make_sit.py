"""Golden fixtures for SiT's token slimming module (Zong et al., ECCV 2022, arXiv:2111.12624).

Reference: Sense-X/SiT, commit f5778084c45c93f2121685989fa35f930f7e8c54 (code MIT per its README, LICENSE file
Apache-2.0; run only, nothing of it is copied into tokcomp). What runs: ``models.lvvit.LVViT`` in eval mode with
``distillation_type="hard"`` (any non-None value builds the TSMs; ``conv_distillation=False``), i.e. a plain
pre-LN ViT (``p_emb="naive"``: the conv patch embedding, ``skip_lam=1``, ``qkv_bias=True``) whose
``TokenSlimmingModule``s slim the patch tokens after block i when i + 1 is in ``slim_index`` (the running sums of
``stage_blocks``). The model gets the reference's own init, then every trainable parameter gets N(0, NOISE_STD)
noise with a fixed seed. float32, CPU.

Adaptations (run time only; the checkout is not edited): ``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` is
passed to LVViT so the backbone's LayerNorms match tokcomp's ViT (the TSM's own LayerNorm keeps torch's 1e-5,
which is what tokcomp's TSM uses); torchvision's nms op schema is stubbed so ``import timm`` works on the CPU
wheel (``common.register_torchvision_nms_stub``). The ReverseTSM modules (``rtsm.*``, training-only FRD) and the
unused ``aux_head`` are built by the reference but not saved.

Cases (patch 8, 56 px -> 49 patches + CLS, embed 48, 3 heads, depth 4, mlp_ratio 4, 10 classes, batch 3):
  sit_b112_k06   stage_blocks [1, 1, 2], keep 0.6: slims before blocks 1, 2: 49 -> 29 -> 17    seed 700
  sit_b22_k04    stage_blocks [2, 2],    keep 0.4: slims before block 2:     49 -> 19          seed 701
tokcomp spec: "sit:keep=<keep>,layers=<slim_index joined by ->".

Saved (tests/goldens/<case>.npz): param/<state_dict key> (backbone, head and tsm.*), input [B,3,56,56],
logits [B,10], block/<i> [B,n_i,48] (the output of block i, CLS first, before any slimming that follows it),
weights/<s> [B,N_s,M_s] (stage s's softmax weights A over the incoming patch tokens, recomputed from the TSM's
own submodules on its captured input), min_margin (the smallest relative gap between the largest and second
largest weight in any column of any A: tokcomp's `index` takes that argmax), config (JSON string).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_sit.py --repo /work/refs/SiT --out tests/goldens
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

COMMIT = "f5778084c45c93f2121685989fa35f930f7e8c54"
NOISE_STD = 0.1
BATCH = 3
BASE = dict(img_size=56, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=4, num_heads=3,
            mlp_ratio=4.0, qkv_bias=True, p_emb="naive", skip_lam=1.0)
CASES = {
    "sit_b112_k06": dict(stage_blocks=[1, 1, 2], keep=0.6, seed=700),
    "sit_b22_k04": dict(stage_blocks=[2, 2], keep=0.4, seed=701),
}


def make_case(name: str, case: dict, out_dir: str, repo: str) -> None:
  from models.lvvit import LVViT

  common.set_deterministic(case["seed"])
  model = LVViT(**BASE, stage_blocks=case["stage_blocks"], keeping_ratio=case["keep"], distillation_type="hard",
                norm_layer=partial(nn.LayerNorm, eps=1e-6))
  common.perturb_parameters(model, NOISE_STD, case["seed"] + 1)
  model.eval()
  x = common.make_inputs(BATCH, BASE["img_size"], case["seed"] + 2)

  blocks, tsm_inputs = {}, {}
  for i, blk in enumerate(model.blocks):
    blk.register_forward_hook(lambda m, inp, out, i=i: blocks.__setitem__(i, out.detach().clone()))
  for s, tsm in enumerate(model.tsm):
    tsm.register_forward_hook(lambda m, inp, out, s=s: tsm_inputs.__setitem__(s, inp[0].detach().clone()))
  with torch.no_grad():
    logits, _ = model(x)
    weights = {s: F.softmax(model.tsm[s].weight(t) * model.tsm[s].scale, dim=1) for s, t in tsm_inputs.items()}

  margins = common.MarginLog()
  for s, w in weights.items():
    top2 = torch.topk(w, 2, dim=2).values.numpy()  # per column n: the best and second best new token
    for b in range(BATCH):
      for n in range(top2.shape[1]):
        margins.add(f"stage {s} b{b} n{n}", common.relative_gap(float(top2[b, n, 0]), float(top2[b, n, 1])))
  margin = margins.report(name)
  common.check_margin(name, margin)

  state = common.state_dict_arrays(model)
  keep_keys = [k for k in state if not k.startswith(("rtsm.", "aux_head."))]
  arrays = {f"param/{k}": state[k] for k in keep_keys}
  arrays["input"] = x.numpy()
  arrays["logits"] = logits.numpy()
  for i, t in blocks.items():
    arrays[f"block/{i}"] = t.numpy()
  for s, w in weights.items():
    arrays[f"weights/{s}"] = w.numpy()
  arrays["min_margin"] = np.float64(margin)
  slim_index = model.slim_index
  cfg = dict(case=name, commit=COMMIT, seed=case["seed"], noise_std=NOISE_STD, batch=BATCH, **BASE,
             stage_blocks=case["stage_blocks"], keep=case["keep"], slim_index=slim_index,
             kept_counts=model.keeped_patches[1:], num_heads_=BASE["num_heads"],
             spec=f"sit:keep={case['keep']},layers={'-'.join(map(str, slim_index))}", **common.versions())
  common.save_golden(os.path.join(out_dir, name + ".npz"), arrays, cfg)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repo", default="/work/refs/SiT")
  ap.add_argument("--out", default="tests/goldens")
  ap.add_argument("--case", choices=sorted(CASES), default=None)
  args = ap.parse_args()
  repo = common.add_repo_to_path(args.repo)
  for name, case in CASES.items():
    if args.case in (None, name):
      make_case(name, case, args.out, repo)


if __name__ == "__main__":
  main()

"""Golden fixtures for STViT / STViT-R (Chang et al., CVPR 2023, arXiv:2303.08685).

Reference: changsn/STViT-R, commit b4a27a07fc282198466b3b688ebecc6f146cc9fd (MIT; run only, nothing of it is
copied into tokcomp). What runs, from models/layers.py and models/multi_scale.py:
  * generate = SemanticAttentionBlock(dim, heads, multi_scale=multi_scale_semantic_token1, window_size=10,
    sample_window_size=4, qkv_bias=True, norm_layer=LayerNorm(eps=1e-6)): the first generation layer. On a
    10 x 10 patch grid its one window and its hard-coded 10 x 10 unfold (stride 4) cover the whole grid, so it is
    the global (DeiT-style) layer: queries the 4 x 4 adaptive max pool, keys [pooled; all patches].
  * refine = Block(dim, heads, qkv_bias=True, ...) called as refine(s1 + G, cat([s1, x])): the second layer, as
    the reference's Deit stage calls its block 2 (G: `semantic_token2`, a trunc_normal(0.02) parameter made here
    the way that stage makes it, since the stage class itself is Swin-specific).
  * recover = Block(...) called as recover(x, s2): STViT-R's recovery (the stage's blocks 5, 11, 17).
Every parameter gets the reference init (trunc_normal 0.02 Linear weights, zero biases, unit LayerNorms,
layer scales 1e-5), then N(0, NOISE_STD) noise with a fixed seed (the layer scales become O(NOISE_STD), so the
attention and MLP branches matter). float32, CPU, eval mode (drop rates 0).
Both values of the reference's SHORTCUT flag run on the same weights (the module attribute is switched), the
second with G = 0 (USE_GLOBAL off).

Adaptations (run time only; the checkout is not edited): none to the modules; `timm.models.layers` still
imports under timm 1.0.31 (a deprecation warning). The LayerNorm eps is passed as 1e-6 through the modules'
own `norm_layer` argument (the reference's Swin passes torch's default 1e-5; tokcomp's ViT uses 1e-6).

Case (tiny: 10 x 10 patches + a CLS token for the JAX side, width 48, 3 heads, mlp_ratio 4, M = 16, batch 3):
  stvit_g10_m16   seed 700

Saved (tests/goldens/<case>.npz): param/<module>.<state_dict key> (modules generate, refine, recover) and
param/global_centres [1, 16, 48]; x [B, 100, 48] patch tokens, cls [B, 1, 48] (a prefix token: the reference
has none; the JAX side must pass it through); s1, s2 [B, 16, 48] (shortcut on, G on); s1_plain, s2_plain
(shortcut off, G = 0); recovered [B, 100, 48] = recover(x, s2); min_margin (smallest relative gap between the
two largest values of a pooling bin, per channel: the max pooling's selection); config (JSON string).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_stvit.py --repo /work/refs/STViT-R --out tests/goldens
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

COMMIT = "b4a27a07fc282198466b3b688ebecc6f146cc9fd"
NOISE_STD = 0.1
BATCH, GRID, WIDTH, HEADS, SAMPLE = 3, 10, 48, 3, 4
CASES = {"stvit_g10_m16": dict(seed=700)}


def pool_margin(x: np.ndarray) -> float:
  """Smallest relative gap between the two largest values of any adaptive max-pool bin (per channel)."""
  img = x.reshape(x.shape[0], GRID, GRID, x.shape[-1])
  bins = [((i * GRID) // SAMPLE, -((-(i + 1) * GRID) // SAMPLE)) for i in range(SAMPLE)]
  log = common.MarginLog()
  for r0, r1 in bins:
    for c0, c1 in bins:
      cell = np.sort(img[:, r0:r1, c0:c1].reshape(x.shape[0], -1, x.shape[-1]), axis=1)
      gap = (cell[:, -1] - cell[:, -2]) / np.maximum(np.maximum(np.abs(cell[:, -1]), np.abs(cell[:, -2])), 1e-30)
      log.add(f"bin ({r0}:{r1}, {c0}:{c1})", float(gap.min()))
  return log.report("stvit pooling")


def make_case(name: str, seed: int, out_dir: str) -> None:
  from models.layers import Block, SemanticAttentionBlock
  from models.multi_scale import multi_scale_semantic_token1

  common.set_deterministic(seed)
  norm = partial(torch.nn.LayerNorm, eps=1e-6)
  mods = torch.nn.ModuleDict({
      "generate": SemanticAttentionBlock(WIDTH, HEADS, multi_scale_semantic_token1, window_size=GRID,
                                         sample_window_size=SAMPLE, qkv_bias=True, norm_layer=norm),
      "refine": Block(WIDTH, HEADS, window_size=None, qkv_bias=True, norm_layer=norm),
      "recover": Block(WIDTH, HEADS, window_size=None, qkv_bias=True, norm_layer=norm),
  })
  for m in mods.modules():  # the reference model's _init_weights
    if isinstance(m, torch.nn.Linear):
      torch.nn.init.trunc_normal_(m.weight, std=0.02)
      torch.nn.init.zeros_(m.bias)
  centres = torch.nn.Parameter(torch.zeros(1, SAMPLE * SAMPLE, WIDTH))
  torch.nn.init.trunc_normal_(centres, std=0.02)
  mods.register_parameter("global_centres", centres)
  common.perturb_parameters(mods, NOISE_STD, seed + 1)
  mods.eval()

  gen = torch.Generator().manual_seed(seed + 2)
  x = torch.randn(BATCH, GRID * GRID, WIDTH, generator=gen)
  cls = torch.randn(BATCH, 1, WIDTH, generator=gen)
  with torch.no_grad():
    mods["generate"].shortcut = True
    s1 = mods["generate"](x)
    s2 = mods["refine"](s1 + mods.global_centres, torch.cat([s1, x], dim=1))
    recovered = mods["recover"](x, s2)
    mods["generate"].shortcut = False
    s1_plain = mods["generate"](x)
    s2_plain = mods["refine"](s1_plain, torch.cat([s1_plain, x], dim=1))

  margin = pool_margin(x.numpy())
  common.check_margin(name, margin)
  arrays = {f"param/{k}": v for k, v in common.state_dict_arrays(mods).items()}
  arrays.update(x=x.numpy(), cls=cls.numpy(), s1=s1.numpy(), s2=s2.numpy(), s1_plain=s1_plain.numpy(),
                s2_plain=s2_plain.numpy(), recovered=recovered.numpy(), min_margin=np.float64(margin))
  cfg = dict(reference="changsn/STViT-R", commit=COMMIT, seed=seed, noise_std=NOISE_STD, batch=BATCH,
             grid=[GRID, GRID], width=WIDTH, num_heads=HEADS, tokens=[SAMPLE, SAMPLE], mlp_ratio=4,
             layer_norm_eps=1e-6, **common.versions())
  common.save_golden(os.path.join(out_dir, name + ".npz"), arrays, cfg)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repo", default="/work/refs/STViT-R")
  ap.add_argument("--out", default="tests/goldens")
  args = ap.parse_args()
  repo = common.add_repo_to_path(args.repo)
  print(f"reference {repo} @ {common.git_commit_of(repo, COMMIT)}")
  for name, case in CASES.items():
    make_case(name, case["seed"], args.out)


if __name__ == "__main__":
  main()

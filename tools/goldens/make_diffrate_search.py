"""Golden fixture for DiffRate's differentiable rate search (the training pass of OpenGVLab/DiffRate).

Reference: OpenGVLab/DiffRate, commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e (run only, nothing copied).
What runs: timm's ``VisionTransformer`` patched by ``DiffRate.patch.deit`` (apply_patch of patch/deit.py) in ``train()`` mode (drop
rates 0: deterministic), i.e. ``DiffRateBlock`` / ``DiffRateAttention`` with ``DiffRate.ddp.DiffRate`` in
every block (block 0 uncompressed, as the reference), ``model(x)`` -> (logits, flops) with
``calculate_flop_training``. The search logits (``selected_probability``, zeros in the reference) get N(0, 1.5)
values with a fixed seed so that every block's expected kept count differs. Adaptations as in make_diffrate.py (the
``caformer`` stub module; ``block.drop_path = nn.Identity()``, timm 1.0 naming it drop_path1/2).

Saved (tests/goldens/diffrate_search_cls50.npz): param/<timm key> (the ViT only), arch/prune/<i>,
arch/merge/<i> (the search logits of block i), input [B,3,56,56], logits [B,10] (training pass), flops (0-d,
the reference's MAC count), prune_kept/<i>, merge_kept/<i> (the kept counts the pass used), alive/<i> (0-d:
tokens alive after block i, the mask's row sum), grad_out/prune/<i>, grad_out/merge/<i> (d sum(logits * W)/d
logits of the search, W = weight [B,10] saved), grad_flops/prune/<i>, grad_flops/merge/<i> (d flops / d search
logits), config (JSON string).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_diffrate_search.py --diffrate-repo /work/refs/DiffRate --out tests/goldens
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import make_diffrate  # noqa: E402  (install_stubs, the commit)

import torch  # noqa: E402

BATCH = 3
BASE = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)
SEED = 643
ARCH_STD = 1.5


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--diffrate-repo", required=True)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  common.add_repo_to_path(args.diffrate_repo)
  make_diffrate.install_stubs()
  import timm.models.vision_transformer as vt
  import DiffRate

  common.set_deterministic(SEED)
  model = vt.VisionTransformer(img_size=56, global_pool="token", class_token=True, qkv_bias=True, **BASE)
  common.perturb_parameters(model, 0.1, SEED + 1)
  state = common.state_dict_arrays(model)
  DiffRate.patch.deit(model)  # the package exports apply_patch of patch/deit.py as `deit`
  for blk in model.blocks:  # timm 1.0 names it drop_path1/2; Identity at rate 0 (as make_diffrate.py)
    for mod in (blk.drop_path1, blk.drop_path2, blk.ls1, blk.ls2):
      assert isinstance(mod, torch.nn.Identity)
    blk.drop_path = torch.nn.Identity()
  gen = torch.Generator().manual_seed(SEED + 3)
  with torch.no_grad():
    for blk in model.blocks:
      for ddp in (blk.prune_ddp, blk.merge_ddp):
        ddp.selected_probability.copy_(torch.randn(ddp.selected_probability.shape, generator=gen) * ARCH_STD)
  model.train()
  x = common.make_inputs(BATCH, 56, SEED + 2)
  weight = torch.randn(BATCH, 10, generator=gen)

  alive = {}
  for i, blk in enumerate(model.blocks):
    blk.register_forward_hook(lambda mod, inp, out, i=i: alive.__setitem__(
        i, float(model._diffrate_info["mask"][0].sum())))
  logits, flops = model(x)
  arch = [p for blk in model.blocks for p in (blk.prune_ddp.selected_probability, blk.merge_ddp.selected_probability)]
  g_out = torch.autograd.grad((logits * weight).sum(), arch, retain_graph=True, allow_unused=True)
  g_flops = torch.autograd.grad(flops, arch, allow_unused=True)

  arrays = {f"param/{k}": v for k, v in state.items()}
  arrays.update(input=x.numpy(), logits=logits.detach().numpy(), weight=weight.numpy(),
                flops=np.array(float(flops), np.float64))
  zero = lambda g, p: np.zeros(p.shape, np.float32) if g is None else g.numpy()
  for i, blk in enumerate(model.blocks):
    arrays[f"arch/prune/{i}"] = blk.prune_ddp.selected_probability.detach().numpy()
    arrays[f"arch/merge/{i}"] = blk.merge_ddp.selected_probability.detach().numpy()
    arrays[f"prune_kept/{i}"] = np.array(int(model._diffrate_info["prune_kept_num"][i]))
    arrays[f"merge_kept/{i}"] = np.array(int(model._diffrate_info["merge_kept_num"][i]))
    arrays[f"alive/{i}"] = np.array(alive[i])
    for j, kind in enumerate(("prune", "merge")):
      arrays[f"grad_out/{kind}/{i}"] = zero(g_out[2 * i + j], arch[2 * i + j])
      arrays[f"grad_flops/{kind}/{i}"] = zero(g_flops[2 * i + j], arch[2 * i + j])
  cfg = dict(method="diffrate_search", case="diffrate_search_cls50", img_size=56, **BASE, batch=BATCH, seed=SEED,
             arch_std=ARCH_STD, reference_repo="OpenGVLab/DiffRate", reference_commit=make_diffrate.DIFFRATE_COMMIT,
             reference_entry="DiffRate.patch.deit(timm VisionTransformer); model.train(); model(x)",
             generator="tools/goldens/make_diffrate_search.py", **common.versions())
  print("kept", [(int(a), int(b)) for a, b in zip(model._diffrate_info["prune_kept_num"],
                                                  model._diffrate_info["merge_kept_num"])],
        "alive", alive, "flops", float(flops))
  common.save_golden(os.path.join(args.out, "diffrate_search_cls50.npz"), arrays, cfg)


if __name__ == "__main__":
  main()

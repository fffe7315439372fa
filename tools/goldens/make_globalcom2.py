"""Golden fixtures for GlobalCom² (tokcomp/vlm/globalcom2.py): the official selection functions on synthetic AnyRes
[CLS] scores.

Reference: xuyang-liu16/GlobalCom2, commit 96b2d00b86a22495285ab448cc89faedafddd78d (Apache-2.0; run only, nothing
copied). Executed from llava/model/llava_arch.py (vlm_common.load_functions; the module-level `retention_ratio` is
put in the namespace as the case's keep): `LlavaMetaForCausalLM.compress_thumbnail`, `generate_scale_for_crop_features`
(base_scale = keep, temperature), `interpolate_and_split_cls_attn_scores` and `select_topk_crop_features`, called as
`compress_crops` calls them when nothing is unpadded (the image's aspect ratio equals the crop arrangement's, so
every crop patch is valid: cur_width = cols w, cur_height = rows h, crop_dimensions = [(w, h)] * C).
Scores as the reference computes them: its patched CLIP attention returns the head mean of the PRE-softmax scaled
logits q k^T / sqrt(d); the CLS row over the patches of the last hooked layer (attn_maps[-1][:, 0, 1:]).

Inputs (per sample, V = 1 + C views: thumbnail, then crops row-major): x [V, 1 + h w, D] ~ N(0, 1); CLS logits
z = 3 N(0, 1) [V, L, H, 1 + h w] (torch generator, seeded); cls_attn = softmax(z). Batch 1 per sample.
Cases (B = 3, H = 4, L = 2, D = 16, grid 6x6, tests/goldens/globalcom2_<case>.npz):
  g6_2x2    layout 2x2, keep 0.3,  temperature 10   (the official temperature; keep 0.25 puts n keep = 9 on an integer)
  g6_2x3    layout 2x3, keep 0.35, temperature 0.5  (a low temperature: crop budgets differ)
Saved: thumb_x, thumb_cls_attn, thumb_cls_logits [B, L, H, N]; x, cls_attn, cls_logits (crops stacked on the token
axis, as VisualSignals); thumb_keep [B, int(n keep)] (the reference's thumbnail indices, descending score order),
scales [B, C] (its per-crop ratios, float64), crop_masks [B, C, h w] (its kept patches per crop), min_margin (smallest
relative top-k gap), int_margin (smallest distance of n * scale to an integer: the int() cut), config.

Command (repo root): /work/venv-torch/bin/python tools/goldens/make_globalcom2.py --repo /work/refs/GlobalCom2 \
    --out tests/goldens
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import vlm_common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

COMMIT = "96b2d00b86a22495285ab448cc89faedafddd78d"
BATCH, HEADS, LAYERS, DIM, GRID = 3, 4, 2, 16, (6, 6)
CASES = {
    "g6_2x2": dict(layout=(2, 2), keep=0.3, temperature=10.0, seed=51),
    "g6_2x3": dict(layout=(2, 3), keep=0.35, temperature=0.5, seed=52),
}
NAMES = ["LlavaMetaForCausalLM.compress_thumbnail", "generate_scale_for_crop_features",
         "interpolate_and_split_cls_attn_scores", "select_topk_crop_features"]


def run_case(name, case, repo, out_dir):
  rows, cols = case["layout"]
  crops, (h, w) = rows * cols, GRID
  n = h * w
  fns = vlm_common.load_functions(os.path.join(repo, "llava/model/llava_arch.py"), NAMES,
                                  {"torch": torch, "F": F, "np": np, "retention_ratio": case["keep"]})
  gen = torch.Generator().manual_seed(case["seed"])
  x = torch.randn(BATCH, 1 + crops, 1 + n, DIM, generator=gen)
  z = 3.0 * torch.randn(BATCH, 1 + crops, LAYERS, HEADS, 1 + n, generator=gen)
  attn = torch.softmax(z, dim=-1)
  thumb_keep, scales, masks, margin, int_margin = [], [], [], np.inf, np.inf
  this = types.SimpleNamespace()
  with torch.no_grad():
    for b in range(BATCH):
      score = z[b, :, -1].mean(1)[:, 1:]  # [V, n]: head mean of the pre-softmax CLS row, patches
      feats = x[b, :, 1:]
      _, idx = fns["LlavaMetaForCausalLM.compress_thumbnail"](this, feats[0], score[0], scale=case["keep"])
      sc = fns["generate_scale_for_crop_features"](score[0], cols, rows, base_scale=case["keep"],
                                                   temperature=case["temperature"])
      guide = fns["interpolate_and_split_cls_attn_scores"](score[0], cols * w, rows * h, cols, rows, [(w, h)] * crops)
      _, kept = fns["select_topk_crop_features"]([feats[1 + i] for i in range(crops)],
                                                 [score[1 + i] for i in range(crops)], guide, sc)
      m = np.zeros((crops, n), bool)
      for i, k in enumerate(kept):
        m[i, k.numpy()] = True
        comb = (F.normalize(score[1 + i][None], dim=-1) + F.normalize(guide[i][None], dim=-1))[0].double().numpy()
        margin = min(margin, vlm_common.topk_margin(comb, len(k)))
        int_margin = min(int_margin, abs(n * sc[i] - round(n * sc[i])) if len(k) else np.inf)
      margin = min(margin, vlm_common.topk_margin(score[0].double().numpy(), int(n * case["keep"])))
      thumb_keep.append(idx.numpy()), scales.append(np.asarray(sc)), masks.append(m)
  common.check_margin(name, margin)
  assert int_margin > 1e-4, int_margin
  masks = np.stack(masks)
  print(f"[{name}] thumbnail {len(thumb_keep[0])}, per crop {masks.sum(-1).tolist()}, min margin {margin:.3g}, "
        f"int margin {int_margin:.3g}")
  perm = lambda a: a.permute(0, 2, 3, 1, 4)  # [B, L, H, V, N]
  ca, cz = perm(attn), perm(z)
  arrays = dict(thumb_x=x[:, 0].numpy(), thumb_cls_attn=ca[:, :, :, 0].numpy(), thumb_cls_logits=cz[:, :, :, 0].numpy(),
                x=x[:, 1:].flatten(1, 2).numpy(), cls_attn=ca[:, :, :, 1:].flatten(3, 4).numpy(),
                cls_logits=cz[:, :, :, 1:].flatten(3, 4).numpy(), thumb_keep=np.stack(thumb_keep),
                scales=np.stack(scales), crop_masks=masks, min_margin=np.float64(margin),
                int_margin=np.float64(int_margin))
  common.save_golden(os.path.join(out_dir, f"globalcom2_{name}.npz"), arrays,
                     dict(case, batch=BATCH, heads=HEADS, layers=LAYERS, dim=DIM, grid=GRID,
                          repo="xuyang-liu16/GlobalCom2", commit=COMMIT, torch_version=torch.__version__))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repo", default="/work/refs/GlobalCom2")
  ap.add_argument("--out", default="tests/goldens")
  a = ap.parse_args()
  for name, case in CASES.items():
    run_case(name, case, a.repo, a.out)


if __name__ == "__main__":
  main()

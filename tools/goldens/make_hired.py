"""Golden fixtures for HiRED (tokcomp/vlm/hired.py): the official selection run on synthetic AnyRes [CLS] rows.

Reference: hasanar1f/HiRED, commit 502d6dd79a03e87cc808cedba8b8a951d93cb62b (MIT; run only, nothing copied):
`LlavaNextForConditionalGeneration.HiRED_token_selection` and `.HiRED_sub_img_budgets` in its vendored
transformers/src/transformers/models/llava_next/modeling_llava_next.py. Only those two methods are executed
(vlm_common.load_functions) with a stand-in `self` (its config's pinpoints / image size are unused) and a stand-in
`get_anyres_image_grid_shape` returning the crop arrangement (cols, rows), which the real one derives from the image
size. Called as the model calls them: top_layer_attn = the early layer (the official layer 0), bottom_layer_attn =
the selection layer (the official CLIP layer 22 = our feature layer, cls_attn[:, -1]), full_image_patch 0,
num_vision_tokens = h w, one image per call (batch 1 per sample).

Inputs (per sample, V = 1 + C views: the thumbnail, then the crops row-major): x [V, 1 + h w, D] ~ N(0, 1), CLS rows
softmax(3 z) with z ~ N(0, 1) [V, L, H, 1 + h w] (torch generator, seeded). The reference receives [V, H, 1, N] (it
reads row 0 only).
Cases (B = 3, H = 4, D = 16, grid 6x6, tests/goldens/hired_<case>.npz):
  g6_2x2   layout 2x2 (C = 4), L = 2, budget 0.2, alpha 0.5, early 0   ("hired:budget=0.2,alpha=0.5,split=raster")
  g6_1x3   layout 1x3 (C = 3), L = 3, budget 0.3, alpha 0.4, early 1   (n = 36 splits into 3 raster chunks)
Saved: thumb_x [B, N, D], thumb_cls_attn [B, L, H, N], x [B, C N, D], cls_attn [B, L, H, C N] (crops stacked, as
VisualSignals), masks [B, V, h w] (the reference's boolean masks), min_margin (smallest relative top-k gap at a cut),
config. The reference splits the crop budget by RASTER chunks of the thumbnail (tokcomp's split="raster").

Command (repo root): /work/venv-torch/bin/python tools/goldens/make_hired.py --repo /work/refs/HiRED --out tests/goldens
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

COMMIT = "502d6dd79a03e87cc808cedba8b8a951d93cb62b"
FILE = "transformers/src/transformers/models/llava_next/modeling_llava_next.py"
BATCH, HEADS, DIM, GRID = 3, 4, 16, (6, 6)
CASES = {
    "g6_2x2": dict(layout=(2, 2), layers=2, budget=0.2, alpha=0.5, early=0, seed=41),
    "g6_1x3": dict(layout=(1, 3), layers=3, budget=0.3, alpha=0.4, early=1, seed=42),
}


def synthetic(seed, views, layers):
  gen = torch.Generator().manual_seed(seed)
  n = 1 + GRID[0] * GRID[1]
  x = torch.randn(BATCH, views, n, DIM, generator=gen)
  attn = torch.softmax(3.0 * torch.randn(BATCH, views, layers, HEADS, n, generator=gen), dim=-1)
  return x, attn


def run_case(name, case, fns, out_dir):
  rows, cols = case["layout"]
  crops, n = rows * cols, GRID[0] * GRID[1]
  x, attn = synthetic(case["seed"], 1 + crops, case["layers"])
  ns = {}
  this = types.SimpleNamespace(config=types.SimpleNamespace(image_grid_pinpoints=None,
                                                            vision_config=types.SimpleNamespace(image_size=None)))
  this.HiRED_sub_img_budgets = lambda *a: fns["sub"](this, *a)
  fns["ns"]["get_anyres_image_grid_shape"] = lambda size, pinpoints, image_size: (cols, rows)
  masks, margin = [], np.inf
  with torch.no_grad():
    for b in range(BATCH):
      top = attn[b, :, case["early"]][:, :, None, :]  # [V, H, 1, N]
      bottom = attn[b, :, -1][:, :, None, :]
      m = fns["sel"](this, top, bottom, [1 + crops], 0, n, case["budget"], case["alpha"], [(0, 0)])[0]
      masks.append(m.numpy())
      final = bottom[:, :, 0, 1:].sum(1).double().numpy()  # [V, n]
      early = top[0, :, 0, 1:].sum(0).double().numpy()
      counts = m.numpy().sum(1)
      margin = min(margin, vlm_common.topk_margin(early, int(n * (1 - case["alpha"]))),
                   *[vlm_common.topk_margin(final[v], int(counts[v])) for v in range(1 + crops)])
  common.check_margin(name, margin)
  masks = np.stack(masks)
  print(f"[{name}] kept per view {masks.sum(-1).tolist()}, min margin {margin:.3g}")
  cls = attn.permute(0, 2, 3, 1, 4)  # [B, L, H, V, N]
  common.save_golden(os.path.join(out_dir, f"hired_{name}.npz"), dict(
      thumb_x=x[:, 0].numpy(), thumb_cls_attn=cls[:, :, :, 0].numpy(), x=x[:, 1:].flatten(1, 2).numpy(),
      cls_attn=cls[:, :, :, 1:].flatten(3, 4).numpy(), masks=masks, min_margin=np.float64(margin)),
      dict(case, batch=BATCH, heads=HEADS, dim=DIM, grid=GRID, repo="hasanar1f/HiRED", commit=COMMIT,
           torch_version=torch.__version__))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repo", default="/work/refs/HiRED")
  ap.add_argument("--out", default="tests/goldens")
  a = ap.parse_args()
  ns = {"torch": torch}
  f = vlm_common.load_functions(os.path.join(a.repo, FILE), ["LlavaNextForConditionalGeneration.HiRED_token_selection",
                                                             "LlavaNextForConditionalGeneration.HiRED_sub_img_budgets"],
                                ns)
  fns = {"sel": f["LlavaNextForConditionalGeneration.HiRED_token_selection"],
         "sub": f["LlavaNextForConditionalGeneration.HiRED_sub_img_budgets"], "ns": ns}
  for name, case in CASES.items():
    run_case(name, case, fns, a.out)


if __name__ == "__main__":
  main()

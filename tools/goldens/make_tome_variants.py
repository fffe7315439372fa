"""Golden fixtures for ToMe's k-th and random bipartite matching, the ops on their own.

Reference: facebookresearch/ToMe @ af95e4b (CC BY-NC 4.0: run only, nothing copied), `tome/merge.py`:
`kth_bipartite_soft_matching(metric, k)` and `random_bipartite_soft_matching(metric, r)`, applied with
`merge_wavg` (size-weighted mean; sizes add) and `merge_source` (which originals each output holds). No model:
random metric / features / sizes, batch 3, float32, CPU. The random split is drawn by the reference itself from
the torch seed; the script re-draws it with the same seed to record the A set (`src`) it used.

Cases (no protected prefix: the reference has none):
  tome_kth_k3_n45      N=45, k=3  -> 15 tokens (45 divisible by 3: the reference drops no tail)
  tome_kth_k2_n38      N=38, k=2  -> 19
  tome_random_r11_n37  N=37, r=11 -> 26
  tome_random_r20_n49  N=49, r=20 -> 29

Saved: metric [B,N,C], x [B,N,D], size [B,N] (positive integers, as after earlier merges), out_x [B,N',D],
out_size [B,N'], source [B,N',N] (bool), src [B,r] (random only: the A slots), min_margin (smallest relative gap
between the best and second-best destination score of any merged token), config (JSON).

  /work/venv-torch/bin/python tools/goldens/make_tome_variants.py --tome-repo /work/refs/ToMe --out tests/goldens
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()  # tome/__init__ imports timm

import torch  # noqa: E402

TOME_COMMIT = "af95e4b1befa172dadccd8c81e223b10090f9579"
BATCH, C, D = 3, 16, 24
CASES = {
    "tome_kth_k3_n45": dict(kind="kth", n=45, k=3, seed=11),
    "tome_kth_k2_n38": dict(kind="kth", n=38, k=2, seed=12),
    "tome_random_r11_n37": dict(kind="random", n=37, r=11, seed=13),
    "tome_random_r20_n49": dict(kind="random", n=49, r=20, seed=14),
}


def best_two_gap(scores: np.ndarray) -> float:
  """Smallest relative gap between each row's best and second-best score."""
  s = np.sort(scores, axis=-1)
  return min(common.relative_gap(float(hi), float(lo)) for hi, lo in zip(s[..., -1].ravel(), s[..., -2].ravel()))


def make(name: str, case: dict, merge_mod, commit: str) -> tuple[dict, dict]:
  common.set_deterministic(case["seed"])
  n = case["n"]
  metric = torch.randn(BATCH, n, C)
  x = torch.randn(BATCH, n, D)
  size = torch.randint(1, 5, (BATCH, n, 1)).float()
  unit = metric / metric.norm(dim=-1, keepdim=True)
  arrays = {}
  if case["kind"] == "kth":
    k = case["k"]
    merge, _ = merge_mod.kth_bipartite_soft_matching(metric, k)
    grouped = unit.view(BATCH, -1, k, C)
    a, b = grouped[:, :, : k - 1].reshape(BATCH, -1, C), grouped[:, :, k - 1]
    margin = best_two_gap((a @ b.transpose(-1, -2)).numpy())
  else:
    r = case["r"]
    torch.manual_seed(1000 + case["seed"])
    src = torch.rand(BATCH, n, 1).argsort(dim=1)[:, :r, 0]  # the draw the reference makes next
    torch.manual_seed(1000 + case["seed"])
    merge, _ = merge_mod.random_bipartite_soft_matching(metric, r)
    in_b = torch.ones(BATCH, n, dtype=torch.bool)
    in_b.scatter_(1, src, False)
    scores = unit.gather(1, src[..., None].expand(BATCH, r, C)) @ unit.transpose(-1, -2)  # [B, r, N]
    scores = scores.masked_fill(~in_b[:, None, :], -float("inf"))
    margin = best_two_gap(scores.numpy())
    arrays["src"] = src.numpy()
  out_x, out_size = merge_mod.merge_wavg(merge, x, size)
  source = merge_mod.merge_source(merge, x)
  arrays.update(metric=metric.numpy(), x=x.numpy(), size=size[..., 0].numpy(), out_x=out_x.numpy(),
                out_size=out_size[..., 0].numpy(), source=source.numpy() > 0, min_margin=np.float64(margin))
  cfg = dict(case, batch=BATCH, channels=C, dim=D, reference_repo="facebookresearch/ToMe",
             reference_commit=commit, **common.versions())
  common.check_margin(name, margin)
  return arrays, cfg


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--tome-repo", required=True)
  ap.add_argument("--out", default="tests/goldens")
  ap.add_argument("--cases", nargs="*", default=list(CASES))
  args = ap.parse_args()
  common.add_repo_to_path(args.tome_repo)
  from tome import merge as merge_mod  # noqa: E402
  for name in args.cases:
    arrays, cfg = make(name, CASES[name], merge_mod, common.git_commit_of(args.tome_repo, TOME_COMMIT))
    print(f"[{name}] margin {float(arrays['min_margin']):.3g}, out {arrays['out_x'].shape}")
    common.save_golden(os.path.join(args.out, name + ".npz"), arrays, cfg)

"""Golden fixtures for DynamicViT (Rao et al., NeurIPS 2021, arXiv:2106.02034).

Reference: raoyongming/DynamicViT, commit 1322e626d1e9eca18cc150569908fb4af29e15f7 (MIT; run only, nothing of
it is copied into tokcomp). What runs: ``models.dyvit.VisionTransformerDiffPruning`` (timm/DeiT key names plus
``score_predictor.<k>.*``) and, for the loss, ``models.dyvit.VisionTransformerTeacher`` on the same backbone
weights with ``losses.DistillDiffPruningLoss_dynamic`` (mse_token=True, ratio_weight=2.0, distill_weight=0.5,
clf_weight=1.0, base criterion plain CrossEntropyLoss: its DeiT setting). The model gets the reference's own
init, then every trainable parameter gets N(0, NOISE_STD) noise with a fixed seed. float32, CPU.

Two passes per case:
  * inference (``model.eval()``): top-k by the keep log-probability at int(196 * ρ^s) patches;
  * training (``model.train()``; drop rates are 0, so the only randomness is the gumbel draw): the full-length
    policy path with ``softmax_with_policy``. ``torch.nn.functional.gumbel_softmax`` is replaced by a wrapper
    that adds a pre-drawn Gumbel(0, 1) noise per call (saved as gumbel/<s>) and then follows torch's documented
    hard formula (one_hot(argmax) - y_soft.detach() + y_soft); only the draw differs from torch's.

Adaptations (run time only; the checkout is not edited): ``utils.py`` imports ``torch._six`` (gone from torch 2)
and ``tensorboardX`` (not installed there): stub modules in ``sys.modules`` (``torch._six.inf = math.inf``, a
no-op ``SummaryWriter``). The reference hard-codes ``init_n = 14 * 14``, so the cases use 196 patches (28 px,
patch 2).

Cases (tiny: patch 2, 28 px -> 196 patches + CLS = 197, embed 32, 2 heads, depth 4, mlp_ratio 4, 10 classes,
batch 3, pruning_loc 1-2-3, ρ = 0.7 -> 137, 96, 67 patches):
  dynamicvit_p2_r07   seed 500

Saved (tests/goldens/<case>.npz): param/<state_dict key>, input [B,3,28,28], logits [B,10] (eval),
kept/<s> [B,k_s] (eval: the original patch ids 0..195 kept after stage s, sorted), logits_train [B,10],
features_train [B,196,32] (final normed patch tokens, train), decision/<s> [B,196] (the hard decision after
stage s, train), gumbel/<s> [B,196,2], loss_ratio, loss_cls_kl, loss_token_mse (the reference loss's parts:
pred_loss summed over stages, KL, MSE), teacher_logits [B,10], min_margin, config (JSON string).
Margin: min relative gap at each top-k cut of the eval scores; and min |y0 - y1| of the train softmax.

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_dynamicvit.py --repo /work/refs/DynamicViT --out tests/goldens
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

COMMIT = "1322e626d1e9eca18cc150569908fb4af29e15f7"
NOISE_STD = 0.3
BATCH = 3
BASE = dict(img_size=28, patch_size=2, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4, num_classes=10)
CASES = {"dynamicvit_p2_r07": dict(rho=0.7, pruning_loc=[1, 2, 3], seed=500)}


def install_stubs() -> None:
  six = types.ModuleType("torch._six")
  six.inf = math.inf
  sys.modules.setdefault("torch._six", six)
  tbx = types.ModuleType("tensorboardX")
  tbx.SummaryWriter = lambda *a, **k: None
  sys.modules.setdefault("tensorboardX", tbx)


class FixedGumbel:
  """Replaces F.gumbel_softmax: a pre-drawn Gumbel(0, 1) noise per call, then torch's hard formula."""

  def __init__(self, seed):
    self.gen, self.draws = torch.Generator().manual_seed(seed), []

  def __call__(self, logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
    assert hard and tau == 1.0 and dim == -1
    u = torch.rand(logits.shape, generator=self.gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    g = (-torch.log(-torch.log(u))).to(logits.dtype)
    self.draws.append(g.clone())
    y_soft = ((logits + g) / tau).softmax(dim)
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def run_case(name, case, repo, out_dir):
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from models import dyvit
    import losses

  seed, rho, locs = case["seed"], case["rho"], case["pruning_loc"]
  ratios = [rho ** (s + 1) for s in range(len(locs))]
  common.set_deterministic(seed)
  model = dyvit.VisionTransformerDiffPruning(qkv_bias=True, pruning_loc=locs, token_ratio=ratios, distill=True,
                                             **BASE)
  common.perturb_parameters(model, NOISE_STD, seed + 1)
  x = common.make_inputs(BATCH, BASE["img_size"], seed + 2)
  labels = torch.tensor([1, 4, 7])

  # Inference: the kept patch ids after each stage, tracked through the reference's own index selections.
  model.eval()
  kept, scores, full = {}, {}, {}
  preds = [model.score_predictor[s] for s in range(len(locs))]
  def record(s):
    def hook(mod, inp, out):  # returns None: the output is left as it is
      scores[s], full[s] = out[:, :, 0].detach().clone(), out.detach().clone()
    return hook
  for s, p in enumerate(preds):
    p.register_forward_hook(record(s))
  with torch.no_grad():
    logits = model(x)
  ids = torch.arange(196).expand(BATCH, 196)
  log = common.MarginLog()
  for s in range(len(locs)):
    k = int(196 * ratios[s])
    order = torch.argsort(scores[s], dim=1, descending=True)
    for b in range(BATCH):
      srt = scores[s][b].double().sort(descending=True).values.numpy()
      log.add(f"stage{s}/b{b}/cut@{k}", common.topk_cut_gap(srt, k))
    ids = torch.gather(ids, 1, order[:, :k])
    kept[s] = torch.sort(ids, dim=1).values
  min_margin = log.report(name)

  # Training: full length with the policy; the fixed gumbel draw.
  gumbel = FixedGumbel(seed + 3)
  orig = F.gumbel_softmax
  dyvit.F.gumbel_softmax = gumbel
  try:
    model.train()
    with torch.no_grad():
      logits_t, features, mask, decisions = model(x)
  finally:
    dyvit.F.gumbel_softmax = orig
  # The decisions must not sit on a tie: min |(l0 + g0) - (l1 + g1)| over the tokens still kept before a stage.
  gaps = []
  for s in range(len(locs)):
    z = full[s] + gumbel.draws[s]
    prev = torch.ones(BATCH, 196) if s == 0 else decisions[s - 1]
    gaps.append(float((z[..., 0] - z[..., 1]).abs()[prev > 0].min()))
  min_decision_gap = min(gaps)
  assert min_decision_gap > 1e-4, min_decision_gap

  teacher = dyvit.VisionTransformerTeacher(qkv_bias=True, **BASE)
  teacher.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("score_predictor")})
  teacher.eval()
  crit = losses.DistillDiffPruningLoss_dynamic(teacher, torch.nn.CrossEntropyLoss(), ratio_weight=2.0,
                                               distill_weight=0.5, pruning_loc=locs, keep_ratio=ratios,
                                               clf_weight=1.0, mse_token=True, print_mode=True)
  with torch.no_grad():
    total, parts = crit(x, (logits_t, features, mask, decisions), labels)
    teacher_logits, _ = teacher(x)

  arrays = {f"param/{k}": v for k, v in common.state_dict_arrays(model).items()}
  arrays.update(input=x.numpy(), labels=labels.numpy(), logits=logits.numpy(), logits_train=logits_t.numpy(),
                features_train=features.numpy(), teacher_logits=teacher_logits.numpy(),
                loss_cls=np.array(float(parts[0]), np.float64), loss_ratio=np.array(float(parts[1]), np.float64),
                loss_cls_kl=np.array(float(parts[2]), np.float64),
                loss_token_mse=np.array(float(parts[3]), np.float64), loss_total=np.array(float(total), np.float64),
                min_margin=np.array(min_margin, np.float64),
                min_decision_gap=np.array(min_decision_gap, np.float64))
  for s in range(len(locs)):
    arrays[f"kept/{s}"] = kept[s].numpy()
    arrays[f"decision/{s}"] = decisions[s].numpy()
    arrays[f"gumbel/{s}"] = gumbel.draws[s].numpy()
  cfg = dict(method="dynamicvit", case=name, **BASE, batch=BATCH, rho=rho, pruning_loc=locs, token_ratio=ratios,
             kept_counts=[int(196 * r) for r in ratios], reference_repo="raoyongming/DynamicViT",
             reference_commit=COMMIT, noise_std=NOISE_STD, seed=seed, min_margin=min_margin,
             min_decision_gap=min_decision_gap,
             loss="DistillDiffPruningLoss_dynamic(ratio_weight=2.0, distill_weight=0.5, clf_weight=1.0, "
                  "mse_token=True), base criterion CrossEntropyLoss",
             generator="tools/goldens/make_dynamicvit.py", **common.versions())
  common.check_margin(name, min_margin)
  common.save_golden(os.path.join(out_dir, f"{name}.npz"), arrays, cfg)
  print(f"[{name}] kept={[int(196 * r) for r in ratios]} decisions kept={[d.sum(1).tolist() for d in decisions]}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repo", required=True)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  common.add_repo_to_path(args.repo)
  install_stubs()
  for name, case in CASES.items():
    run_case(name, case, args.repo, args.out)


if __name__ == "__main__":
  main()

"""Golden fixtures for SiT's FRD, Feature Recalibration Distillation (Zong et al., ECCV 2022, arXiv:2111.12624
§3.2): the training pass of a SiT student with its reverse TSMs, a dense teacher, and the reference's loss.

Reference: Sense-X/SiT, commit f5778084c45c93f2121685989fa35f930f7e8c54 (code MIT per its README, LICENSE file
Apache-2.0; run only, nothing of it is copied into tokcomp). What runs, unmodified:
  * student: ``models.lvvit.LVViT(distillation_type="frd", conv_distillation=False)`` in TRAIN mode (dropout and
    drop-path rates 0, so deterministic): it returns ``(x_cls, x_cls, layer_tokens)``, layer_tokens[i] being the
    patch tokens after block i (and after the TSM that follows it), mapped back to all N0 patches by
    ``rtsm[i]`` (a ``ReverseTSM``) once any patch was dropped, else as they are;
  * teacher: ``LVViT(distillation_type=None)`` in eval mode (what the reference's main.py builds), returning
    ``(logits, layer_tokens)`` with every block's patch tokens;
  * ``losses.DistillationLoss(CrossEntropyLoss(), teacher, None, "frd", lambda_token, lambda_logits, 0, tau)``:
    loss = CE + lambda_token * mean_i MSE(student_i, teacher_i) + lambda_logits * tau^2 * KL(teacher || student)
    (batch mean) + 0 (no CNN teacher, so no hard distillation term).
Parameters: the reference's own init, then N(0, NOISE_STD) noise on every trainable parameter (student: seed + 1);
the teacher starts from the student's backbone and gets N(0, TEACHER_NOISE) more (seed + 3), so the token and
logit terms are far from 0. Inputs N(0, 1) (seed + 2), labels uniform in [0, 10) (seed + 4). float32, CPU.
No selection is involved (the TSM's aggregates and the reverse maps are continuous), so no margin is recorded.

Adaptations (run time only; the checkout is not edited): as tools/goldens/make_sit.py,
``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` for both backbones (tokcomp's ViT); the TSM's and the reverse
TSM's own ``nn.LayerNorm(dim)`` keep torch's 1e-5, as tokcomp's; torchvision's nms schema stub before
``import timm``. The unused ``aux_head`` (token labelling) is not saved.

Cases (patch 8, 40 px -> 25 patches + CLS, embed 32, 2 heads, depth 4, mlp_ratio 4, 10 classes, batch 3; small so
each npz, with the teacher and the reverse TSMs' N0 x 4 N0 MLPs, stays under 1 MB):
  sit_frd_b112_k06   stage_blocks [1, 1, 2], keep 0.6: 25 -> 15 -> 9, a reverse TSM after every block   seed 710
  sit_frd_b22_k04    stage_blocks [2, 2],    keep 0.4: 25 -> 10, block 0's tokens as they are (identity)  seed 711
lambda_token 2.0 (the reference's scripts), lambda_logits 1.5 (not its 2.0: unequal weights catch a swap), tau 1.

Saved (tests/goldens/<case>.npz): param/<student state_dict key> (backbone, head, tsm.*, rtsm.*),
teacher/<teacher state_dict key>, input [B,3,40,40], labels [B], logits [B,10] (student, train mode),
teacher_logits [B,10], student_tokens/<i> and teacher_tokens/<i> [B,25,32] (i = block), loss, loss_cls,
loss_token, loss_logits, loss_cnn (scalars, the reference's), config (JSON string).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_sit_frd.py --repo /work/refs/SiT --out tests/goldens
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from make_sit import COMMIT  # noqa: E402  (registers the nms stub and imports torch)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

NOISE_STD = 0.1
TEACHER_NOISE = 0.05
BATCH = 3
LAMBDA_TOKEN, LAMBDA_LOGITS, TAU = 2.0, 1.5, 1.0
BASE = dict(img_size=40, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=4, num_heads=2,
            mlp_ratio=4.0, qkv_bias=True, p_emb="naive", skip_lam=1.0)
CASES = {
    "sit_frd_b112_k06": dict(stage_blocks=[1, 1, 2], keep=0.6, seed=710),
    "sit_frd_b22_k04": dict(stage_blocks=[2, 2], keep=0.4, seed=711),
}


def make_case(name: str, case: dict, out_dir: str) -> None:
  from losses import DistillationLoss
  from models.lvvit import LVViT

  common.set_deterministic(case["seed"])
  build = partial(LVViT, **BASE, stage_blocks=case["stage_blocks"], keeping_ratio=case["keep"],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
  student = build(distillation_type="frd")
  common.perturb_parameters(student, NOISE_STD, case["seed"] + 1)
  teacher = build(distillation_type=None)
  missing, unexpected = teacher.load_state_dict(student.state_dict(), strict=False)
  assert not missing and all(k.startswith(("tsm.", "rtsm.")) for k in unexpected), (missing, unexpected)
  common.perturb_parameters(teacher, TEACHER_NOISE, case["seed"] + 3)
  student.train()
  teacher.eval()
  x = common.make_inputs(BATCH, BASE["img_size"], case["seed"] + 2)
  labels = torch.from_numpy(np.random.default_rng(case["seed"] + 4).integers(0, 10, BATCH))

  criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, None, "frd", LAMBDA_TOKEN, LAMBDA_LOGITS, 0.0, TAU)
  with torch.no_grad():
    outputs = student(x)
    loss, loss_cls, loss_token, loss_logits, loss_cnn = criterion(x, outputs, labels)
    teacher_logits, teacher_tokens = teacher(x)
  logits, _, student_tokens = outputs
  assert len(student_tokens) == len(teacher_tokens) == BASE["depth"]
  identity = [isinstance(r, nn.Identity) for r in student.rtsm]
  print(name, "reverse TSM identity per block:", identity, "kept:", student.keeped_patches,
        "loss parts:", float(loss_cls), float(loss_token), float(loss_logits), float(loss_cnn))

  state = common.state_dict_arrays(student)
  arrays = {f"param/{k}": v for k, v in state.items() if not k.startswith("aux_head.")}
  arrays.update({f"teacher/{k}": v for k, v in common.state_dict_arrays(teacher).items()
                 if not k.startswith("aux_head.")})
  arrays.update(input=x.numpy(), labels=labels.numpy(), logits=logits.numpy(), teacher_logits=teacher_logits.numpy(),
                loss=np.float64(loss), loss_cls=np.float64(loss_cls), loss_token=np.float64(loss_token),
                loss_logits=np.float64(loss_logits), loss_cnn=np.float64(loss_cnn))
  for i, (s, t) in enumerate(zip(student_tokens, teacher_tokens)):
    arrays[f"student_tokens/{i}"] = s.numpy()
    arrays[f"teacher_tokens/{i}"] = t.numpy()
  slim_index = student.slim_index
  cfg = dict(case=name, commit=COMMIT, seed=case["seed"], noise_std=NOISE_STD, teacher_noise=TEACHER_NOISE,
             batch=BATCH, **BASE, stage_blocks=case["stage_blocks"], keep=case["keep"], slim_index=slim_index,
             kept_counts=student.keeped_patches[1:], layer_patches=student.layer_patches,
             rtsm_identity=identity, lambda_token=LAMBDA_TOKEN, lambda_logits=LAMBDA_LOGITS, tau=TAU,
             spec=f"sit:keep={case['keep']},layers={'-'.join(map(str, slim_index))},frd=1", **common.versions())
  common.save_golden(os.path.join(out_dir, name + ".npz"), arrays, cfg)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--repo", default="/work/refs/SiT")
  ap.add_argument("--out", default="tests/goldens")
  ap.add_argument("--case", choices=sorted(CASES), default=None)
  args = ap.parse_args()
  common.add_repo_to_path(args.repo)
  for name, case in CASES.items():
    if args.case in (None, name):
      make_case(name, case, args.out)


if __name__ == "__main__":
  main()

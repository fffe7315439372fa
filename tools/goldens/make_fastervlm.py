"""Golden fixtures for FasterVLM and VTC-CLS ([CLS]-attention pruning before the projector).

References (run only, nothing copied into tokcomp):
  * Theia-4869/FasterVLM, commit f5d5f12037e105a51865ecb4b28a73cd86eb4921 (Apache-2.0):
    ``llava/model/multimodal_encoder/clip_encoder.py: CLIPVisionTower.feature_select`` (hidden_states[-2] and the
    CLS row attentions[-2][:, :, 0, 1:], select_feature "patch") and ``llava/model/llava_arch.py:
    LlavaMetaForCausalLM.encode_images`` (head mean, torch.topk, index mask).
  * THU-MIG/VTC-CLS, commit e41ac9b4c0db235b3f68a84dbd6bd35f24156a7c (Apache-2.0):
    ``clip_encoder.py: CLIPVisionTower.cls_token_only`` (+ its ``feature_select``) and ``llava_arch.py:
    LlavaMetaForCausalLM.encode_images`` (method "VTC-CLS": Σ over attentions[start:-1] of the head-mean CLS row,
    torch.topk over the patches, back to position order). It squeezes the batch axis: batch 1 only.
Only those functions are executed from the checkout's source (vlm_common.load_functions), with stand-in `self`
objects: a vision tower whose call returns the synthetic hidden states / attentions (a list with one extra
dummy last layer, so index -2 is the feature layer as for LLaVA's select_layer -2), get_model() holding the
token count / method / start layer, and an identity mm_projector. Nothing in the reference files is edited.

Inputs (vlm_common.tower_arrays): hidden [B, N, D] ~ N(0, 1); L layers of softmax(q kᵀ/sqrt(hd)) attention with
random q, k (logit scale 3, so the CLS rows are peaked enough for clear top-k cuts). N = 1 + h w.
Cases (B = 3, L = 4 layers through the feature layer, 4 heads, hd 16):
  fastervlm_g7     7x7 + CLS, D 32: FasterVLM keep 12; VTC-CLS keep 12, start 1
  fastervlm_llava  24x24 + CLS, D 32: FasterVLM keep 144 (25 %); VTC-CLS keep 64, start 1
Saved: x [B, N, D], cls_attn [B, L, H, N] (the CLS rows of the L layers), fastervlm_kept / vtc_kept [B, k]
(patch indices in position order), fastervlm_out / vtc_out [B, k, D] (the features the references hand to the
projector, batch-1 runs stacked), min_margin (smallest relative top-k gap of both scores), config.

Command (repo root, the torch venv):
  /work/venv-torch/bin/python tools/goldens/make_fastervlm.py --fastervlm /work/refs/FasterVLM \
      --vtc /work/refs/VTC-CLS --out tests/goldens
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

FASTERVLM_COMMIT = "f5d5f12037e105a51865ecb4b28a73cd86eb4921"
VTC_COMMIT = "e41ac9b4c0db235b3f68a84dbd6bd35f24156a7c"
BATCH, LAYERS, HEADS, HEAD_DIM = 3, 4, 4, 16
CASES = {
    "fastervlm_g7": dict(grid=(7, 7), dim=32, fastervlm_keep=12, vtc_keep=12, vtc_start=1, seed=31),
    "fastervlm_llava": dict(grid=(24, 24), dim=32, fastervlm_keep=144, vtc_keep=64, vtc_start=1, seed=32),
}


class Identity:
    """mm_projector stand-in: identity, indexable for VTC-CLS's device check."""

    def __getitem__(self, i):
        return types.SimpleNamespace(weight=torch.zeros(1))

    def __call__(self, x):
        return x

    def to(self, device):
        return self


def load(fastervlm_repo, vtc_repo):
    ns = {"torch": torch}
    fv = vlm_common.load_functions(os.path.join(fastervlm_repo, "llava/model/llava_arch.py"),
                                   ["LlavaMetaForCausalLM.encode_images"], dict(ns))
    fv.update(vlm_common.load_functions(os.path.join(fastervlm_repo, "llava/model/multimodal_encoder/clip_encoder.py"),
                                        ["CLIPVisionTower.feature_select"], dict(ns)))
    vtc = vlm_common.load_functions(os.path.join(vtc_repo, "llava/model/llava_arch.py"),
                                    ["LlavaMetaForCausalLM.encode_images"], dict(ns))
    vtc.update(vlm_common.load_functions(os.path.join(vtc_repo, "llava/model/multimodal_encoder/clip_encoder.py"),
                                         ["CLIPVisionTower.cls_token_only", "CLIPVisionTower.feature_select"],
                                         dict(ns)))
    return fv, vtc


def tower_outputs(hidden, attn):
    """HF-style outputs with one dummy layer appended, so [-2] is the feature layer and [start:-1] ends there."""
    layers = [attn[:, i] for i in range(attn.shape[1])]
    return types.SimpleNamespace(hidden_states=[hidden] * 2, attentions=layers + [None], last_hidden_state=None)


def run_fastervlm(fv, hidden, attn, k):
    outs = tower_outputs(hidden, attn)
    tower = types.SimpleNamespace(select_layer=-2, select_feature="patch")
    model = types.SimpleNamespace(get_vision_tower=lambda: (lambda images: fv["CLIPVisionTower.feature_select"](
        tower, outs)), mm_projector=Identity())
    this = types.SimpleNamespace(get_model=lambda: model, get_visual_token_num=lambda: k)
    feats, masks, _ = fv["LlavaMetaForCausalLM.encode_images"](this, hidden)
    kept = np.flatnonzero(masks[0].numpy())
    return kept, feats[0, kept].numpy()


def run_vtc(vtc, hidden, attn, k, start):
    outs = tower_outputs(hidden, attn)
    tower = types.SimpleNamespace(select_layer=-2, select_feature="patch", device=torch.device("cpu"),
                                  dtype=torch.float32)
    tower.vision_tower = lambda images, output_hidden_states=True, output_attentions=True: outs
    tower.feature_select = lambda o, **kw: vtc["CLIPVisionTower.feature_select"](tower, o, **kw)

    def call(images, method, dataset_name, start_layer, token_num):
        assert method == "VTC-CLS"
        return vtc["CLIPVisionTower.cls_token_only"](tower, images, if_adaptive=True, reduction_ratio=1 / 8,
                                                      token_num=token_num, start_layer=start_layer,
                                                      dataset_name=dataset_name)

    model = types.SimpleNamespace(method="VTC-CLS", token_num=k, layer=start, dataset_name=None,
                                  get_vision_tower=lambda: call, mm_projector=Identity())
    this = types.SimpleNamespace(get_model=lambda: model)
    feats = vtc["LlavaMetaForCausalLM.encode_images"](this, hidden)[0].numpy()
    # which patches: match rows back to the patch features (exact copies)
    patches = hidden[0, 1:].numpy()
    kept = np.array([int(np.flatnonzero((patches == r).all(1))[0]) for r in feats])
    return kept, feats


def run_case(name, case, fv, vtc, out_dir):
    common.set_deterministic(case["seed"])
    hidden, attn, _ = vlm_common.tower_arrays(case["seed"], BATCH, case["grid"], case["dim"], HEADS, HEAD_DIM,
                                              layers=LAYERS, logit_scale=3.0)
    res = {k: [] for k in ("fastervlm_kept", "fastervlm_out", "vtc_kept", "vtc_out")}
    margin = np.inf
    with torch.no_grad():
        for b in range(BATCH):
            h, a = hidden[b:b + 1], attn[b:b + 1]
            kept, out = run_fastervlm(fv, h, a, case["fastervlm_keep"])
            res["fastervlm_kept"].append(kept)
            res["fastervlm_out"].append(out)
            kept, out = run_vtc(vtc, h, a, case["vtc_keep"], case["vtc_start"])
            assert (np.diff(kept) > 0).all()
            res["vtc_kept"].append(kept)
            res["vtc_out"].append(out)
            rows = a[0, :, :, 0, 1:].double().mean(1).numpy()  # [L, H, n] -> [L, n]
            margin = min(margin, vlm_common.topk_margin(rows[-1], case["fastervlm_keep"]),
                         vlm_common.topk_margin(rows[case["vtc_start"]:].sum(0), case["vtc_keep"]))
    res = {k: np.stack(v) for k, v in res.items()}
    print(f"[{name}] fastervlm {res['fastervlm_out'].shape}, vtc {res['vtc_out'].shape}, min margin {margin:.3g}")
    common.check_margin(name, margin)
    cfg = dict(case, batch=BATCH, layers=LAYERS, heads=HEADS, repo="Theia-4869/FasterVLM",
               commit=FASTERVLM_COMMIT, vtc_repo="THU-MIG/VTC-CLS", vtc_commit=VTC_COMMIT,
               torch_version=torch.__version__, numpy_version=np.__version__)
    common.save_golden(os.path.join(out_dir, name + ".npz"), dict(
        x=hidden.numpy(), cls_attn=attn[:, :, :, 0, :].numpy(), min_margin=np.float64(margin), **res), cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fastervlm", default="/work/refs/FasterVLM")
    ap.add_argument("--vtc", default="/work/refs/VTC-CLS")
    ap.add_argument("--out", default="tests/goldens")
    a = ap.parse_args()
    fv, vtc = load(a.fastervlm, a.vtc)
    for name, case in CASES.items():
        run_case(name, case, fv, vtc, a.out)


if __name__ == "__main__":
    main()

"""Golden fixtures for VisionZip (dominant + contextual visual tokens), pre-LLM.

Reference: dvlab-research/VisionZip, commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02 (Apache-2.0; run only,
nothing of it is copied into tokcomp). What runs: ``visionzip/clip_encoder.py:
CLIPVisionTower_VisionZip.forward`` (the whole selection: dominant by the CLS attention row summed over heads,
contextual targets and merge), called with a stand-in ``self`` whose ``vision_tower(...)`` returns the synthetic
hidden states and attentions at index -2 and whose ``vision_tower.vision_model.encoder.layers[-2].metric`` holds
the head-mean keys; ``vision_tower._info`` holds {"dominant": dominant_num, "contextual": contextual_num}, as
``visionzip.main.visionzip`` stores them (dominant_num = public dominant - 1).

Adaptations (REFERENCES.md): ``visionzip/__init__.py`` imports LLaVA, so an empty ``visionzip`` package module
pointing at the checkout's folder is registered and only ``visionzip.clip_encoder`` (+ its ``.utils``) is
imported; their ``transformers`` imports are names the selection never calls, provided as empty stand-in
classes (vlm_common.stub_modules). No reference file is edited.

Inputs (vlm_common.tower_arrays, seeded): hidden [B, N, D] ~ N(0, 1); attention softmax(q kᵀ/sqrt(hd)) of
random q, k [B, H, N, hd]; metric = mean over heads of k. N = 1 + h w.
Cases (B = 3; each sample is run alone at batch 1, and the batch of 3 is run too and must agree):
  visionzip_g7      7x7 + CLS = 50 tokens, D 64, 4 heads, hd 16, dominant 10 (9 patches + CLS), contextual 6
                    (M = 40, step 6: arange gives 7 targets, truncated to 6)
  visionzip_llava   24x24 + CLS = 577 tokens (LLaVA-1.5's CLIP-L/14-336 grid), D 32, 4 heads, hd 16,
                    dominant 54 (53 + CLS), contextual 10 (the paper's 64-token setting)
Saved per case: x [B, N, D], cls_attn [B, 1, H, N] (the CLS row of the attention), keys [B, N, hd], out
[B, dominant + contextual, D] (batch-1 runs stacked), all_indices [B, dominant] (the reference's second output:
0, then the dominant patches in descending score order), min_margin (the smallest relative gap at the dominant
top-k cut and at every contextual argmax), config.

Command (repo root, the torch venv):
  /work/venv-torch/bin/python tools/goldens/make_visionzip.py --repo /work/refs/VisionZip --out tests/goldens
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

COMMIT = "3151f6df4fca36a4cd1c985e5956e725b1f9ad02"
CASES = {
    "visionzip_g7": dict(grid=(7, 7), dim=64, heads=4, head_dim=16, dominant=10, contextual=6, seed=7),
    "visionzip_llava": dict(grid=(24, 24), dim=32, heads=4, head_dim=16, dominant=54, contextual=10, seed=24),
}
BATCH = 3


def import_reference(repo: str):
    vlm_common.stub_modules({
        "transformers": ["CLIPVisionModel", "CLIPImageProcessor", "CLIPVisionConfig"],
        "transformers.models.clip.modeling_clip": ["CLIPEncoderLayer", "CLIPAttention", "CLIPEncoder",
                                                   "CLIPVisionTransformer"],
        "transformers.modeling_outputs": ["BaseModelOutput", "BaseModelOutputWithPooling", "ImageClassifierOutput"],
    })
    pkg = types.ModuleType("visionzip")
    pkg.__path__ = [os.path.join(os.path.abspath(repo), "visionzip")]
    sys.modules["visionzip"] = pkg  # skip visionzip/__init__.py (LLaVA)
    import visionzip.clip_encoder as clip_encoder
    return clip_encoder.CLIPVisionTower_VisionZip


def stand_in(hidden, attn, metric, dominant_num, contextual_num):
    """A `self` for CLIPVisionTower_VisionZip.forward: index -2 of hidden_states / attentions / layers."""
    outs = types.SimpleNamespace(hidden_states=[hidden, None], attentions=[attn, None])
    layer = types.SimpleNamespace(metric=metric)

    class Tower:
        _info = {"dominant": dominant_num, "contextual": contextual_num}
        vision_model = types.SimpleNamespace(encoder=types.SimpleNamespace(layers=[layer, None]))

        def __call__(self, images, output_hidden_states=True, output_attentions=True):
            return outs

    return types.SimpleNamespace(vision_tower=Tower(), device=torch.device("cpu"), dtype=torch.float32)


def margins(hidden, attn, metric, dominant_num, contextual_num):
    """Relative gaps at the dominant cut and at every contextual argmax (recomputed in NumPy, float64)."""
    s = attn[:, 0, 1:].sum(0).double().numpy()
    out = [vlm_common.topk_margin(s, dominant_num)]
    keep = np.zeros(s.size, bool)
    keep[np.argsort(-s, kind="stable")[:dominant_num]] = True
    rest = np.flatnonzero(~keep) + 1
    m = metric[rest].double().numpy()
    m = m / np.linalg.norm(m, axis=-1, keepdims=True)
    step = max(1, len(rest) // contextual_num)
    t = np.arange(0, len(rest), step)[:contextual_num]
    others = np.setdiff1d(np.arange(len(rest)), t)
    out.append(vlm_common.argmax_margin(m[others] @ m[t].T))
    return min(out)


def run_case(name, case, forward, out_dir):
    common.set_deterministic(case["seed"])
    hidden, attn, metric = vlm_common.tower_arrays(case["seed"], BATCH, case["grid"], case["dim"], case["heads"],
                                                   case["head_dim"])
    attn = attn[:, -1]  # [B, H, N, N]
    dn, cn = case["dominant"] - 1, case["contextual"]
    outs, idxs, margin = [], [], np.inf
    with torch.no_grad():
        for b in range(BATCH):
            o, i = forward(stand_in(hidden[b:b + 1], attn[b:b + 1], metric[b:b + 1], dn, cn), hidden[b:b + 1])
            outs.append(o[0].numpy())
            idxs.append(i[0].numpy())
            margin = min(margin, margins(hidden[b], attn[b], metric[b], dn, cn))
        batched, batched_idx = forward(stand_in(hidden, attn, metric, dn, cn), hidden)
    out, idx = np.stack(outs), np.stack(idxs)
    np.testing.assert_allclose(batched.numpy(), out, rtol=1e-6, atol=1e-6)  # the reference is batch-correct
    np.testing.assert_array_equal(batched_idx.numpy(), idx)
    print(f"[{name}] out {out.shape}, min margin {margin:.3g}")
    common.check_margin(name, margin)
    cfg = dict(case, batch=BATCH, repo="dvlab-research/VisionZip", commit=COMMIT, torch_version=torch.__version__,
               numpy_version=np.__version__)
    common.save_golden(os.path.join(out_dir, name + ".npz"), dict(
        x=hidden.numpy(), cls_attn=attn[:, None, :, 0, :].numpy(), keys=metric.numpy(), out=out,
        all_indices=idx, min_margin=np.float64(margin)), cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", default="/work/refs/VisionZip")
    ap.add_argument("--out", default="tests/goldens")
    a = ap.parse_args()
    cls = import_reference(a.repo)
    for name, case in CASES.items():
        run_case(name, case, cls.forward, a.out)


if __name__ == "__main__":
    main()

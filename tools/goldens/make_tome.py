"""Golden fixtures for ToMe (Token Merging) from the official PyTorch reference.

Reference: facebookresearch/ToMe, commit af95e4b1befa172dadccd8c81e223b10090f9579 (CC BY-NC 4.0;
read/run only, nothing of it is copied into tokcomp). What runs:
``tome.patch.timm(model, trace_source=True, prop_attn=...)`` (module ``tome/patch/timm.py``:
ToMeVisionTransformer / ToMeBlock / ToMeAttention), which calls ``tome.merge.bipartite_soft_matching``,
``tome.merge.merge_wavg`` and ``tome.merge.merge_source``; the per-layer schedule is
``tome.utils.parse_r``. The model is timm 1.0.31's ``VisionTransformer`` (or
``timm.models.deit.VisionTransformerDistilled``), built from timm's own init, then every trainable
parameter gets N(0, 0.02) noise with a fixed seed. Eval mode, torch.no_grad, float32, CPU.

No adaptation of the reference is needed. To measure selection margins, the script wraps the name
``bipartite_soft_matching`` inside ``tome.patch.timm`` with a recorder that stores the metric and r
and then calls the original unchanged.

Cases (tiny ViT: patch 8, embed 96, 3 heads, depth 4, mlp_ratio 4, 10 classes, batch 3):
  tome_cls50_r5       56 px, CLS, 50 tokens, r=5,              prop_attn=True
  tome_cls37_inflect  48 px, CLS, 37 tokens, r=(4, -0.5),      prop_attn=True
  tome_dist51_list    56 px, CLS+dist, 51 tokens, r=[6,5,4,3], prop_attn=True
  tome_cls50_noprop   56 px, CLS, 50 tokens, r=8,              prop_attn=False

Saved per case (tests/goldens/<case>.npz): param/<state_dict key>, input [B,3,H,W], logits [B,10],
size [B,N',1], source [B,N',N0], block_out/<i> [B,N_i,96] (reference token order),
tokens_per_layer [depth] (sequence length after block i, protected tokens included),
r_per_layer [depth] (parse_r output), r_applied [depth] (after the (N - protected) // 2 cap),
min_margin, config (JSON string).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_tome.py --tome-repo /work/refs/ToMe --out tests/goldens
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402

TOME_COMMIT = "af95e4b1befa172dadccd8c81e223b10090f9579"
NOISE_STD = 0.02
BATCH = 3
BASE = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)

CASES = {
    "tome_cls50_r5": dict(img_size=56, distilled=False, r=5, prop_attn=True, seed=0),
    "tome_cls37_inflect": dict(img_size=48, distilled=False, r=(4, -0.5), prop_attn=True, seed=10),
    "tome_dist51_list": dict(img_size=56, distilled=True, r=[6, 5, 4, 3], prop_attn=True, seed=20),
    "tome_cls50_noprop": dict(img_size=56, distilled=False, r=8, prop_attn=False, seed=30),
    # No class token (global average pooling): ToMe leaves the unmerged A tokens in descending score order,
    # and that order compounds through the next layers' A/B split.
    "tome_gap49_r6": dict(img_size=56, distilled=False, r=6, prop_attn=True, seed=46, class_token=False),
}


def build_model(case: dict):
    import timm.models.vision_transformer as vt
    from timm.models.deit import VisionTransformerDistilled

    cls = VisionTransformerDistilled if case["distilled"] else vt.VisionTransformer
    class_token = case.get("class_token", True)
    model = cls(img_size=case["img_size"], global_pool="token" if class_token else "avg",
                class_token=class_token, qkv_bias=True, **BASE)
    return model


def margins_for_matching(rec: dict, log: common.MarginLog, layer: int) -> None:
    """Selection margins of one bipartite matching call, computed independently in float64."""
    metric = rec["metric"].double()
    r = rec["r"]
    protected = int(rec["class_token"]) + int(rec["distill_token"])
    t = metric.shape[1]
    r_eff = min(r, (t - protected) // 2)
    if r_eff <= 0:
        return
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if rec["class_token"]:
        scores[:, 0, :] = -math.inf
    if rec["distill_token"]:
        scores[:, :, 0] = -math.inf
    node_max, _ = scores.max(dim=-1)
    for bi in range(scores.shape[0]):
        order = torch.argsort(node_max[bi], descending=True)
        nm = node_max[bi][order].numpy()
        log.add(f"layer{layer}/b{bi}/rank-cut", common.topk_cut_gap(nm, r_eff))
        if not rec["class_token"]:  # the whole descending order of the unmerged A nodes is output order
            for j in range(r_eff, nm.shape[0] - 1):
                log.add(f"layer{layer}/b{bi}/order{j}", common.relative_gap(nm[j], nm[j + 1]))
        for a_idx in order[:r_eff].tolist():
            row = torch.sort(scores[bi, a_idx], descending=True).values.numpy()
            if row.shape[0] >= 2:
                log.add(f"layer{layer}/b{bi}/A{a_idx}/best-match", common.relative_gap(row[0], row[1]))


def run_case(name: str, case: dict, tome_repo: str, out_dir: str, seed_override=None) -> float:
    import timm
    import tome
    import tome.utils

    tome_patch_mod = sys.modules["tome.patch.timm"]
    seed = case["seed"] if seed_override is None else seed_override
    common.set_deterministic(seed)
    model = build_model(case)
    common.perturb_parameters(model, NOISE_STD, seed + 1)
    model.eval()
    x = common.make_inputs(BATCH, case["img_size"], seed + 2)

    tome.patch.timm(model, trace_source=True, prop_attn=case["prop_attn"])
    assert type(model.blocks[0]).__name__ == "ToMeBlock"
    assert type(model.blocks[0].attn).__name__ == "ToMeAttention"
    model.r = case["r"] if not isinstance(case["r"], list) else list(case["r"])
    depth = len(model.blocks)
    r_per_layer = tome.utils.parse_r(depth, model.r if not isinstance(model.r, list) else list(model.r))

    records = []
    original = tome_patch_mod.bipartite_soft_matching

    def recorder(metric, r, class_token=False, distill_token=False):
        records.append(dict(metric=metric.detach().clone(), r=r, class_token=class_token,
                            distill_token=distill_token))
        return original(metric, r, class_token, distill_token)

    block_out = {}
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(
            lambda mod, inp, out, i=i: block_out.__setitem__(i, out.detach().clone())))
    tome_patch_mod.bipartite_soft_matching = recorder
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        tome_patch_mod.bipartite_soft_matching = original
        for h in hooks:
            h.remove()

    info = model._tome_info
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    tokens_per_layer = [int(block_out[i].shape[1]) for i in range(depth)]
    # r actually applied per layer (after the cap); blocks with r <= 0 never call the matcher
    r_applied = []
    prev = n0
    for i in range(depth):
        r_applied.append(prev - tokens_per_layer[i])
        prev = tokens_per_layer[i]

    log = common.MarginLog()
    rec_iter = iter(records)
    for i in range(depth):
        if r_per_layer[i] > 0:
            margins_for_matching(next(rec_iter), log, i)
    min_margin = log.report(name)

    arrays = {f"param/{k}": v for k, v in common.state_dict_arrays(model).items()}
    arrays["input"] = x.numpy()
    arrays["logits"] = logits.numpy()
    arrays["size"] = info["size"].numpy()
    arrays["source"] = info["source"].numpy()
    for i in range(depth):
        arrays[f"block_out/{i}"] = block_out[i].numpy()
    arrays["tokens_per_layer"] = np.array(tokens_per_layer, dtype=np.int64)
    arrays["r_per_layer"] = np.array(r_per_layer, dtype=np.int64)
    arrays["r_applied"] = np.array(r_applied, dtype=np.int64)
    arrays["min_margin"] = np.array(min_margin, dtype=np.float64)

    r_user = case["r"]
    cfg = dict(
        method="tome",
        case=name,
        img_size=case["img_size"], **BASE,
        in_chans=3, batch=BATCH,
        class_token=case.get("class_token", True), distilled=case["distilled"],
        global_pool="token" if case.get("class_token", True) else "avg",
        qkv_bias=True, layer_norm_eps=1e-6, act="gelu_erf",
        num_prefix_tokens=int(model.num_prefix_tokens), num_patches=int(model.patch_embed.num_patches),
        tokens_in=int(n0),
        model_class=("timm.models.deit.VisionTransformerDistilled" if case["distilled"]
                     else "timm.models.vision_transformer.VisionTransformer"),
        r=list(r_user) if isinstance(r_user, (list, tuple)) else r_user,
        r_kind=type(r_user).__name__,
        r_per_layer=[int(v) for v in r_per_layer],
        r_applied=r_applied,
        tokens_per_layer=tokens_per_layer,
        prop_attn=case["prop_attn"], trace_source=True,
        distilled_logits="mean of head(x[:,0]) and head_dist(x[:,1]) in eval" if case["distilled"] else None,
        reference_repo="facebookresearch/ToMe",
        reference_commit=common.git_commit_of(tome_repo, TOME_COMMIT),
        reference_entry="tome.patch.timm(model, trace_source=True, prop_attn=...); model.r = r",
        noise_std=NOISE_STD, seed=seed, init_seed=seed, noise_seed=seed + 1, input_seed=seed + 2,
        input_distribution="standard normal",
        min_margin=min_margin,
        margin_definition=("min over layers/samples of relative gaps: r-th vs (r+1)-th best A-node score, "
                           "and best vs second-best B match of each merged A node"),
        generator="tools/goldens/make_tome.py",
        **common.versions(),
    )
    common.check_margin(name, min_margin)
    common.save_golden(os.path.join(out_dir, f"{name}.npz"), arrays, cfg)
    print(f"[{name}] tokens {n0} -> {tokens_per_layer}, r_per_layer={r_per_layer}, "
          f"logits[0,:3]={logits[0, :3].tolist()}")
    return min_margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tome-repo", required=True, help="checkout of facebookresearch/ToMe")
    ap.add_argument("--out", default=os.path.join("tests", "goldens"))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--seed", type=int, default=None, help="override the per-case seed")
    args = ap.parse_args()
    common.add_repo_to_path(args.tome_repo)
    for name in args.cases:
        run_case(name, CASES[name], args.tome_repo, args.out, args.seed)


if __name__ == "__main__":
    main()

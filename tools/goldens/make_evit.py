"""Golden fixtures for EViT (attentive token keeping + fused inattentive token).

Reference: youweiliang/evit, commit 5ca95a7cf4a8637193284895c5bc0dd9dc365982 (Apache-2.0; run only,
nothing of it is copied into tokcomp). What runs: ``evit.EViT`` (the repo's own ViT, timm/DeiT
state-dict key names) with its ``evit.Block`` / ``evit.Attention`` and ``helpers.complement_idx``.
The model is built with the reference's own init (``EViT.init_weights('')``), then every trainable
parameter gets N(0, 0.1) noise with a fixed seed (0.1 rather than 0.02 so the CLS-attention scores
are well separated at every top-k cut). Eval mode, torch.no_grad, float32, CPU.
``model(x, get_idx=True)`` gives the logits and the kept indices; ``model.forward_features(x)``
gives the per-layer token counts.

Adaptation (the only one REFERENCES.md lists): ``helpers.py`` imports ``torchprofile`` at module
level for FLOP counting; a stub module is put into ``sys.modules`` first. ``evit.py``'s
``timm.models.helpers/layers/registry`` imports still exist in timm 1.0.31 (FutureWarning only).

Cases (tiny EViT: patch 8, embed 96, 3 heads, depth 4, mlp_ratio 4, 10 classes, batch 3):
  evit_fuse_50    56 px (49 patches + CLS), keep_rate=(1, 0.7, 1, 0.7), fuse_token=True
  evit_nofuse_50  56 px (49 patches + CLS), keep_rate=(1, 0.7, 1, 0.7), fuse_token=False
  evit_fuse_37    48 px (36 patches + CLS), keep_rate=(1, 0.5, 0.7, 1), fuse_token=True

Saved per case (tests/goldens/<case>.npz): param/<state_dict key>, input [B,3,H,W], logits [B,10],
block_out/<i> [B,N_i,96] (reference token order: CLS, kept tokens in descending score order,
then the fused token if any), kept_idx/<i> [B,k] for each block i that prunes (indices into the
NON-CLS tokens entering block i, i.e. position p in the sequence is index p-1; descending score
order, exactly as returned with get_idx=True), cls_attn/<i> [B,N_i_in-1] (the head-mean CLS
attention row the reference ranks, for pruning blocks), tokens_per_layer [depth] (the reference's
left_tokens from forward_features: NON-CLS tokens after block i, fused token included),
seq_len_per_layer [depth] (= tokens_per_layer + 1), min_margin (smallest relative top-k gap at a
cut), min_order_gap (smallest relative gap between adjacent kept scores; governs the kept-token
order in block_out), config (JSON string).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_evit.py --evit-repo /work/refs/evit --out tests/goldens
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

EVIT_COMMIT = "5ca95a7cf4a8637193284895c5bc0dd9dc365982"
NOISE_STD = 0.1
BATCH = 3
BASE = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)

CASES = {
    "evit_fuse_50": dict(img_size=56, keep_rate=(1, 0.7, 1, 0.7), fuse_token=True, seed=100),
    "evit_nofuse_50": dict(img_size=56, keep_rate=(1, 0.7, 1, 0.7), fuse_token=False, seed=100),
    "evit_fuse_37": dict(img_size=48, keep_rate=(1, 0.5, 0.7, 1), fuse_token=True, seed=120),
}


def install_stubs() -> None:
    if "torchprofile" not in sys.modules:
        stub = types.ModuleType("torchprofile")

        def profile_macs(*args, **kwargs):  # only used for FLOP counting, never here
            raise RuntimeError("torchprofile stub: FLOP counting is not available")

        stub.profile_macs = profile_macs
        sys.modules["torchprofile"] = stub


def run_case(name: str, case: dict, evit_repo: str, out_dir: str, seed_override=None) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import evit

    seed = case["seed"] if seed_override is None else seed_override
    common.set_deterministic(seed)
    model = evit.EViT(img_size=case["img_size"], in_chans=3, qkv_bias=True, distilled=False,
                      keep_rate=tuple(case["keep_rate"]), fuse_token=case["fuse_token"], **BASE)
    common.perturb_parameters(model, NOISE_STD, seed + 1)
    model.eval()
    x = common.make_inputs(BATCH, case["img_size"], seed + 2)
    depth = len(model.blocks)

    block_out, attn_out = {}, {}
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_hook(
            lambda mod, inp, out, i=i: block_out.__setitem__(i, (out[0].detach().clone(), out[1], out[2]))))
        hooks.append(blk.attn.register_forward_hook(
            lambda mod, inp, out, i=i: attn_out.__setitem__(
                i, dict(n_in=inp[0].shape[1], cls_attn=None if out[3] is None else out[3].detach().clone(),
                        idx=None if out[2] is None else out[2].detach().clone(), left=out[4]))))
    with torch.no_grad():
        logits, idxs = model(x, get_idx=True)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        feats, left_tokens, idxs2 = model.forward_features(x, get_idx=True)
        logits_plain = model(x)
    assert torch.equal(logits, logits_plain)
    left_tokens = [int(v) for v in left_tokens]
    assert left_tokens == [int(block_out[i][1]) for i in range(depth)]

    # kept indices per pruning block (the returned list is ordered by pruning block)
    prune_blocks = [i for i in range(depth) if block_out[i][2] is not None]
    assert len(prune_blocks) == len(idxs)
    for j, i in enumerate(prune_blocks):
        assert torch.equal(idxs[j], block_out[i][2]) and torch.equal(idxs[j], idxs2[j])

    log = common.MarginLog()
    order_log = common.MarginLog()
    kept_counts = []
    for i in range(depth):
        a = attn_out[i]
        kept_counts.append(None if a["cls_attn"] is None else int(a["left"]))
        if a["cls_attn"] is None:
            continue
        k = int(a["left"])
        for bi in range(BATCH):
            s = torch.sort(a["cls_attn"][bi].double(), descending=True).values.numpy()
            log.add(f"block{i}/b{bi}/cut@{k}", common.topk_cut_gap(s, k))
            for j in range(1, k):
                order_log.add(f"block{i}/b{bi}/order{j}", common.relative_gap(s[j - 1], s[j]))
            # the reference's kept order must be the descending score order
            kept = block_out[i][2][bi]
            assert torch.all(a["cls_attn"][bi][kept][:-1] >= a["cls_attn"][bi][kept][1:])
    min_margin = log.report(name)
    min_order_gap = order_log.report(name + " kept-order")

    # expected counts from the documented formula, in Python floats
    expected = []
    n_non_cls = model.patch_embed.num_patches
    for i, kr in enumerate(case["keep_rate"]):
        if kr < 1:
            left = math.ceil(kr * n_non_cls)
            if left != n_non_cls:
                n_non_cls = left + (1 if case["fuse_token"] else 0)
        expected.append(n_non_cls)
    assert expected == left_tokens, (expected, left_tokens)

    arrays = {f"param/{k}": v for k, v in common.state_dict_arrays(model).items()}
    arrays["input"] = x.numpy()
    arrays["logits"] = logits.numpy()
    for i in range(depth):
        arrays[f"block_out/{i}"] = block_out[i][0].numpy()
    for i in prune_blocks:
        arrays[f"kept_idx/{i}"] = block_out[i][2].numpy().astype(np.int64)
        arrays[f"cls_attn/{i}"] = attn_out[i]["cls_attn"].numpy()
    arrays["tokens_per_layer"] = np.array(left_tokens, dtype=np.int64)
    arrays["seq_len_per_layer"] = np.array([v + 1 for v in left_tokens], dtype=np.int64)
    arrays["min_margin"] = np.array(min_margin, dtype=np.float64)
    arrays["min_order_gap"] = np.array(min_order_gap, dtype=np.float64)

    cfg = dict(
        method="evit",
        case=name,
        img_size=case["img_size"], **BASE,
        in_chans=3, batch=BATCH,
        class_token=True, distilled=False, global_pool="token",
        qkv_bias=True, layer_norm_eps=1e-6, act="gelu_erf",
        num_patches=int(model.patch_embed.num_patches), tokens_in=int(model.patch_embed.num_patches) + 1,
        model_class="evit.EViT",
        keep_rate=list(case["keep_rate"]), fuse_token=case["fuse_token"],
        prune_blocks=prune_blocks,
        kept_counts=kept_counts,
        tokens_per_layer=left_tokens,
        tokens_per_layer_meaning="non-CLS tokens after each block (fused token included), as forward_features returns",
        kept_idx_meaning="indices into the non-CLS tokens entering the block (sequence position - 1), "
                         "descending head-mean CLS-attention order (torch.topk sorted=True)",
        count_formula="k = math.ceil(keep_rate * (N - 1)) with N - 1 = non-CLS tokens entering the block "
                      "(earlier fused token included); no pruning if k == N - 1",
        reference_repo="youweiliang/evit",
        reference_commit=common.git_commit_of(evit_repo, EVIT_COMMIT),
        reference_entry="evit.EViT(...); model(x, get_idx=True); model.forward_features(x)",
        stubs=["sys.modules['torchprofile'] stub (profile_macs)"],
        noise_std=NOISE_STD, seed=seed, init_seed=seed, noise_seed=seed + 1, input_seed=seed + 2,
        input_distribution="standard normal",
        min_margin=min_margin, min_order_gap=min_order_gap,
        margin_definition="min over pruning blocks/samples of the relative gap between the k-th and "
                          "(k+1)-th largest head-mean CLS attention",
        generator="tools/goldens/make_evit.py",
        **common.versions(),
    )
    common.check_margin(name, min_margin)
    common.save_golden(os.path.join(out_dir, f"{name}.npz"), arrays, cfg)
    print(f"[{name}] left_tokens={left_tokens} kept_counts={kept_counts} prune_blocks={prune_blocks} "
          f"logits[0,:3]={logits[0, :3].tolist()}")
    return min_margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--evit-repo", required=True, help="checkout of youweiliang/evit")
    ap.add_argument("--out", default=os.path.join("tests", "goldens"))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--seed", type=int, default=None, help="override the per-case seed")
    args = ap.parse_args()
    install_stubs()
    common.add_repo_to_path(args.evit_repo)
    for name in args.cases:
        run_case(name, CASES[name], args.evit_repo, args.out, args.seed)


if __name__ == "__main__":
    main()

"""Golden fixtures for token clustering + reconstruction (Liang et al., NeurIPS 2022, arXiv:2210.01035).

Reference: Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter, commit
63f40661068c0a6bfb1f0ad38e105626a74c403d (Apache-2.0; run only, nothing of it is copied into tokcomp).
What runs: its ``mmseg/ops/cluster.py`` ``TokenClusteringBlock`` and ``mmseg/ops/reconstruction.py``
``TokenReconstructionBlock`` (and ``mmseg/models/utils/shape.py``), loaded straight from their files, on a timm
1.0.31 ``VisionTransformer``. The block loop is the one of the reference's
``mmseg/models/backbones/hourglass_vit.py`` ``HourglassVisionTransformer.forward`` + ``cluster`` (run block i;
if i == clustering location: cluster the patch tokens; if i is the last block: final norm; if i == the
reconstruction location: reconstruct), and, with no in-loop reconstruction, the Segmenter wiring of
``mmseg/models/segmentors/encoder_decoder.py`` (reconstruct the normed backbone output). That backbone is an
mmcv/mmseg ``VisionTransformer`` whose blocks are numerically a timm ViT's (pre-LN, qkv bias, exact GELU,
LayerNorm eps 1e-6): timm stands in for it, since mmcv cannot be installed here.

Adaptations (run time only, nothing edited on disk):
  * the three reference files are loaded with ``importlib.util.spec_from_file_location`` rather than through
    the ``mmseg`` package (whose ``__init__`` needs mmcv);
  * ``TokenReconstructionBlock._forward`` calls ``.cuda()`` on a zeros tensor: ``torch.Tensor.cuda`` is
    replaced by the identity while the script runs (CPU only).

Tiny model: patch 8, embed 96, 3 heads, depth 4, mlp_ratio 4, 10 classes, CLS, batch 3, timm init then
N(0, 0.1) noise on every parameter. One model (``cluster_model56.npz``: params, input, the dense model's map)
and one small file per case (``cluster_<case>.npz``). tokcomp's α (cluster after α blocks) is the
reference's location + 1; its β (reconstruct after β blocks, depth = after the final norm) is the
reference's reconstruction location + 1.

Command (from the repo root):
  /work/venv-torch/bin/python tools/goldens/make_cluster.py --ref-repo /work/refs/Expedit-Segmenter --out tests/goldens
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402

REF_COMMIT = "63f40661068c0a6bfb1f0ad38e105626a74c403d"
NOISE_STD = 0.1
BATCH = 3
SEED = 300
BASE = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)
MIN_ROW_WEIGHT = 1e-10  # the reference's exp(-tau d) must not underflow below F.normalize's 1e-12 floor

# location / recon_location: the reference's block indices (None: reconstruct the normed output).
CASES = {
    # 56 px: 7x7 patches + CLS. 7 -> 3 rows and 7 -> 4 columns: overlapping adaptive-pool bins.
    "cluster_a1_g3x4_end": dict(img_size=56, location=0, grid=(3, 4), iters=5, tau=0.01, window=3,
                                recon_location=None, k=4, recon_tau=0.01),
    "cluster_a2_g5x5_b3": dict(img_size=56, location=1, grid=(5, 5), iters=3, tau=0.02, window=5,
                               recon_location=2, k=6, recon_tau=0.03),
    # k = M: every centre contributes (the reference's topk of all M).
    "cluster_a1_g4x4_kall": dict(img_size=56, location=0, grid=(4, 4), iters=2, tau=0.01, window=3,
                                 recon_location=None, k=16, recon_tau=0.005),
}


def load_file(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_reference(repo: str):
    cluster = load_file("expedit_cluster", os.path.join(repo, "mmseg", "ops", "cluster.py"))
    recon = load_file("expedit_reconstruction", os.path.join(repo, "mmseg", "ops", "reconstruction.py"))
    shape = load_file("expedit_shape", os.path.join(repo, "mmseg", "models", "utils", "shape.py"))
    torch.Tensor.cuda = lambda self, *a, **k: self  # adaptation: CPU only
    return cluster, recon, shape


def make_model(img_size: int):
    import timm

    common.set_deterministic(SEED)
    model = timm.models.vision_transformer.VisionTransformer(img_size=img_size, in_chans=3, qkv_bias=True,
                                                             global_pool="token", **BASE)
    common.perturb_parameters(model, NOISE_STD, SEED + 1)
    return model.eval()


def run_case(name: str, case: dict, ref, model, x, out_dir: str) -> float:
    cluster_mod, recon_mod, shape_mod = ref
    depth = len(model.blocks)
    clusterer = cluster_mod.TokenClusteringBlock(num_spixels=case["grid"], n_iters=case["iters"],
                                                 temperture=case["tau"], window_size=case["window"])
    recon_layer = recon_mod.TokenReconstructionBlock(cfg=dict(k=case["k"], temperture=case["recon_tau"]))
    hw = model.patch_embed.grid_size
    aspect = shape_mod.get_aspect_ratio(*hw)
    state = recon_layer.derive_unpooler()
    n_patches = hw[0] * hw[1]

    block_out, cluster_in = {}, None
    with torch.no_grad():
        t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        for i, blk in enumerate(model.blocks):
            t = blk(t)
            block_out[i] = t.clone()
            if i == case["location"]:  # HourglassVisionTransformer.cluster
                state.update_state(feat_before_pooling=t[:, 1:])
                cluster_in = t[:, 1:].clone()
                x_cluster, hard_labels = clusterer(shape_mod.reshape_as_aspect_ratio(t[:, 1:], aspect))
                state.update_state(feat_after_pooling=x_cluster)
                t = torch.cat((t[:, :1], x_cluster), dim=1)
            if i == depth - 1:
                t = model.norm(t)
            if case["recon_location"] is not None and i == case["recon_location"] and t.shape[1] - 1 != n_patches:
                out, _ = state.call(t[:, 1:])
                t = torch.cat([t[:, :1], out], dim=1)
        logits = model.forward_head(t)
        if case["recon_location"] is None:  # encoder_decoder: reconstruct the normed backbone output
            patches, _ = state.call(t[:, 1:])
        else:
            patches = t[:, 1:]
        centres = state.feat_after_pooling
        m = centres.shape[1]
        relation, _ = state.call(torch.eye(m).expand(BATCH, m, m).contiguous())  # R @ I = R, the weights

        # margins: hard labels (nearest final centre) and the top-k cut of the reconstruction weights
        log = common.MarginLog()
        d_hard = clusterer.pairwise_dist(cluster_in.permute(0, 2, 1), centres.permute(0, 2, 1))  # [B, M, N]
        d_recon = ((cluster_in * cluster_in).sum(2)[:, :, None] + (centres * centres).sum(2)[:, None, :]
                   - 2 * torch.einsum("bnc,bmc->bnm", cluster_in, centres))
        w = torch.exp(-case["recon_tau"] * d_recon)
        min_row_weight = float(w.max(dim=2).values.min())
        assert min_row_weight > MIN_ROW_WEIGHT, f"[{name}] reconstruction weights underflow: {min_row_weight:.3g}"
        for b in range(BATCH):
            for n in range(n_patches):
                d = torch.sort(d_hard[b, :, n].double()).values.numpy()
                log.add(f"hard/b{b}/n{n}", (d[1] - d[0]) / max(abs(d[1]), 1e-30))
                s = torch.sort(w[b, n].double(), descending=True).values.numpy()
                log.add(f"topk/b{b}/n{n}", common.topk_cut_gap(s, case["k"]))
        min_margin = log.report(name)
        dense = model.forward_features(x)[:, 1:]

    assert torch.equal(hard_labels, d_hard.argmin(1))
    arrays = {f"block_out/{i}": v.numpy() for i, v in block_out.items()}
    arrays.update(logits=logits.numpy(), dense_map=patches.reshape(BATCH, *hw, -1).numpy(),
                  centres=centres.numpy(), hard_labels=hard_labels.numpy().astype(np.int64),
                  relation=relation.numpy(), cluster_in=cluster_in.numpy(),
                  min_margin=np.array(min_margin, np.float64))
    cos = torch.nn.functional.cosine_similarity(patches, dense, dim=-1)
    rel = float(torch.linalg.norm(patches - dense) / torch.linalg.norm(dense))
    alpha = case["location"] + 1
    beta = depth if case["recon_location"] is None else case["recon_location"] + 1
    cfg = dict(
        method="cluster", case=name, img_size=case["img_size"], **BASE, in_chans=3, batch=BATCH,
        class_token=True, global_pool="token", qkv_bias=True, layer_norm_eps=1e-6, act="gelu_erf",
        grid=list(case["grid"]), iters=case["iters"], tau=case["tau"], window=case["window"],
        k=case["k"], recon_tau=case["recon_tau"], location=case["location"],
        recon_location=case["recon_location"], alpha=alpha, beta=beta,
        spec=f"cluster:grid={case['grid'][0]}x{case['grid'][1]},layer={alpha},iters={case['iters']},"
             f"tau={case['tau']},lam={case['window']}",
        tokens_per_block=[n_patches + 1 if (i < alpha or i >= beta) else m + 1 for i in range(depth)],
        reference_repo="Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter",
        reference_commit=REF_COMMIT,
        reference_entry="mmseg/ops/cluster.py TokenClusteringBlock, mmseg/ops/reconstruction.py "
                        "TokenReconstructionBlock, loop of mmseg/models/backbones/hourglass_vit.py",
        adaptations=["reference files loaded by path (importlib), not through the mmseg package",
                     "torch.Tensor.cuda replaced by the identity (TokenReconstructionBlock calls .cuda())",
                     "timm 1.0.31 VisionTransformer stands in for the mmseg ViT backbone"],
        noise_std=NOISE_STD, seed=SEED, init_seed=SEED, noise_seed=SEED + 1, input_seed=SEED + 2,
        min_margin=min_margin, min_row_weight=min_row_weight,
        margin_definition="min over samples/patches of the relative gap between the nearest and second nearest "
                          "final centre (hard labels) and between the k-th and (k+1)-th reconstruction weight",
        fidelity_vs_dense=dict(mean_cos=float(cos.mean()), min_cos=float(cos.min()), rel_err=rel),
        generator="tools/goldens/make_cluster.py", **common.versions(),
    )
    common.check_margin(name, min_margin)
    common.save_golden(os.path.join(out_dir, f"{name}.npz"), arrays, cfg)
    print(f"[{name}] tokens/block {cfg['tokens_per_block']} vs dense: mean cos {cos.mean():.4f}, rel err {rel:.4f}; "
          f"min row weight {min_row_weight:.3g}")
    return min_margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-repo", required=True, help="checkout of Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter")
    ap.add_argument("--out", default=os.path.join("tests", "goldens"))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    ref = load_reference(os.path.abspath(args.ref_repo))
    models = {}
    for size in sorted({c["img_size"] for c in CASES.values()}):
        model = make_model(size)
        x = common.make_inputs(BATCH, size, SEED + 2)
        with torch.no_grad():
            dense = model.forward_features(x)
        models[size] = (model, x)
        hw = model.patch_embed.grid_size
        arrays = {f"param/{k}": v for k, v in common.state_dict_arrays(model).items()}
        arrays.update(input=x.numpy(), dense_map=dense[:, 1:].reshape(BATCH, *hw, -1).numpy(),
                      logits=model.forward_head(dense).detach().numpy())
        cfg = dict(method="cluster", img_size=size, **BASE, noise_std=NOISE_STD, seed=SEED,
                   reference_commit=REF_COMMIT, generator="tools/goldens/make_cluster.py", **common.versions())
        common.save_golden(os.path.join(args.out, f"cluster_model{size}.npz"), arrays, cfg)
    for name in args.cases:
        model, x = models[CASES[name]["img_size"]]
        run_case(name, CASES[name], ref, model, x, args.out)


if __name__ == "__main__":
    main()

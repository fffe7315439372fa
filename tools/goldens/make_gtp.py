"""Golden fixtures for GTP-ViT (graph-based token propagation, Xu et al., WACV 2024, arXiv:2311.03035).

Reference: Ackesnal/GTP-ViT, commit 97a117814d0ff99edbbe34bec12e851db4be2eb5 (Apache-2.0; run only, nothing
of it is copied into tokcomp). What runs: ``models_v3.GraphPropagationTransformer`` with its
``GraphPropagationBlock`` / ``Attention`` / ``select`` / ``propagate`` (timm-shaped state dict), eval mode,
torch.no_grad, float32, CPU. See tools/goldens/gtp.md for the case table and the array layout.

Run-time adaptations (the reference files are not edited):
  1. ``GraphPropagationTransformer.__init__`` moves the spatial graph to CUDA (``graph.to("cuda")``); during
     construction ``torch.Tensor.to`` maps the device "cuda" to "cpu" (restored right after).
  2. ``propagate`` appends a debug statistic to a file named ``missing`` in the working directory; the
     forward runs with a temporary directory as the working directory (deleted afterwards).
  3. To record what the reference ranks (margins only), ``models_v3.torch`` is a thin proxy of ``torch``
     whose ``argsort`` and ``kthvalue`` log their inputs and then call the real functions unchanged.
  4. Weights: the reference's own init plus seeded N(0, NOISE_STD) noise, then rounded to float16-exact
     values (still run in float32) so that each shared parameter file is < 1 MB stored as float16.

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_gtp.py --gtp-repo /work/refs/gtp --out tests/goldens
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402

GTP_COMMIT = "97a117814d0ff99edbbe34bec12e851db4be2eb5"
NOISE_STD = 0.1
BATCH = 3
IMG = 56  # 7 x 7 patches of 8 px
BASE = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10, qkv_bias=True)
MIN_COS_GAP = 1e-4  # absolute gap at every semantic-graph threshold (cosines lie in [-1, 1])
# The kept tokens come out in descending significance and the test compares slot by slot, so adjacent kept
# scores must not swap either; that order changes no value, so 1e-5 relative (100x fp32 noise) suffices.
MIN_ORDER_GAP = 1e-5
# Attention sparsification zeroes the entries below the k-th smallest probability of each (example, head), i.e.
# the k - 1 smallest: the (k-1)-th and k-th smallest must not swap (relative gap, like a selection cut).
MIN_SPARSITY_GAP = 1e-4

# Parameter sets shared by the cases (one npz each, float16-exact values stored as float16).
PARAMS = {
    "gtp_params_cls50": dict(class_token=True, global_pool="token", seed=300),
    "gtp_params_gap49": dict(class_token=False, global_pool="avg", seed=400),
}

# ours: the tokcomp config string the test builds; ref: the reference's constructor knobs.
CASES = {
    "gtp_mixed_scale_50": dict(
        params="gtp_params_cls50", input_seed=20,
        ours="gtp:num_prop=5,selection=MixedAttnMax,propagation=GraphProp,graph_type=Mixed,num_neighbours=4,"
             "alpha=0.15,token_scale=True",
        ref=dict(selection="MixedAttnMax", propagation="GraphProp", graph_type="Mixed", num_prop=5,
                 num_neighbours=4, alpha=0.15, token_scale=True, sparsity=1)),
    "gtp_spatial_list_50": dict(
        params="gtp_params_cls50", input_seed=12,
        ours="gtp:num_prop=3-4-6-5,selection=MixedAttnMean,graph_type=Spatial,alpha=0.3",
        ref=dict(selection="MixedAttnMean", propagation="GraphProp", graph_type="Spatial", num_prop=[3, 4, 6, 5],
                 num_neighbours=8, alpha=0.3, token_scale=False, sparsity=1)),
    "gtp_mean_cls_50": dict(
        params="gtp_params_cls50", input_seed=13,
        ours="gtp:num_prop=6,selection=CLSAttnMax,propagation=Mean",
        ref=dict(selection="CLSAttnMax", propagation="Mean", graph_type="None", num_prop=6,
                 num_neighbours=8, alpha=0.1, token_scale=False, sparsity=1)),
    "gtp_none_cossim_50": dict(
        params="gtp_params_cls50", input_seed=14,
        ours="gtp:num_prop=7,selection=CosSimMean,propagation=None",
        ref=dict(selection="CosSimMean", propagation="None", graph_type="None", num_prop=7,
                 num_neighbours=8, alpha=0.1, token_scale=False, sparsity=1)),
    # GAP model: the reference's no-CLS semantic graph keeps num_neighbours + 1 neighbours, so it gets 4
    # where tokcomp gets 5 (see gtp.md).
    "gtp_semantic_gap_49": dict(
        params="gtp_params_gap49", input_seed=18,
        ours="gtp:num_prop=4,selection=SumAttnMax,graph_type=Semantic,num_neighbours=5,alpha=0.2,token_scale=True",
        ref=dict(selection="SumAttnMax", propagation="GraphProp", graph_type="Semantic", num_prop=4,
                 num_neighbours=4, alpha=0.2, token_scale=True, sparsity=1)),
    # Attention sparsification (sparsity < 1) in every block: the sparsified attention is applied to the values
    # and is what the selection reads.
    "gtp_sparse_mixed_50": dict(
        params="gtp_params_cls50", input_seed=21,
        ours="gtp:num_prop=5,selection=MixedAttnMax,graph_type=Mixed,num_neighbours=4,alpha=0.1,sparsity=0.7",
        ref=dict(selection="MixedAttnMax", propagation="GraphProp", graph_type="Mixed", num_prop=5,
                 num_neighbours=4, alpha=0.1, token_scale=False, sparsity=0.7)),
    "gtp_sparse_scale_cls_50": dict(
        params="gtp_params_cls50", input_seed=36,
        ours="gtp:num_prop=3-5-4-6,selection=CLSAttnMean,graph_type=Spatial,alpha=0.2,token_scale=True,"
             "sparsity=0.8",
        ref=dict(selection="CLSAttnMean", propagation="GraphProp", graph_type="Spatial", num_prop=[3, 5, 4, 6],
                 num_neighbours=8, alpha=0.2, token_scale=True, sparsity=0.8)),
}


class TorchProxy:
    """``torch`` for models_v3, except that argsort / kthvalue record their inputs (margins only)."""

    def __init__(self, log: dict):
        self._log = log

    def __getattr__(self, name):
        return getattr(torch, name)

    def argsort(self, x, *args, **kwargs):
        self._log["argsort"].append(x.detach().clone())
        return torch.argsort(x, *args, **kwargs)

    def kthvalue(self, x, k, *args, **kwargs):
        self._log["kthvalue"].append((x.detach().clone(), int(k)))
        return torch.kthvalue(x, k, *args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            args = ("cpu",) + args[1:]
        return real_to(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = real_to


@contextlib.contextmanager
def scratch_cwd():
    old, tmp = os.getcwd(), tempfile.mkdtemp(prefix="gtp_ref_")
    os.chdir(tmp)
    try:
        yield
    finally:
        os.chdir(old)
        shutil.rmtree(tmp, ignore_errors=True)


def build(models_v3, pset: dict, ref: dict):
    with cuda_to_cpu():
        model = models_v3.GraphPropagationTransformer(
            img_size=IMG, class_token=pset["class_token"], global_pool=pset["global_pool"],
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **BASE, **ref)
    return model.eval()


def init_params(models_v3, name: str) -> dict:
    """The reference's init + noise, rounded to float16-exact values: {state_dict key: float32 array}."""
    pset = PARAMS[name]
    common.set_deterministic(pset["seed"])
    model = build(models_v3, pset, dict(selection="None", propagation="None", num_prop=0))
    common.perturb_parameters(model, NOISE_STD, pset["seed"] + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return common.state_dict_arrays(model)


def run_case(models_v3, name: str, case: dict, state: dict, out_dir: str) -> None:
    pset = PARAMS[case["params"]]
    ref = case["ref"]
    model = build(models_v3, pset, ref)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x = common.make_inputs(BATCH, IMG, case["input_seed"])

    outs, scales = {}, {}
    def record(i, out):  # returns None: a forward hook that returns a value would replace the output
        outs[i] = out[0].detach().clone()
        scales[i] = None if out[2] is None else out[2].detach().clone()

    hooks = [blk.register_forward_hook(lambda mod, inp, out, i=i: record(i, out))
             for i, blk in enumerate(model.blocks)]
    log = {"argsort": [], "kthvalue": []}
    real_torch = models_v3.torch
    models_v3.torch = TorchProxy(log)
    try:
        with scratch_cwd(), torch.no_grad():
            logits = model(x)
    finally:
        models_v3.torch = real_torch
        for h in hooks:
            h.remove()

    depth = BASE["depth"]
    num_prop = ref["num_prop"] if isinstance(ref["num_prop"], list) else [ref["num_prop"]] * depth
    # Margins: every selection cut and the order of the kept tokens, from what the reference ranked.
    cut_log, order_log = common.MarginLog(), common.MarginLog()
    assert len(log["argsort"]) == depth, len(log["argsort"])
    for i, rank in enumerate(log["argsort"]):
        k = rank.shape[1] - num_prop[i]
        for b in range(BATCH):
            s = torch.sort(rank[b].double(), descending=True).values.numpy()
            cut_log.add(f"block{i}/b{b}/cut@{k}", common.topk_cut_gap(s, k))
            for j in range(1, k):
                order_log.add(f"block{i}/b{b}/order{j}", common.relative_gap(s[j - 1], s[j]))
    min_margin = cut_log.report(name)
    min_order_gap = order_log.report(name + " kept-order")
    # kthvalue runs on the semantic graph's cosines [B, M, M] and, with sparsity < 1, on every block's
    # flattened attention [B, H, N*N].
    tokens_in = [int(model.patch_embed.num_patches + model.num_prefix_tokens)] + [
        int(outs[i].shape[1]) for i in range(depth - 1)]   # sequence length entering each block
    semantic = [(x, k) for x, k in log["kthvalue"] if x.shape[-1] == x.shape[-2]]
    sparse = [(x, k) for x, k in log["kthvalue"] if x.shape[-1] != x.shape[-2]]
    assert len(sparse) == (depth if ref["sparsity"] < 1 else 0), len(sparse)
    # Semantic graph: absolute cosine gap at each row's threshold (kth smallest kept, (k-1)th not).
    min_cos_gap = float("inf")
    for sim, k in semantic:
        srt = torch.sort(sim.double(), dim=-1).values
        gap = (srt[..., k - 1] - srt[..., k - 2]).min().item()
        min_cos_gap = min(min_cos_gap, gap)
    if semantic:
        print(f"[{name}] min semantic-graph cosine gap = {min_cos_gap:.6g}")
    # Sparsification: entries < the k-th smallest are zeroed, so the (k-1)-th and k-th smallest must not swap
    # (the set zeroed would change); the k-th and (k+1)-th swapping changes nothing, reported only.
    below_log, above_log, sparse_k = common.MarginLog(), common.MarginLog(), []
    for i, (probs, k) in enumerate(sparse):
        n = round(probs.shape[-1] ** 0.5)
        assert n == tokens_in[i] and k == int(n * n * (1 - ref["sparsity"])), (n, k)
        sparse_k.append(k)
        srt = torch.sort(probs.double(), dim=-1).values.numpy()
        for b in range(srt.shape[0]):
            for h in range(srt.shape[1]):
                below_log.add(f"block{i}/b{b}/h{h}/k{k}", common.relative_gap(srt[b, h, k - 1], srt[b, h, k - 2]))
                above_log.add(f"block{i}/b{b}/h{h}/k{k}", common.relative_gap(srt[b, h, k], srt[b, h, k - 1]))
    min_sparsity_gap = below_log.report(name + " sparsity threshold") if sparse else float("inf")
    min_sparsity_gap_above = above_log.report(name + " sparsity threshold (above)") if sparse else float("inf")

    tokens = [int(outs[i].shape[1]) for i in range(depth)]
    arrays = {"input": x.numpy(), "logits": logits.numpy()}
    for i in range(depth):
        arrays[f"block_out/{i}"] = outs[i].numpy()
        if scales[i] is not None:
            arrays[f"token_scales/{i}"] = scales[i].numpy()
    arrays["tokens_per_layer"] = np.array(tokens, dtype=np.int64)
    arrays["min_margin"] = np.array(min_margin, dtype=np.float64)
    arrays["min_order_gap"] = np.array(min_order_gap, dtype=np.float64)
    arrays["min_cos_gap"] = np.array(min_cos_gap, dtype=np.float64)
    arrays["min_sparsity_gap"] = np.array(min_sparsity_gap, dtype=np.float64)
    cfg = dict(
        method="gtp", case=name, params=case["params"], img_size=IMG, **BASE, in_chans=3, batch=BATCH,
        class_token=pset["class_token"], global_pool=pset["global_pool"], distilled=False,
        layer_norm_eps=1e-6, act="gelu_erf", ours=case["ours"], reference_kwargs=ref,
        tokens_per_layer=tokens, tokens_per_layer_meaning="sequence length (prefix included) after each block",
        block_out_order="prefix, kept tokens by descending significance, then the mean token (Mean)",
        reference_repo="Ackesnal/GTP-ViT", reference_commit=GTP_COMMIT,
        reference_entry="models_v3.GraphPropagationTransformer(...).eval()(x)",
        adaptations=["torch.Tensor.to('cuda') -> 'cpu' during construction",
                     "forward in a temporary working directory (propagate writes ./missing)",
                     "models_v3.torch proxy logging argsort/kthvalue inputs (margins only)",
                     "weights rounded to float16-exact values"],
        noise_std=NOISE_STD, param_seed=pset["seed"], noise_seed=pset["seed"] + 1, input_seed=case["input_seed"],
        input_distribution="standard normal", min_margin=min_margin, min_order_gap=min_order_gap,
        min_cos_gap=min_cos_gap, min_sparsity_gap=min_sparsity_gap, min_sparsity_gap_above=min_sparsity_gap_above,
        sparsity_k_per_layer=sparse_k, generator="tools/goldens/make_gtp.py", **common.versions())
    common.check_margin(name, min_margin)
    common.check_margin(name + " kept-order", min_order_gap, MIN_ORDER_GAP)
    if sparse:
        common.check_margin(name + " sparsity threshold", min_sparsity_gap, MIN_SPARSITY_GAP)
    if semantic and not min_cos_gap > MIN_COS_GAP:
        raise SystemExit(f"[{name}] semantic cosine gap {min_cos_gap:.3g} <= {MIN_COS_GAP:g}: change seeds")
    common.save_golden(os.path.join(out_dir, f"{name}.npz"), arrays, cfg)
    print(f"[{name}] tokens_per_layer={tokens} logits[0,:3]={logits[0, :3].tolist()}")


def save_params(name: str, state: dict, out_dir: str) -> None:
    """float16 storage of float16-exact float32 values (bit-exact round trip), < 1 MB."""
    for k, v in state.items():
        assert np.array_equal(v.astype(np.float16).astype(np.float32), v), k
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.npz")
    cfg = dict(method="gtp", params=name, img_size=IMG, **BASE, **PARAMS[name], noise_std=NOISE_STD,
               storage="float16 (values are float16-exact; cast to float32 to use)",
               reference_repo="Ackesnal/GTP-ViT", reference_commit=GTP_COMMIT, generator="tools/goldens/make_gtp.py",
               **common.versions())
    np.savez_compressed(path, config=common.config_array(cfg),
                        **{f"param/{k}": v.astype(np.float16) for k, v in state.items()})
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.3f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gtp-repo", required=True, help="checkout of Ackesnal/GTP-ViT")
    ap.add_argument("--out", default=os.path.join("tests", "goldens"))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    common.add_repo_to_path(args.gtp_repo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import models_v3
    states = {}
    for name in args.cases:
        pname = CASES[name]["params"]
        if pname not in states:
            states[pname] = init_params(models_v3, pname)
            save_params(pname, states[pname], args.out)
        run_case(models_v3, name, CASES[name], states[pname], args.out)


if __name__ == "__main__":
    main()

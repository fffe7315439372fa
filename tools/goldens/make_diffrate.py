"""Golden fixtures for DiffRate inference (prune by CLS attention, then merge into the nearest kept token).

Reference: OpenGVLab/DiffRate, commit 91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e (the repository has no licence
file: read and run only, nothing of it is copied into tokcomp). What runs: ``DiffRate.patch.deit(model,
trace_source=True)`` (module ``DiffRate/patch/deit.py``: DiffRateVisionTransformer / DiffRateBlock /
DiffRateAttention, eval branch), which calls ``DiffRate.merge.get_merge_func``; the counts are set with the
model's own ``set_kept_num(prune_kept_num, merge_kept_num)`` as the reference's ``main.py --load_compression_rate``
does. The model is timm 1.0.31's ``VisionTransformer`` (CLS token, token pooling) built from timm's own init,
then every trainable parameter gets N(0, std) noise with a fixed seed. Eval mode, torch.no_grad, float32, CPU,
``model(x, return_flop=False)``.

Adaptations, at run time only:
  1. ``DiffRate/__init__.py`` imports ``DiffRate.patch.caformer``, which imports the repo's top-level
     ``caformer.py``, which imports ``timm.models.layers.helpers`` (gone in timm 1.0). A stub module ``caformer``
     with placeholder classes is put in ``sys.modules`` first; the CAFormer patch is never used.
  2. ``DiffRateBlock.forward`` calls ``self.drop_path`` (timm < 0.9); timm 1.0's Block has ``drop_path1`` /
     ``drop_path2`` instead. Each block gets ``drop_path = nn.Identity()``, which is what both are at
     drop_path_rate 0 (asserted). The reference also skips timm 1.0's ``ls1``/``ls2`` (LayerScale) and the
     attention's ``q_norm``/``k_norm``/``norm``: all Identity here (asserted).
  (``return_flop=False`` is the reference's own argument; it skips the FLOP count, which uses
  ``torch.cuda.amp.autocast``.)

Cases (batch 3, 10 classes, qkv bias, mlp_ratio 4):
  diffrate_cls50        56 px / patch 8 = 49 + CLS = 50 tokens, embed 48, 3 heads, depth 4,
                        prune [50,43,43,30] merge [50,43,35,21] (non-increasing: sort only, prune only,
                        merge only, both)
  diffrate_cls37_clamp  48 px / patch 8 = 36 + CLS = 37, embed 48, 3 heads, depth 4,
                        prune [37,33,29,25] merge [35,27,31,19]: prune[2]=29 > 27 tokens left and
                        merge[2]=31 > prune[2], which the reference clamps (the authors' own files need it)
  diffrate_vits25_197   224 px / patch 16 = 196 + CLS = 197, embed 16, 2 heads, depth 12, the authors'
                        published ViT-S-DeiT 2.5 GFLOPs counts, read from the reference's compression_rate.json
                        (prune[6]=111 > merge[5]=107: clamped). Input stored as uint8 (see below).

Saved per case (tests/goldens/<case>.npz): param/<state_dict key> (the timm model before patching: no ``ddp``
parameters), input [B,3,H,W] float32 (or input_u8 uint8 with input = (u8/255 - 0.5) * 0.5 in float32 numpy ops,
for the 224 px case), logits [B,10], block_out/<i> [B,N_i,D] and size/<i> [B,N_i] (``_diffrate_info["size"]``
after block i) in the reference's token order, source [B,N',N0] (final trace), prune_kept_num / merge_kept_num
[depth] (as set), tokens_per_layer [depth] (sequence length after block i), min_margin (smallest relative gap at
a prune or merge cut, or between a merged token's best and second-best destination), min_order_gap (smallest
relative gap between adjacent CLS scores among the kept tokens: governs the slot order), min_size, config (JSON).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_diffrate.py --diffrate-repo /work/refs/DiffRate --out tests/goldens
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402

DIFFRATE_COMMIT = "91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e"
NOISE_STD = 0.1
ORDER_THRESHOLD = 1e-5  # adjacent kept CLS scores: fp32 score error is ~1e-7 relative
BATCH = 3
TINY = dict(patch_size=8, embed_dim=48, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)  # < 1 MB a file
NARROW12 = dict(patch_size=16, embed_dim=16, depth=12, num_heads=2, mlp_ratio=4.0, num_classes=10)

CASES = {
    "diffrate_cls50": dict(img_size=56, base=TINY, prune=[50, 43, 43, 30], merge=[50, 43, 35, 21], seed=204),
    "diffrate_cls37_clamp": dict(img_size=48, base=TINY, prune=[37, 33, 29, 25], merge=[35, 27, 31, 19],
                                 seed=308),
    "diffrate_vits25_197": dict(img_size=224, base=NARROW12, published=("ViT-S-DeiT", "2.5"), seed=431,
                                noise_std=0.3,
                                uint8_input=True),
}


def install_stubs() -> None:
    if "caformer" not in sys.modules:
        stub = types.ModuleType("caformer")
        for name in ("Attention", "SepConv", "MetaFormerBlock", "MetaFormer", "Downsampling"):
            setattr(stub, name, type(name, (), {}))  # placeholders: DiffRate.patch.caformer is never applied
        sys.modules["caformer"] = stub


def published_counts(repo: str, model: str, flops: str):
    with open(os.path.join(repo, "compression_rate.json")) as f:
        entry = json.load(f)[model][flops]
    # The reference's main.py eval()s these strings; they are plain list literals.
    return ast.literal_eval(entry["prune_kept_num"]), ast.literal_eval(entry["merge_kept_num"])


def uint8_to_input(u8: np.ndarray) -> np.ndarray:
    """The documented transform for uint8-stored inputs (the JAX test does the same numpy ops)."""
    return (u8.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) * np.float32(0.5)


def effective_counts(n0: int, prune, merge):
    """The reference's inference counts: x[:, :prune] slices, merging only when merge < prune."""
    out, n = [], n0
    for p, m in zip(prune, merge):
        n = min(n, p)
        n = min(n, m)
        out.append(n)
    return out


def run_case(name: str, case: dict, repo: str, out_dir: str, seed_override=None, write=True) -> float:
    import timm.models.vision_transformer as vt
    import DiffRate

    seed = case["seed"] if seed_override is None else seed_override
    base = case["base"]
    if "published" in case:
        prune, merge = published_counts(repo, *case["published"])
    else:
        prune, merge = list(case["prune"]), list(case["merge"])
    common.set_deterministic(seed)
    model = vt.VisionTransformer(img_size=case["img_size"], global_pool="token", class_token=True, qkv_bias=True,
                                 **base)
    noise_std = case.get("noise_std", NOISE_STD)
    common.perturb_parameters(model, noise_std, seed + 1)
    model.eval()
    state = common.state_dict_arrays(model)  # before patching: no DiffRate search parameters
    if case.get("uint8_input"):
        gen = torch.Generator().manual_seed(seed + 2)
        u8 = torch.randint(0, 256, (BATCH, 3, case["img_size"], case["img_size"]), generator=gen,
                           dtype=torch.uint8).numpy()
        x = torch.from_numpy(uint8_to_input(u8))
    else:
        u8 = None
        x = common.make_inputs(BATCH, case["img_size"], seed + 2)

    DiffRate.patch.deit(model, trace_source=True)
    for blk in model.blocks:  # adaptation 2 (see the module docstring)
        for mod in (blk.drop_path1, blk.drop_path2, blk.ls1, blk.ls2, blk.attn.q_norm, blk.attn.k_norm,
                    blk.attn.norm):
            assert isinstance(mod, torch.nn.Identity), type(mod)
        blk.drop_path = torch.nn.Identity()
    assert type(model.blocks[0]).__name__ == "DiffRateBlock"
    assert type(model.blocks[0].attn).__name__ == "DiffRateAttention"
    model.set_kept_num(prune, merge)
    assert model.get_kept_num() == (prune, merge)
    depth = len(model.blocks)
    n0 = model.patch_embed.num_patches + 1

    rec = {}
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.register_forward_pre_hook(
            lambda mod, inp, i=i: rec.setdefault(i, {}).__setitem__("x_in", inp[0].detach().clone())))
        hooks.append(blk.attn.register_forward_hook(
            lambda mod, inp, out, i=i: rec[i].update(x_attn=out[0].detach().clone(), attn=out[1].detach().clone())))
        hooks.append(blk.register_forward_hook(
            lambda mod, inp, out, i=i: rec[i].update(out=out.detach().clone(),
                                                     size=model._diffrate_info["size"].detach().clone())))
    with torch.no_grad():
        logits = model(x, return_flop=False)
    for h in hooks:
        h.remove()
    info = model._diffrate_info

    tokens_per_layer = [int(rec[i]["out"].shape[1]) for i in range(depth)]
    expected = effective_counts(n0, prune, merge)
    assert tokens_per_layer == expected, (tokens_per_layer, expected)

    # Margins, in float64, of every decision the output depends on.
    log, order_log = common.MarginLog(), common.MarginLog()
    n_in = n0
    for i in range(depth):
        r = rec[i]
        cls = r["attn"][:, :, 0, 1:].mean(dim=1)  # exactly the reference's importance
        _, idx = torch.sort(cls, descending=True)
        p_eff = min(n_in, prune[i])
        m_eff = min(p_eff, merge[i])
        x_mid = (r["x_in"] + r["x_attn"]).double()
        for b in range(BATCH):
            s = cls[b].double().numpy()[idx[b].numpy()]
            for j in range(1, p_eff - 1):  # sorted positions 1..p_eff-1 are the kept non-CLS tokens
                order_log.add(f"block{i}/b{b}/order{j}", common.relative_gap(s[j - 1], s[j]))
            if p_eff < n_in:
                log.add(f"block{i}/b{b}/prune-cut@{p_eff}", common.topk_cut_gap(s, p_eff - 1))
            if m_eff < p_eff:
                log.add(f"block{i}/b{b}/merge-cut@{m_eff}", common.topk_cut_gap(s, m_eff - 1))
                order = torch.cat([torch.zeros(1, dtype=torch.long), idx[b] + 1])[:p_eff]
                m = x_mid[b, order]
                m = m / m.norm(dim=-1, keepdim=True)
                sim = m[m_eff:] @ m[:m_eff].T
                sim[:, 0] = -math.inf
                top2 = torch.topk(sim, 2, dim=-1).values.numpy()
                for t in range(top2.shape[0]):
                    log.add(f"block{i}/b{b}/src{t}/best-match", common.relative_gap(top2[t, 0], top2[t, 1]))
        n_in = m_eff
    min_margin = log.report(name)
    min_order_gap = order_log.report(name + " kept-order")
    min_size = min(float(rec[i]["size"].min()) for i in range(depth))
    print(f"[{name}] min size {min_size:.4g}")

    if not write:
        return min_margin, min_order_gap
    common.check_margin(name, min_margin)
    common.check_margin(name + " order", min_order_gap, ORDER_THRESHOLD)
    if not min_size > 0:
        raise SystemExit(f"[{name}] a merged size is {min_size} <= 0: change seed/noise")

    arrays = {f"param/{k}": v for k, v in state.items()}
    if u8 is not None:
        arrays["input_u8"] = u8
    else:
        arrays["input"] = x.numpy()
    arrays["logits"] = logits.numpy()
    for i in range(depth):
        arrays[f"block_out/{i}"] = rec[i]["out"].numpy()
        arrays[f"size/{i}"] = rec[i]["size"][..., 0].numpy()
    arrays["source"] = info["source"].numpy().astype(bool)
    arrays["prune_kept_num"] = np.array(prune, dtype=np.int64)
    arrays["merge_kept_num"] = np.array(merge, dtype=np.int64)
    arrays["tokens_per_layer"] = np.array(tokens_per_layer, dtype=np.int64)
    arrays["min_margin"] = np.array(min_margin, dtype=np.float64)
    arrays["min_order_gap"] = np.array(min_order_gap, dtype=np.float64)
    arrays["min_size"] = np.array(min_size, dtype=np.float64)

    cfg = dict(
        method="diffrate", case=name, img_size=case["img_size"], **base, in_chans=3, batch=BATCH,
        class_token=True, distilled=False, global_pool="token", qkv_bias=True, layer_norm_eps=1e-6,
        act="gelu_erf", num_patches=int(model.patch_embed.num_patches), tokens_in=n0,
        model_class="timm.models.vision_transformer.VisionTransformer",
        prune_kept_num=prune, merge_kept_num=merge, published=list(case.get("published", [])) or None,
        clamped=needs_clamp(n0, prune, merge),
        tokens_per_layer=tokens_per_layer,
        tokens_per_layer_meaning="sequence length after block i (CLS included) = min(N_in, prune[i], merge[i])",
        input_transform="input = (input_u8 / 255 - 0.5) * 0.5 in float32 numpy" if u8 is not None else None,
        reference_repo="OpenGVLab/DiffRate",
        reference_commit=common.git_commit_of(repo, DIFFRATE_COMMIT),
        reference_entry="DiffRate.patch.deit(model, trace_source=True); model.set_kept_num(prune, merge); "
                        "model(x, return_flop=False)",
        adaptations=["sys.modules['caformer'] stub (placeholder classes; CAFormer patch unused)",
                     "block.drop_path = nn.Identity() (timm 1.0 names it drop_path1/drop_path2; Identity here)"],
        noise_std=noise_std, seed=seed, init_seed=seed, noise_seed=seed + 1, input_seed=seed + 2,
        min_margin=min_margin, min_order_gap=min_order_gap, min_size=min_size,
        margin_definition="min relative gap at every prune/merge cut of the descending head-mean CLS attention, "
                          "and between each merged token's best and second-best cosine destination (float64)",
        generator="tools/goldens/make_diffrate.py", **common.versions(),
    )
    save(os.path.join(out_dir, f"{name}.npz"), arrays, cfg)
    print(f"[{name}] tokens_per_layer={tokens_per_layer} logits[0,:3]={logits[0, :3].tolist()}")
    return min_margin


def save(path: str, arrays: dict, cfg: dict) -> None:
    """common.save_golden's layout and dtypes (float32 arrays, int64 ints), except that a uint8 array stays
    uint8 (save_golden widens it to int64: 8x the bytes for the 224 px input)."""
    u8 = {k: v for k, v in arrays.items() if np.asarray(v).dtype == np.uint8}
    common.save_golden(path, {k: v for k, v in arrays.items() if k not in u8}, cfg)
    if u8:
        with np.load(path, allow_pickle=False) as g:
            out = {k: g[k] for k in g.files}
        np.savez_compressed(path, **out, **u8)
        print(f"rewrote {path} with uint8 {sorted(u8)} ({os.path.getsize(path) / 1e6:.3f} MB)")


def needs_clamp(n0: int, prune, merge) -> bool:
    """Whether any count exceeds the tokens it meets (prune > N_in or merge > prune): tokcomp's clamp=True."""
    n = n0
    for p, m in zip(prune, merge):
        if p > n or m > p:
            return True
        n = m
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--diffrate-repo", required=True, help="checkout of OpenGVLab/DiffRate")
    ap.add_argument("--out", default=os.path.join("tests", "goldens"))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--seed", type=int, default=None, help="override the per-case seed")
    ap.add_argument("--search", type=int, default=0, help="try this many seeds from --seed, write nothing")
    args = ap.parse_args()
    install_stubs()
    common.add_repo_to_path(args.diffrate_repo)
    for name in args.cases:
        if args.search:
            start = CASES[name]["seed"] if args.seed is None else args.seed
            for s in range(start, start + args.search):
                margin, order = run_case(name, CASES[name], args.diffrate_repo, args.out, s, False)
                ok = margin > common.MARGIN_THRESHOLD and order > ORDER_THRESHOLD
                print(f"[{name}] seed {s}: margin {margin:.3g} order {order:.3g}{' ok' if ok else ''}")
            continue
        run_case(name, CASES[name], args.diffrate_repo, args.out, args.seed)


if __name__ == "__main__":
    main()

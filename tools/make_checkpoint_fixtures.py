"""Tiny checkpoint fixtures for tokcomp's checkpoint converters (timm and big_vision/AugReg layouts).

Runs timm 1.0.31 only (no method reference): ``timm.models.vision_transformer.VisionTransformer``,
``timm.models.deit.VisionTransformerDistilled`` and, to prove the big_vision layout,
``timm.models.vision_transformer._load_weights``. Each model is built with timm's own init (fixed
seed), then every trainable parameter gets N(0, 0.02) noise (fixed seed) so biases, LayerNorm
affine parameters, cls/reg tokens and position embeddings are all non-trivial. Eval mode,
torch.no_grad, float32, CPU.

Shared config: img 32, patch 8 (4x4 = 16 patches), embed 64, 2 heads, depth 2, mlp_ratio 2
(not 4, to keep all fixtures together near 3 MB; the MLP hidden size is 128), 5 classes.

Outputs in tests/fixtures/checkpoints/:
  timm_vit_cls         VisionTransformer, class token, global_pool='token'
  timm_vit_gap         VisionTransformer, class_token=False, global_pool='avg' (fc_norm=None -> timm
                       turns fc_norm on: `norm` is Identity, `fc_norm` is the LayerNorm applied after
                       mean pooling; features = forward_features output is therefore UN-normalised)
  timm_deit_distilled  VisionTransformerDistilled (CLS + dist token; eval logits = (head(x[:,0]) +
                       head_dist(x[:,1])) / 2)
  timm_vit_reg4        VisionTransformer, reg_tokens=4, class token, no_embed_class=True,
                       global_pool='token' (pos_embed covers the 16 patches only; sequence order
                       [cls, reg0..reg3, patches]; pos added to patches before the concat)
  for each: <name>.safetensors (safetensors.torch.save_file of the state dict),
            <name>.npz (np.savez, state-dict key -> float32 array, torch layouts),
            <name>.io.npz (input [2,3,32,32] NCHW, logits [2,5], features [2,N,64], config JSON).
  bigvision_vit_cls    big_vision/AugReg ``.npz`` layout of a class-token/token-pool timm ViT
                       (keys embedding/kernel [kh,kw,in,out], cls, Transformer/posembed_input/
                       pos_embedding, Transformer/encoderblock_{i}/..., Transformer/encoder_norm, head)
                       + bigvision_vit_cls.io.npz. Verified by loading it with timm's own
                       ``_load_weights`` into a differently-seeded model: identical state dict and
                       bit-identical logits/features.
  bigvision_vit_gap    same layout for a GAP model (class_token=False, global_pool='avg',
                       fc_norm=False: encoder_norm over all tokens, then mean -- big_vision's 'gap'
                       head). timm's _load_weights cannot fill an fc_norm LayerNorm (it only loads
                       `norm` from encoder_norm), so the fc_norm=True variant is NOT representable;
                       the script checks and prints that.

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/make_checkpoint_fixtures.py --out tests/fixtures/checkpoints
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens"))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402

NOISE_STD = 0.02
BATCH = 2
BASE = dict(img_size=32, patch_size=8, in_chans=3, num_classes=5, embed_dim=64, depth=2, num_heads=2,
            mlp_ratio=2.0, qkv_bias=True)

MODELS = {
    "timm_vit_cls": dict(cls="VisionTransformer", kwargs=dict(class_token=True, global_pool="token"), seed=1000),
    "timm_vit_gap": dict(cls="VisionTransformer", kwargs=dict(class_token=False, global_pool="avg"), seed=1010),
    "timm_deit_distilled": dict(cls="VisionTransformerDistilled", kwargs=dict(class_token=True, global_pool="token"),
                                seed=1020),
    "timm_vit_reg4": dict(cls="VisionTransformer",
                          kwargs=dict(class_token=True, reg_tokens=4, no_embed_class=True, global_pool="token"),
                          seed=1030),
}
BIGVISION = {
    "bigvision_vit_cls": dict(cls="VisionTransformer", kwargs=dict(class_token=True, global_pool="token"),
                              seed=1040),
    "bigvision_vit_gap": dict(cls="VisionTransformer",
                              kwargs=dict(class_token=False, global_pool="avg", fc_norm=False), seed=1050),
}


def model_class(name: str):
    import timm.models.vision_transformer as vt
    from timm.models.deit import VisionTransformerDistilled

    return {"VisionTransformer": vt.VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}[name]


def build(spec: dict, seed: int, perturb: bool = True):
    common.set_deterministic(seed)
    model = model_class(spec["cls"])(**BASE, **spec["kwargs"])
    if perturb:
        common.perturb_parameters(model, NOISE_STD, seed + 1)
    return model.eval()


def model_facts(model) -> dict:
    import torch.nn as nn

    n_patches = int(model.patch_embed.num_patches)
    return dict(
        num_patches=n_patches,
        num_prefix_tokens=int(model.num_prefix_tokens),
        seq_len=n_patches + int(model.num_prefix_tokens),
        has_cls_token=model.cls_token is not None,
        has_dist_token=getattr(model, "dist_token", None) is not None,
        num_reg_tokens=0 if getattr(model, "reg_token", None) is None else int(model.reg_token.shape[1]),
        no_embed_class=bool(model.no_embed_class),
        pos_embed_shape=list(model.pos_embed.shape),
        pos_embed_covers_prefix=int(model.pos_embed.shape[1]) != n_patches,
        token_order="[cls?, dist?, reg*, patches (row-major)]",
        norm_is_identity=isinstance(model.norm, nn.Identity),
        fc_norm_is_layernorm=isinstance(model.fc_norm, nn.LayerNorm),
        layer_norm_eps=1e-6,
        act="gelu_erf",
        mlp_hidden=int(model.blocks[0].mlp.fc1.out_features),
        global_pool=model.global_pool,
        state_dict_keys=list(model.state_dict().keys()),
    )


def run_io(model, seed: int):
    x = common.make_inputs(BATCH, BASE["img_size"], seed)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
        logits2 = model.forward_head(feats)
    assert torch.equal(logits, logits2)
    return x, feats, logits


def make_config(name: str, spec: dict, model, seed: int, extra: dict = None) -> dict:
    cfg = dict(
        name=name,
        model_class=("timm.models.deit.VisionTransformerDistilled" if spec["cls"] == "VisionTransformerDistilled"
                     else "timm.models.vision_transformer.VisionTransformer"),
        constructor_kwargs={**BASE, **spec["kwargs"]},
        **model_facts(model),
        noise_std=NOISE_STD, init_seed=seed, noise_seed=seed + 1, input_seed=seed + 2,
        input_distribution="standard normal",
        features_meaning="model.forward_features(x): after blocks and `norm` (Identity when fc_norm is on)",
        logits_meaning=("model(x) in eval mode"
                        + ("; (head(x[:,0]) + head_dist(x[:,1])) / 2" if spec["cls"] == "VisionTransformerDistilled"
                           else "")),
        generator="tools/make_checkpoint_fixtures.py",
        **common.versions(),
    )
    if extra:
        cfg.update(extra)
    return cfg


def write_timm_checkpoint(name: str, spec: dict, out: str) -> None:
    from safetensors.torch import save_file

    seed = spec["seed"]
    model = build(spec, seed)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, f"{name}.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(out, f"{name}.safetensors"), 0o644)  # safetensors writes 0600
    np.savez(os.path.join(out, f"{name}.npz"), **{k: v.numpy().astype(np.float32) for k, v in sd.items()})
    x, feats, logits = run_io(model, seed + 2)
    extra = {}
    if name == "timm_vit_gap":
        extra["fc_norm_note"] = ("global_pool='avg' with fc_norm=None: timm sets use_fc_norm=True, so `norm` is "
                                 "Identity (no norm.* keys) and fc_norm (LayerNorm eps 1e-6) is applied to the "
                                 "mean over all tokens (no prefix tokens here) before the head")
    if name == "timm_vit_reg4":
        extra["reg_note"] = ("no_embed_class=True: x = patches + pos_embed[1,16,D]; then concat [cls, reg0..3, x]; "
                             "cls and reg tokens get NO position embedding; token pooling reads x[:,0]")
    cfg = make_config(name, spec, model, seed, extra)
    common.save_golden(os.path.join(out, f"{name}.io.npz"),
                       {"input": x.numpy(), "logits": logits.numpy(), "features": feats.numpy()}, cfg)
    # round-trip checks of the two weight files
    from safetensors.torch import load_file

    fresh = build(spec, seed + 100)
    fresh.load_state_dict(load_file(os.path.join(out, f"{name}.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)
    npz = np.load(os.path.join(out, f"{name}.npz"))
    fresh.load_state_dict({k: torch.from_numpy(npz[k]) for k in npz.files})
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)
    print(f"[{name}] seq_len={cfg['seq_len']} prefix={cfg['num_prefix_tokens']} pos_embed={cfg['pos_embed_shape']} "
          f"fc_norm={cfg['fc_norm_is_layernorm']} norm_identity={cfg['norm_is_identity']} round-trips OK")


def to_bigvision(model) -> dict:
    """timm ViT state -> big_vision/AugReg npz layout (no prefix, 'Transformer/posembed_input' variant)."""
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    hd = d // h
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # [out,in,kh,kw] -> [kh,kw,in,out]
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],  # [1, N, D]
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,  # [D, C]
        "head/bias": sd["head.bias"],
    }
    if "cls_token" in sd:
        w["cls"] = sd["cls_token"]  # [1, 1, D]
    for i in range(len(model.blocks)):
        p, bp = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[bp + "LayerNorm_0/scale"] = sd[p + "norm1.weight"]
        w[bp + "LayerNorm_0/bias"] = sd[p + "norm1.bias"]
        qkv_w, qkv_b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[bp + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, hd)
            w[bp + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, hd)
        w[bp + "MultiHeadDotProductAttention_1/out/kernel"] = sd[p + "attn.proj.weight"].T.reshape(h, hd, d)
        w[bp + "MultiHeadDotProductAttention_1/out/bias"] = sd[p + "attn.proj.bias"]
        w[bp + "LayerNorm_2/scale"] = sd[p + "norm2.weight"]
        w[bp + "LayerNorm_2/bias"] = sd[p + "norm2.bias"]
        for r in range(2):
            w[bp + f"MlpBlock_3/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            w[bp + f"MlpBlock_3/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


def write_bigvision(name: str, spec: dict, out: str) -> None:
    from timm.models.vision_transformer import _load_weights

    seed = spec["seed"]
    model = build(spec, seed)
    path = os.path.join(out, f"{name}.npz")
    w = to_bigvision(model)
    np.savez(path, **w)
    x, feats, logits = run_io(model, seed + 2)

    # proof: timm's own loader reproduces the model exactly
    fresh = build(spec, seed + 100)
    with torch.no_grad():
        _load_weights(fresh, path)
    fresh.eval()
    ref_sd, new_sd = model.state_dict(), fresh.state_dict()
    assert ref_sd.keys() == new_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], new_sd[k]), k
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)
        assert torch.equal(fresh.forward_features(x), feats)

    extra = dict(
        bigvision_layout=True,
        bigvision_keys={k: list(v.shape) for k, v in w.items()},
        verified_with="timm.models.vision_transformer._load_weights(fresh_model, path): identical state dict, "
                      "bit-identical logits and features",
        bigvision_to_timm=("embedding/kernel [kh,kw,in,out] -> proj.weight [out,in,kh,kw] (transpose 3,2,0,1); "
                           "{query,key,value}/kernel [D,H,hd] -> flatten(1).T stacked q;k;v into qkv.weight; "
                           "bias [H,hd] -> flatten; out/kernel [H,hd,D] -> reshape [H*hd,D].T = proj.weight; "
                           "Dense/head kernels [in,out] -> .T; LayerNorm scale->weight"),
    )
    if spec["kwargs"].get("global_pool") == "avg":
        # does timm's loader handle the fc_norm (default) GAP variant? (it does not load fc_norm)
        alt_spec = dict(cls="VisionTransformer", kwargs=dict(class_token=False, global_pool="avg"))
        alt = build(alt_spec, seed + 200)
        before = {k: v.clone() for k, v in alt.state_dict().items() if k.startswith("fc_norm")}
        with torch.no_grad():
            _load_weights(alt, path)
        untouched = all(torch.equal(before[k], alt.state_dict()[k]) for k in before)
        print(f"[{name}] fc_norm=True GAP model: _load_weights leaves fc_norm untouched = {untouched}")
        extra["fc_norm_note"] = ("built with fc_norm=False: encoder_norm normalises all tokens, then the mean is "
                                 "taken (big_vision 'gap'). timm's _load_weights never loads fc_norm (untouched="
                                 f"{untouched}), so the default fc_norm=True GAP model is not representable "
                                 "in this layout")
    cfg = make_config(name, spec, model, seed, extra)
    common.save_golden(os.path.join(out, f"{name}.io.npz"),
                       {"input": x.numpy(), "logits": logits.numpy(), "features": feats.numpy()}, cfg)
    print(f"[{name}] {len(w)} big_vision arrays, verified with timm _load_weights")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "checkpoints"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, spec in MODELS.items():
        write_timm_checkpoint(name, spec, args.out)
    for name, spec in BIGVISION.items():
        write_bigvision(name, spec, args.out)
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"total size of {args.out}: {total / 1e6:.3f} MB")


if __name__ == "__main__":
    main()

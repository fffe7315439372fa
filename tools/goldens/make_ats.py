"""Golden fixtures for ATS (adaptive token sampling, Fayyaz et al., ECCV 2022, arXiv:2111.15667).

Reference: adaptivetokensampling/ATS, commit 9271257adc7ea9695c2ccd75e25e3a86432fd65a (Apache-2.0; run only,
nothing of it is copied into tokcomp). What runs: ``libs.models.transformers.vit.ViT`` (the repo's own ViT with
timm/DeiT state-dict key names) with its ``ATSBlock`` / ``AdaptiveTokenSampler`` in the listed blocks and
``transformer_block.Block`` elsewhere, eval mode, torch.no_grad, float32, CPU, DROP_TOKENS=False (the
repo's default in libs/config/defaults.py: static length with a policy mask, as tokcomp). NUM_TOKENS is the
full token count in every block: the official code only runs with K >= N (a smaller K fails a tensor
expand in ``inverse_transform_sampling``) and always places n_ref - 1 sample points (n_ref = initial tokens).
The model gets the reference's own init (constructor: trunc_normal + ``_init_weights``), then every
trainable parameter gets N(0, NOISE_STD) noise with a fixed seed.

Adaptations (run time only; the checkout is not edited):
  * ``libs/__init__.py`` (``setup_environment``) and ``libs/models/__init__.py`` (imports ``build.py``, which
    needs fvcore) are bypassed: ``libs`` and ``libs.models`` are put into ``sys.modules`` as bare packages
    pointing at the checkout, and ``libs.models.build`` as a stub whose ``MODEL_REGISTRY.register()`` is the
    identity decorator. ``libs.models.transformers`` then imports unchanged.
  * Observation only: ``AdaptiveTokenSampler.create_ys`` / ``get_unique_indices`` (static methods) and
    ``inverse_transform_sampling`` are wrapped to record their inputs and outputs; the wrapped functions run
    unchanged. Block outputs come from forward hooks (``with_kwargs=True``: the ViT calls blocks by keyword).
  * The ``blocks.<i>.attn.out_zero_mask`` entries (an all-zero, requires_grad=False buffer-like parameter used
    only with DROP_TOKENS=True) are left out of ``param/``.
  * vit.py's ``@register_model`` re-registers a few timm names in this process (timm warns); harmless.

Cases (tiny ViT: patch 8, embed 96, 3 heads, depth 4, mlp_ratio 4, 10 classes, batch 3):
  ats_cls50  56 px (49 patches + CLS), ATS in blocks 1, 2, 3
  ats_cls37  48 px (36 patches + CLS), ATS in blocks 0, 1, 2, 3 (block 0: every slot valid)
  ats_cls26  40 px (25 patches + CLS), ATS in block 3 (the reference placement 3..depth-1)

Saved per case (tests/goldens/<case>.npz): param/<state_dict key>, input [B,3,H,W], logits [B,10],
block_out/<i> [B,N,96] (reference slot order; invalid slots are zero), policy/<i> [B,N] bool (valid slots after
block i), token_ids/<i> [B,N] int (original token id held by each slot after block i, -1 if invalid; id 0 is
CLS, id 1 + r*w + c the patch at row r, column c), and for every ATS block i: significance/<i> [B,N-1] (the
normalised significance of the non-CLS slots entering block i, in their slot order), valid_in/<i> [B,N-1],
picked/<i> [B,N-1] bool (the non-CLS slots entering block i that the sampler keeps), num_samples/<i> (0-d,
= n_ref - 1); min_margin, min_sample_gap, min_sort_gap (0-d float64), config (JSON string).

Margins: sample gap = min over sample points of (second-nearest - nearest) |y - c'| on the normalised CDF
(range [0, 1]); sort gap = min relative gap between adjacent sorted positive significances of which exactly one
is picked (swapping such a pair would change the picked token). min_margin = min of the two; must be > 1e-4.

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_ats.py --ats-repo /work/refs/ATS --out tests/goldens
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

common.register_torchvision_nms_stub()

import torch  # noqa: E402

ATS_COMMIT = "9271257adc7ea9695c2ccd75e25e3a86432fd65a"
NOISE_STD = 0.1
BATCH = 3
BASE = dict(patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=10)

CASES = {
    "ats_cls50": dict(img_size=56, ats_blocks=[1, 2, 3], seed=239),
    "ats_cls37": dict(img_size=48, ats_blocks=[0, 1, 2, 3], seed=312),
    "ats_cls26": dict(img_size=40, ats_blocks=[3], seed=400),
}


def install_stubs(repo: str) -> None:
    for name, sub in (("libs", "libs"), ("libs.models", os.path.join("libs", "models"))):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(repo, sub)]
            sys.modules[name] = pkg
    if "libs.models.build" not in sys.modules:
        build = types.ModuleType("libs.models.build")

        class _Registry:
            def register(self):
                return lambda obj: obj

        build.MODEL_REGISTRY = _Registry()
        sys.modules["libs.models.build"] = build


class Recorder:
    """Wraps the sampler's static helpers and sampling method to record what they see (behaviour unchanged)."""

    def __init__(self, sampler_cls):
        self.calls = []
        cls = sampler_cls
        orig_ys, orig_unique, orig_its = cls.create_ys, cls.get_unique_indices, cls.inverse_transform_sampling
        rec = self

        def create_ys(normalized_cdf, n_tokens):
            ys = orig_ys(normalized_cdf, n_tokens)
            rec.calls[-1].update(normalized_cdf=normalized_cdf.clone(), ys=ys.clone())
            return ys

        def get_unique_indices(indices, max_value):
            out = orig_unique(indices, max_value)
            rec.calls[-1].update(picks=indices.clone(), unique=out.clone())
            return out

        def inverse_transform_sampling(self, sorted_scores, sorted_indices, attn, n_tokens, raw_x, n_ref_tokens):
            rec.calls.append(dict(sorted_scores=sorted_scores.clone(), sorted_indices=sorted_indices.clone(),
                                  n_tokens=n_tokens, n_ref_tokens=n_ref_tokens, n_in=raw_x.shape[1]))
            return orig_its(self, sorted_scores, sorted_indices, attn, n_tokens, raw_x, n_ref_tokens)

        cls.create_ys = staticmethod(create_ys)
        cls.get_unique_indices = staticmethod(get_unique_indices)
        cls.inverse_transform_sampling = inverse_transform_sampling


_RECORDER = None


def build_model(atsvit, case):
    vit_cfg = types.SimpleNamespace(
        IMG_SIZE=case["img_size"], PATCH_SIZE=BASE["patch_size"], IN_CHANNELS=3, NUM_CLASSES=BASE["num_classes"],
        EMBED_DIM=BASE["embed_dim"], DEPTH=BASE["depth"], NUM_HEADS=BASE["num_heads"], MLP_RATIO=BASE["mlp_ratio"],
        QKV_BIAS=True, QK_SCALE=None, REPRESENTATION_SIZE=None, DROP_RATE=0.0, ATTN_DROP_RATE=0.0,
        DROP_PATH_RATE=0.0, HYBRID_BACKBONE=None, NORM_LAYER=None, ATS_BLOCKS=list(case["ats_blocks"]),
        NUM_TOKENS=[(case["img_size"] // BASE["patch_size"]) ** 2 + 1] * BASE["depth"], DROP_TOKENS=False)
    return atsvit.ViT(types.SimpleNamespace(VIT=vit_cfg)), vit_cfg


def sample_gaps(cdf: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Per sample point: second-nearest minus nearest |y - c| (float64)."""
    d = np.sort(np.abs(ys[:, None].astype(np.float64) - cdf[None, :].astype(np.float64)), axis=1)
    return d[:, 1] - d[:, 0]


def run_case(name: str, case: dict, ats_repo: str, out_dir: str, seed_override=None, write=True) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from libs.models.transformers import ats_block, vit as atsvit
    seed = case["seed"] if seed_override is None else seed_override
    common.set_deterministic(seed)
    model, vit_cfg = build_model(atsvit, case)
    common.perturb_parameters(model, NOISE_STD, seed + 1)
    model.eval()
    x = common.make_inputs(BATCH, case["img_size"], seed + 2)
    depth = len(model.blocks)
    n0 = model.patch_embed.num_patches + 1

    global _RECORDER
    if _RECORDER is None:  # wrap once per process
        _RECORDER = Recorder(ats_block.AdaptiveTokenSampler)
    recorder = _RECORDER
    recorder.calls.clear()
    outs = {}
    hooks = [blk.register_forward_hook(
        lambda mod, args, kwargs, out, i=i: outs.__setitem__(i, out), with_kwargs=True)
        for i, blk in enumerate(model.blocks)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.range deprecation inside create_ys
        with torch.no_grad():
            logits, _ = model(x)
    for h in hooks:
        h.remove()
    assert len(recorder.calls) == len(case["ats_blocks"])

    arrays = {f"param/{k}": v for k, v in common.state_dict_arrays(model).items() if not k.endswith("out_zero_mask")}
    arrays["input"] = x.numpy()
    arrays["logits"] = logits.numpy()
    ids = np.broadcast_to(np.arange(n0), (BATCH, n0)).copy()
    policy = np.ones((BATCH, n0), bool)
    sample_log, sort_log = common.MarginLog(), common.MarginLog()
    valid_counts = []
    calls = iter(recorder.calls)
    for i in range(depth):
        out = outs[i]
        if i in case["ats_blocks"]:
            c = next(calls)
            xo, pol = out
            pol = pol[..., 0].numpy() > 0.5
            sorted_idx = c["sorted_indices"].numpy()
            sorted_scores = c["sorted_scores"].numpy()
            cdf, ys = c["normalized_cdf"].numpy(), c["ys"].numpy()
            unique = c["unique"].numpy()[:, : n0 - 1]
            m = n0 - 1
            assert c["n_in"] == n0 and c["n_ref_tokens"] == n0 and ys.shape == (BATCH, m)
            significance = np.zeros((BATCH, m), np.float32)
            picked = np.zeros((BATCH, m), bool)
            new_ids = np.full((BATCH, n0), -1)
            new_ids[:, 0] = ids[:, 0]
            for b in range(BATCH):
                significance[b, sorted_idx[b]] = sorted_scores[b]
                u = unique[b][unique[b] < m]
                picked[b, sorted_idx[b, u]] = True
                new_ids[b, 1:1 + len(u)] = ids[b, 1:][sorted_idx[b, u]]
                # the documented rule reproduces the reference's picks from its own CDF and points
                nearest = np.argmin(np.abs(ys[b][:, None] - cdf[b][None, :]), axis=1)
                assert set(nearest.tolist()) == set(u.tolist()), (name, i, b)
                for j, g in enumerate(sample_gaps(cdf[b], ys[b])):
                    sample_log.add(f"block{i}/b{b}/y{j}", g)
                chosen = np.zeros(m, bool)
                chosen[u] = True
                for j in range(m - 1):
                    lo, hi = float(sorted_scores[b, j]), float(sorted_scores[b, j + 1])
                    if lo > 0 and chosen[j] != chosen[j + 1]:
                        sort_log.add(f"block{i}/b{b}/sort{j}", common.relative_gap(hi, lo))
            assert (pol == (new_ids >= 0)).all(), (name, i)
            assert not (picked & ~policy[:, 1:]).any(), (name, i)  # only valid slots are sampled
            arrays[f"significance/{i}"] = significance
            arrays[f"valid_in/{i}"] = policy[:, 1:]
            arrays[f"picked/{i}"] = picked
            arrays[f"num_samples/{i}"] = np.array(ys.shape[1], np.int64)
            ids, policy = new_ids, pol
        else:
            xo = out
        arrays[f"block_out/{i}"] = xo.numpy()
        arrays[f"policy/{i}"] = policy.copy()
        arrays[f"token_ids/{i}"] = ids.copy()
        valid_counts.append(policy.sum(1).tolist())
        assert np.all(np.abs(xo.numpy()[~policy]) == 0), "reference invalid slots are not zero"

    min_sample_gap = sample_log.report(name + " sample-gap")
    min_sort_gap = sort_log.report(name + " sort-gap")
    min_margin = min(min_sample_gap, min_sort_gap)
    arrays["min_margin"] = np.array(min_margin, np.float64)
    arrays["min_sample_gap"] = np.array(min_sample_gap, np.float64)
    arrays["min_sort_gap"] = np.array(min_sort_gap, np.float64)

    cfg = dict(
        method="ats", case=name, img_size=case["img_size"], **BASE, in_chans=3, batch=BATCH,
        class_token=True, distilled=False, global_pool="token", qkv_bias=True, layer_norm_eps=1e-6,
        act="gelu_erf", num_patches=n0 - 1, tokens_in=n0, model_class="libs.models.transformers.vit.ViT",
        ats_blocks=list(case["ats_blocks"]), num_tokens=list(vit_cfg.NUM_TOKENS), drop_tokens=False,
        num_samples=n0 - 1, valid_tokens_per_layer=valid_counts,
        valid_tokens_meaning="valid slots (CLS included) after each block, per sample",
        reference_repo="adaptivetokensampling/ATS", reference_commit=common.git_commit_of(ats_repo, ATS_COMMIT),
        reference_entry="libs.models.transformers.vit.ViT(cfg); model(x) -> (logits, policies)",
        stubs=["sys.modules['libs'], ['libs.models'] bare packages (skip setup_environment / fvcore build.py)",
               "sys.modules['libs.models.build'] stub with an identity MODEL_REGISTRY.register()",
               "observation wrappers on create_ys, get_unique_indices, inverse_transform_sampling"],
        dropped_params=["blocks.<i>.attn.out_zero_mask (zeros; only used with DROP_TOKENS=True)"],
        noise_std=NOISE_STD, seed=seed, init_seed=seed, noise_seed=seed + 1, input_seed=seed + 2,
        input_distribution="standard normal", min_margin=min_margin, min_sample_gap=min_sample_gap,
        min_sort_gap=min_sort_gap,
        margin_definition="min of: second-nearest minus nearest |y - c'| over all sample points (normalised CDF "
                          "scale); relative gap of adjacent sorted positive significances with exactly one picked",
        generator="tools/goldens/make_ats.py", **common.versions(),
    )
    print(f"[{name}] seed={seed} valid after each block={valid_counts} logits[0,:3]={logits[0, :3].tolist()}")
    if write:
        common.check_margin(name, min_margin)
        common.save_golden(os.path.join(out_dir, f"{name}.npz"), arrays, cfg)
    return min_margin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ats-repo", required=True, help="checkout of adaptivetokensampling/ATS")
    ap.add_argument("--out", default=os.path.join("tests", "goldens"))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--seed", type=int, default=None, help="override the per-case seed")
    ap.add_argument("--find-seed", type=int, default=0,
                    help="try this many seeds from the case seed (or --seed) and print the margins; writes nothing")
    args = ap.parse_args()
    common.add_repo_to_path(args.ats_repo)
    install_stubs(os.path.abspath(args.ats_repo))
    for name in args.cases:
        if args.find_seed:
            start = CASES[name]["seed"] if args.seed is None else args.seed
            for s in range(start, start + args.find_seed):
                m = run_case(name, CASES[name], args.ats_repo, args.out, s, write=False)
                print(f"FIND {name} seed={s} margin={m:.3g}{'  OK' if m > common.MARGIN_THRESHOLD else ''}")
        else:
            run_case(name, CASES[name], args.ats_repo, args.out, args.seed)


if __name__ == "__main__":
    main()

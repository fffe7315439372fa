"""Golden fixtures for DivPrune (greedy max-min diversity on cosine distance), pre-LLM.

References (run only, nothing copied into tokcomp):
  * vbdi/divprune, commit 799e2d950aa01ba7860907f5a6d86061f885dca6 (CC BY-NC 4.0): ``LLaVA/llava/model/
    llava_arch.py: LlavaMetaForCausalLM.DivPrune`` with ``pairwise_cosine_similarity`` (methods that use nothing
    of `self` but the latter).
  * ModelTC/llmc, commit 05eedff08c58ce5a3a4e2e879133bc922dff6ff5 (Apache-2.0): ``llmc/compression/
    token_reduction/divprune.py: divprune`` with ``pairwise_cosine_similarity`` (module-level functions).
Both are executed on their own from the checkout's source (vlm_common.load_functions: only those function
definitions run, in a namespace holding torch), because the surrounding modules import the whole of LLaVA or
llmc. Nothing in the reference files is edited. Both must give the same selection; the fixture stores it.

Inputs: the patch features of vlm_common.tower_arrays (hidden [B, 1 + h w, D] ~ N(0, 1); the reference gets
hidden[b, 1:], one sample at a time, as it runs at batch 1). threshold_ratio = keep / n for a count, the
fraction otherwise; the reference's count is int(round(ratio * n)).
Cases (B = 3):
  divprune_g7      7x7 patches, D 32, keep 12 of 49
  divprune_llava   24x24 patches, D 32, ratio 0.098 (the paper's default: 56 of 576)
Saved: x [B, N, D] (CLS first), picks [B, k] (the reference's selection order), kept [B, k] (sorted, as the
reference keeps them), min_margin (smallest relative gap between the best and the second best candidate
score over all greedy steps, recomputed in float64), config.

Command (repo root, the torch venv):
  /work/venv-torch/bin/python tools/goldens/make_divprune.py --divprune /work/refs/divprune --llmc /work/refs/llmc \
      --out tests/goldens
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

DIVPRUNE_COMMIT = "799e2d950aa01ba7860907f5a6d86061f885dca6"
LLMC_COMMIT = "05eedff08c58ce5a3a4e2e879133bc922dff6ff5"
BATCH = 3
CASES = {
    "divprune_g7": dict(grid=(7, 7), dim=32, keep=12, seed=11),
    "divprune_llava": dict(grid=(24, 24), dim=32, keep=0.098, seed=12),
}


def references(divprune_repo, llmc_repo):
    ns = {"torch": torch}
    official = vlm_common.load_functions(
        os.path.join(divprune_repo, "LLaVA/llava/model/llava_arch.py"),
        ["LlavaMetaForCausalLM.DivPrune", "LlavaMetaForCausalLM.pairwise_cosine_similarity"], dict(ns))
    this = types.SimpleNamespace()
    this.pairwise_cosine_similarity = lambda m: official["LlavaMetaForCausalLM.pairwise_cosine_similarity"](this, m)
    llmc = vlm_common.load_functions(
        os.path.join(llmc_repo, "llmc/compression/token_reduction/divprune.py"),
        ["divprune", "pairwise_cosine_similarity"], dict(ns))

    def run_official(f, ratio):
        return official["LlavaMetaForCausalLM.DivPrune"](this, f, f.shape[0], None, threshold_ratio=ratio)[0]

    def run_llmc(f, ratio):
        return llmc["divprune"](f, f.shape[0], None, threshold_ratio=ratio)[0]

    return run_official, run_llmc


def margin(f: np.ndarray, picks: np.ndarray) -> float:
    """Smallest relative best-vs-second gap of the greedy scores along the given picks (float64)."""
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    d = 1.0 - f @ f.T
    n = d.shape[0]
    gaps = []
    score = np.where(np.eye(n, dtype=bool), np.inf, d).min(0)
    for t, j in enumerate(picks):
        if t:
            score = np.minimum(score, d[picks[t - 1]]) if t > 1 else d[picks[0]].copy()
        s = score.copy()
        s[picks[:t]] = -np.inf
        order = np.argsort(-s)
        assert order[0] == j, (t, order[0], j)
        gaps.append((s[order[0]] - s[order[1]]) / max(abs(s[order[0]]), abs(s[order[1]]), 1e-30))
    return float(min(gaps))


def run_case(name, case, run_official, run_llmc, out_dir):
    common.set_deterministic(case["seed"])
    hidden, _, _ = vlm_common.tower_arrays(case["seed"], BATCH, case["grid"], case["dim"], 1, 4)
    n = case["grid"][0] * case["grid"][1]
    ratio = case["keep"] / n if isinstance(case["keep"], int) else case["keep"]
    picks, m = [], np.inf
    with torch.no_grad():
        for b in range(BATCH):
            f = hidden[b, 1:].clone()
            p = run_official(f, ratio).numpy()
            np.testing.assert_array_equal(p, run_llmc(f, ratio).numpy())
            picks.append(p)
            m = min(m, margin(f.double().numpy(), p))
    picks = np.stack(picks)
    assert len(set(picks[0].tolist())) == picks.shape[1]
    print(f"[{name}] picks {picks.shape}, min margin {m:.3g}")
    common.check_margin(name, m)
    cfg = dict(case, batch=BATCH, ratio=ratio, repo="vbdi/divprune", commit=DIVPRUNE_COMMIT,
               also="ModelTC/llmc@" + LLMC_COMMIT, torch_version=torch.__version__, numpy_version=np.__version__)
    common.save_golden(os.path.join(out_dir, name + ".npz"), dict(
        x=hidden.numpy(), picks=picks, kept=np.sort(picks, axis=1), min_margin=np.float64(m)), cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--divprune", default="/work/refs/divprune")
    ap.add_argument("--llmc", default="/work/refs/llmc")
    ap.add_argument("--out", default="tests/goldens")
    a = ap.parse_args()
    run_official, run_llmc = references(a.divprune, a.llmc)
    for name, case in CASES.items():
        run_case(name, case, run_official, run_llmc, a.out)


if __name__ == "__main__":
    main()

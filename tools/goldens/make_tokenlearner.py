"""Golden fixtures for TokenLearner v1.1, v1 and TokenFuser (Ryoo et al., NeurIPS 2021, arXiv:2106.11297).

Reference: google-research/scenic, commit 4a38d475ee89cb821078c0e2bf2065ee030e1535 (Apache-2.0; run only, nothing
of it is copied into tokcomp), `scenic/projects/token_learner/model.py`: `TokenLearnerModuleV11`,
`TokenLearnerModule` (v1) and `TokenFuser`.
scenic is JAX/Flax, so this runs in tokcomp's own venv (/work/main/.venv: jax 0.10.2, flax 0.12.8, absl-py,
ml_collections); the modules get their own flax init with a fixed key, then every parameter gets N(0, NOISE_STD)
noise with a fixed seed (the fuser's token-mixing Dense is zero-initialised: the noise makes it non-trivial).
float32, CPU, deterministic=True (inference: dropout is the identity).

Adaptations (run time only; the checkout is not edited): model.py imports scenic's base models, its ViT baseline
(which imports tensorflow and scipy) and ViViT, none of which these modules use. `sys.modules` stubs stand in
for `scenic.model_lib.base_models{,.base_model,.classification_model,.multilabel_classification_model}`,
`scenic.projects.baselines.vit` and `scenic.projects.vivit{,.model,.model_utils}` (empty modules, except the
names model.py reads at import time: the base classes it subclasses are empty classes, and the annotation
`base_model.MetricFn` is `object`). `scenic.model_lib.layers.attention_layers` and
`nn_layers` (the MlpBlock the modules use) are the real ones.

Cases (batch 3, odd token counts):
  tokenlearner_v11_n49   X [3, 49, 32] (a 7x7 grid), S = 5, bottleneck 64 (the default), seed 700
  tokenlearner_v11_n45   X [3, 45, 24], S = 7, bottleneck 16, seed 701
  tokenlearner_fuser_n49 Y [3, 5, 32] (learned), X [3, 49, 32] (original), bottleneck 64, seed 702
  tokenlearner_fuser_n37 Y [3, 7, 24], X [3, 37, 24], bottleneck 16, use_normalization False, seed 703
  tokenlearner_v1_n49    X [3, 49, 32] (7x7), S = 5, use_sum_pooling True (the default), seed 704
  tokenlearner_v1_n25    X [3, 25, 24] (5x5), S = 7, use_sum_pooling False (mean), seed 705

Saved (tests/goldens/<case>.npz): param/<flax path joined by '/'> (the reference's own names), inputs
(`x`; the fuser also `original`), `out` (the reference module's output), for the learner also `weights`
[B, S, N] (its softmax map, recomputed from the same parameters with the reference's own submodules; for v1
the sigmoid of the reference's last conv output, captured with flax's capture_intermediates), the
minimum relative gap between the largest and second-largest weight of each patch over the S tokens
(`min_margin`: the argmax that tokcomp's `index` uses), config (JSON string).

Command (from the repo root; --case NAME makes one case only):
  .venv/bin/python tools/goldens/make_tokenlearner.py --repo /work/refs/scenic --out tests/goldens
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COMMIT = "4a38d475ee89cb821078c0e2bf2065ee030e1535"
NOISE_STD = 0.3
BATCH = 3
CASES = {
    "tokenlearner_v11_n49": dict(kind="learner", n=49, c=32, tokens=5, bottleneck=64, seed=700),
    "tokenlearner_v11_n45": dict(kind="learner", n=45, c=24, tokens=7, bottleneck=16, seed=701),
    "tokenlearner_fuser_n49": dict(kind="fuser", n=49, c=32, tokens=5, bottleneck=64, norm=True, seed=702),
    "tokenlearner_fuser_n37": dict(kind="fuser", n=37, c=24, tokens=7, bottleneck=16, norm=False, seed=703),
    "tokenlearner_v1_n49": dict(kind="learner_v1", n=49, c=32, tokens=5, sum_pooling=True, noise=0.05, seed=704),
    "tokenlearner_v1_n25": dict(kind="learner_v1", n=25, c=24, tokens=7, sum_pooling=False, noise=0.05, seed=705),
}


def stub_scenic_imports() -> list[str]:
  """Empty stand-ins for the modules model.py imports but the two modules never use."""
  class _Base:  # model.py subclasses these at import time
    pass

  stubs = {
      "scenic.model_lib.base_models": {},
      "scenic.model_lib.base_models.base_model": {"BaseModel": _Base, "MetricFn": object},
      "scenic.model_lib.base_models.classification_model": {"ClassificationModel": _Base},
      "scenic.model_lib.base_models.multilabel_classification_model": {"MultiLabelClassificationModel": _Base},
      "scenic.projects.baselines": {},
      "scenic.projects.baselines.vit": {},
      "scenic.projects.vivit": {},
      "scenic.projects.vivit.model": {},
      "scenic.projects.vivit.model_utils": {},
  }
  for name, attrs in stubs.items():
    mod = types.ModuleType(name)
    mod.__path__ = []  # a package, so submodules resolve to the stubs
    for k, v in attrs.items():
      setattr(mod, k, v)
    sys.modules[name] = mod
  for name in stubs:  # parent.child attributes, as a real import would set
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
      setattr(sys.modules[parent], child, sys.modules[name])
  return sorted(stubs)


def perturb(params, std, seed):
  import jax
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(l, np.float32) + std * rng.standard_normal(l.shape).astype(np.float32) for l in leaves]
  return jax.tree_util.tree_unflatten(tree, leaves)


def flat(params, prefix="param"):
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}/{k}"))
    else:
      out[f"{prefix}/{k}"] = np.asarray(v, np.float32)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repo", default="/work/refs/scenic")
  ap.add_argument("--out", default="tests/goldens")
  ap.add_argument("--case", choices=sorted(CASES), action="append", help="only these cases (default: all)")
  a = ap.parse_args()
  common.add_repo_to_path(a.repo)
  stubbed = stub_scenic_imports()
  import flax
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from scenic.projects.token_learner import model as tl

  for name, case in CASES.items():
    if a.case and name not in a.case:
      continue
    rng = np.random.default_rng(case["seed"])
    b, n, c, s = BATCH, case["n"], case["c"], case["tokens"]
    x = rng.standard_normal((b, n, c)).astype(np.float32)
    key = jax.random.key(case["seed"])
    arrays = {}
    if case["kind"] == "learner":
      module = tl.TokenLearnerModuleV11(num_tokens=s, bottleneck_dim=case["bottleneck"], dropout_rate=0.0)
      params = flax.core.unfreeze(module.init(key, jnp.asarray(x), deterministic=True))["params"]
      params = perturb(params, NOISE_STD, case["seed"] + 1)
      out = module.apply({"params": params}, jnp.asarray(x), deterministic=True)
      # The softmax map, from the reference's own LayerNorm and MlpBlock on the same parameters.
      ln = nn.LayerNorm().apply({"params": params["LayerNorm_0"]}, jnp.asarray(x))
      scores = tl.attention_layers.MlpBlock(mlp_dim=case["bottleneck"], out_dim=s, dropout_rate=0.0,
                                            activation_fn=nn.gelu).apply(
                                                {"params": params["token_masking"]}, ln, deterministic=True)
      weights = np.asarray(jax.nn.softmax(jnp.swapaxes(scores, 1, 2), axis=-1))
      np.testing.assert_allclose(np.einsum("bsn,bnc->bsc", weights, x), np.asarray(out), rtol=1e-5, atol=1e-5)
      top2 = -np.sort(-weights, axis=1)[:, :2]  # [B, 2, N]
      margin = float(np.min((top2[:, 0] - top2[:, 1]) / top2[:, 0]))
      common.check_margin(name, margin)
      arrays.update(x=x, out=np.asarray(out), weights=weights, min_margin=np.float64(margin))
    elif case["kind"] == "learner_v1":
      module = tl.TokenLearnerModule(num_tokens=s, use_sum_pooling=case["sum_pooling"])
      params = flax.core.unfreeze(module.init(key, jnp.asarray(x)))["params"]
      params = perturb(params, case["noise"], case["seed"] + 1)  # smaller: four convs saturate the sigmoid
      out, state = module.apply({"params": params}, jnp.asarray(x), capture_intermediates=True,
                                mutable=["intermediates"])
      # The sigmoid map over the reference's own last conv output [B, h, w, S] (captured, not recomputed).
      last = np.asarray(state["intermediates"]["Conv_3"]["__call__"][0])
      weights = np.asarray(jax.nn.sigmoid(jnp.asarray(last.reshape(b, n, s)))).transpose(0, 2, 1)  # [B, S, N]
      pooled = np.einsum("bsn,bnc->bsc", weights, x) / (1 if case["sum_pooling"] else n)
      np.testing.assert_allclose(pooled, np.asarray(out), rtol=1e-5, atol=1e-5)
      top2 = -np.sort(-weights, axis=1)[:, :2]  # [B, 2, N]
      margin = float(np.min((top2[:, 0] - top2[:, 1]) / top2[:, 0]))
      common.check_margin(name, margin)
      arrays.update(x=x, out=np.asarray(out), weights=weights, min_margin=np.float64(margin))
    else:
      learned = rng.standard_normal((b, s, c)).astype(np.float32)
      module = tl.TokenFuser(use_normalization=case["norm"], bottleneck_dim=case["bottleneck"], dropout_rate=0.0)
      params = flax.core.unfreeze(module.init(key, jnp.asarray(learned), jnp.asarray(x), deterministic=True))["params"]
      params = perturb(params, NOISE_STD, case["seed"] + 1)
      out = module.apply({"params": params}, jnp.asarray(learned), jnp.asarray(x), deterministic=True)
      arrays.update(x=learned, original=x, out=np.asarray(out))
    arrays.update(flat(params))
    print(name, {k: v.shape for k, v in arrays.items()})
    cfg = dict(case, batch=b, noise_std=case.get("noise", NOISE_STD), reference="google-research/scenic", commit=COMMIT,
               stubbed_modules=stubbed, jax_version=jax.__version__, flax_version=flax.__version__,
               numpy_version=np.__version__)
    common.save_golden(os.path.join(a.out, f"{name}.npz"), arrays, cfg)


if __name__ == "__main__":
  main()

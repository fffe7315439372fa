"""DiffRate search (tokcomp/reducers/diffrate_search.py): the training pass, its gradients to the rate logits and
the FLOPs against the official code; the survival probabilities against a loop; the export round trip.

Golden: tests/goldens/diffrate_search_cls50.npz from tools/goldens/make_diffrate_search.py (OpenGVLab/DiffRate @
91ae3e3, `DiffRate.patch.deit` in train mode, fp32).
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load, model_from_state, nhwc
from helpers import assert_close
from tokcomp.models.vit import Encoder1DBlock
from tokcomp.reducers import diffrate, diffrate_search

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


@pytest.fixture(scope="module")
def golden():
  config, state, g = load("diffrate_search_cls50")
  dense, params = model_from_state(state, num_heads=config["num_heads"])
  model = dense.clone(reduce="diffrate_search")
  arch = {i: {"prune_logits": jnp.asarray(g[f"arch/prune/{i}"]), "merge_logits": jnp.asarray(g[f"arch/merge/{i}"])}
          for i in range(model.depth)}
  return config, model, params, arch, g


def with_arch(params, arch):
  blocks = dict(params["params"]["Transformer"])
  for i, a in arch.items():
    blocks[f"encoderblock_{i}"] = {**blocks[f"encoderblock_{i}"], "diffrate_search": a}
  return {"params": {**params["params"], "Transformer": blocks}}


def forward(model, params, arch, x):
  return model.apply(with_arch(params, arch), x, train=True, mutable=["counts", "intermediates"],
                     capture_intermediates=lambda mdl, _: isinstance(mdl, Encoder1DBlock))


def test_training_pass_matches_reference(golden):
  config, model, params, arch, g = golden
  x = nhwc(g["input"])
  (logits, aux), state = jax.jit(lambda a: forward(model, params, a, x))(arch)
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="train logits")
  blocks = state["intermediates"]["Transformer"]
  for i in range(model.depth):
    policy = blocks[f"encoderblock_{i}"]["__call__"][0].policy
    assert float(jnp.round(jnp.sum(policy[0]))) == float(g[f"alive/{i}"]), f"block {i}"
  # The reference's FLOPs are MACs with a patch embedding over N0 = 50 tokens (CLS included); ours are 2 MACs
  # over the 49 patches.
  flops = train.sown_flops(model, state["counts"], (56, 56), 3)
  c, p = config["embed_dim"], config["patch_size"]
  np.testing.assert_allclose(float(flops), 2 * (float(g["flops"]) - c * p * p * 3), rtol=1e-6)
  kept = diffrate_search.searched_counts(with_arch(params, arch), 49)
  assert kept.prune == tuple(int(g[f"prune_kept/{i}"]) for i in range(model.depth))
  assert kept.merge == tuple(int(g[f"merge_kept/{i}"]) for i in range(model.depth))


def test_gradients_to_the_rates_match_reference(golden):
  config, model, params, arch, g = golden
  x, w = nhwc(g["input"]), jnp.asarray(g["weight"])
  out = jax.jit(jax.grad(lambda a: jnp.sum(forward(model, params, a, x)[0][0] * w)))(arch)
  flops = jax.jit(jax.grad(lambda a: train.sown_flops(model, forward(model, params, a, x)[1]["counts"],
                                                      (56, 56), 3)))(arch)
  for i in range(model.depth):
    for kind in ("prune", "merge"):
      ref = g[f"grad_out/{kind}/{i}"]
      scale = max(np.abs(ref).max(), 1e-6)
      assert_close(out[i][f"{kind}_logits"], ref, rtol=1e-4, atol=1e-4 * scale, err_msg=f"d out/d {kind} {i}")
      assert_close(flops[i][f"{kind}_logits"], 2 * g[f"grad_flops/{kind}/{i}"], rtol=1e-5, atol=1e-3,
                   err_msg=f"d flops/d {kind} {i}")
  assert any(np.abs(g[f"grad_out/{k}/{i}"]).max() > 0 for k in ("prune", "merge") for i in range(1, 4))


def test_survival_probability_is_a_loop_over_candidates():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=10).astype(np.float32)
  cand = diffrate_search.candidates(19, 2)  # 19, 17, ..., 1
  kept, prob = diffrate_search.kept_and_probability(jnp.asarray(logits), cand, 20)
  p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  ref = np.zeros(20)
  for c, pc in zip(cand, p):  # the reference's get_token_probability
    ref[:int(c) + 1] += pc
  assert_close(prob, ref, rtol=1e-5, atol=1e-6)
  assert float(kept) == np.ceil(np.float32(cand @ p)) + 1
  mask = diffrate_search.step_mask(kept, prob, jnp.asarray(15.0))
  hard = np.ones(20)
  hard[int(kept):15] = 0
  assert_close(mask, hard, atol=1e-6)


def test_export_writes_a_schedule_that_runs_training_free(golden, tmp_path):
  config, model, params, arch, g = golden
  path = diffrate_search.export(with_arch(params, arch), model, str(tmp_path), (56, 56))
  counts = diffrate.load_schedule(path)
  assert counts.prune == tuple(int(g[f"prune_kept/{i}"]) for i in range(4))
  runnable = model.clone(reduce=f"diffrate:schedule={path}")
  logits, aux = runnable.apply(params, nhwc(g["input"]))
  assert aux["tokens"].n == int(g["alive/3"]) and np.isfinite(np.asarray(logits)).all()


def test_errors():
  from helpers import tiny_vit
  with pytest.raises(ValueError, match="granularity=0"):
    tiny_vit(reduce="diffrate_search:granularity=0").plan((56, 56))

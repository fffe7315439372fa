"""DynamicViT (tokcomp/reducers/dynamicvit.py): parity with the official code in both passes, the loss parts,
the straight-through gradient, the checkpoint converter, and errors.

Golden: tests/goldens/dynamicvit_p2_r07.npz from tools/goldens/make_dynamicvit.py (raoyongming/DynamicViT @
1322e62, fp32): inference (top-k at int(196 ρ^s)), training with the reference's gumbel draw, and the parts of
its DistillDiffPruningLoss_dynamic.
"""
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load, model_from_state, nhwc, run_with_blocks
from helpers import assert_close, images, random_params, tiny_vit
from tokcomp import checkpoints
from tokcomp.ops import select

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

SPEC = "dynamicvit:keep=0.7,layers=1-2-3"


@pytest.fixture(scope="module")
def golden():
  config, state, g = load("dynamicvit_p2_r07")
  model, params = model_from_state(state, num_heads=config["num_heads"], reduce=SPEC)
  return config, model, params, g


def test_inference_matches_reference(golden):
  config, model, params, g = golden
  _, counts = model.plan((28, 28))
  assert [c.n_attn - 1 for c in counts] == [196] + config["kept_counts"]
  logits, _, blocks = run_with_blocks(model, params, nhwc(g["input"]))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for s, block in enumerate(config["pruning_loc"]):  # the patches each stage keeps, as original ids
    index = np.asarray(blocks[block].index)[:, 1:]
    kept = [np.flatnonzero(row >= 0) for row in index]
    np.testing.assert_array_equal(np.stack(kept), g[f"kept/{s}"], err_msg=f"stage {s}")


def fixed_gumbel(monkeypatch, draws):
  it = iter(draws)
  monkeypatch.setattr(select, "gumbel_noise", lambda rng, shape: jnp.asarray(next(it)))


def test_training_pass_and_losses_match_reference(golden, monkeypatch):
  config, model, params, g = golden
  stages = len(config["pruning_loc"])
  fixed_gumbel(monkeypatch, [g[f"gumbel/{s}"] for s in range(stages)])
  x = nhwc(g["input"])
  (logits, aux), sown = model.apply(params, x, train=True, rngs={"gumbel": jax.random.key(0)},
                                    mutable=["losses"])
  assert_close(logits, g["logits_train"], rtol=1e-5, atol=1e-5, err_msg="train logits")
  tokens = aux["tokens"]
  assert tokens.n == 197  # full length in training
  assert_close(tokens.x[:, 1:], g["features_train"], rtol=1e-5, atol=1e-5, err_msg="final tokens")
  np.testing.assert_array_equal(np.asarray(tokens.policy)[:, 1:], g[f"decision/{stages - 1}"])
  ratio = sum(float(v[0]) for v in jax.tree_util.tree_leaves(sown["losses"], is_leaf=lambda t: isinstance(t, tuple)))
  np.testing.assert_allclose(ratio, 2.0 / stages * float(g["loss_ratio"]), rtol=1e-5)

  teacher = model.clone(reduce=None)
  t_params = {"params": {**params["params"], "Transformer": {
      k: ({kk: vv for kk, vv in v.items() if kk != "dynamicvit"} if isinstance(v, dict) else v)
      for k, v in params["params"]["Transformer"].items()}}}
  t_logits, t_aux = teacher.apply(t_params, x)
  assert_close(t_logits, g["teacher_logits"], rtol=1e-5, atol=1e-5, err_msg="teacher logits")
  parts = train.distill_losses({"logits": 0.5, "tokens": 0.5}, logits, tokens, t_logits, t_aux["tokens"])
  np.testing.assert_allclose(float(parts["distill_logits"]), 0.5 * float(g["loss_cls_kl"]), rtol=1e-5)
  np.testing.assert_allclose(float(parts["distill_tokens"]), 0.5 * float(g["loss_token_mse"]), rtol=1e-5)


def test_policy_passes_gradients_to_the_predictor():
  model = tiny_vit(reduce="dynamicvit:keep=0.7,layers=1-2")
  params = random_params(model)
  x = images(batch=2)

  def loss(p):
    (logits, _), sown = model.apply(p, x, train=True, rngs={"gumbel": jax.random.key(3)}, mutable=["losses"])
    return jnp.sum(logits ** 2) + sum(jnp.sum(l) for l in jax.tree_util.tree_leaves(sown))
  grads = jax.jit(jax.grad(loss))(params)["params"]["Transformer"]
  for block in ("encoderblock_1", "encoderblock_2"):
    g = grads[block]["dynamicvit"]["predictor"]
    assert all(np.abs(np.asarray(l)).sum() > 0 for l in jax.tree_util.tree_leaves(g)), block


def test_whole_model_compiles_once_per_mode():
  model = tiny_vit(reduce="dynamicvit:keep=0.6,layers=1-3")
  params = random_params(model)
  infer = jax.jit(chex.assert_max_traces(lambda p, x: model.apply(p, x), n=1))
  fit = jax.jit(chex.assert_max_traces(lambda p, x, r: model.apply(
      p, x, train=True, rngs={"gumbel": r}, mutable=["losses"]), n=1))
  for seed in (0, 1):
    logits, aux = infer(params, images(seed=seed))
    assert aux["tokens"].n == 1 + int(49 * 0.6 ** 2) and np.isfinite(np.asarray(logits)).all()
    (logits, aux), _ = fit(params, images(seed=seed), jax.random.key(seed))
    assert aux["tokens"].n == 50 and np.isfinite(np.asarray(logits)).all()
  chex.clear_trace_counter()


def test_errors():
  with pytest.raises(ValueError, match=r"keep=1.5: must be the per-stage keep ratio"):
    tiny_vit(reduce="dynamicvit:keep=1.5").plan((56, 56))
  with pytest.raises(ValueError, match=r"unknown argument"):
    tiny_vit(reduce="dynamicvit:keep=0.5,rate=3").plan((56, 56))
  with pytest.raises(ValueError, match=r"keeps int\(49 \* 0.0001\^1\) = 0 tokens: must be in \[1, 49\]"):
    tiny_vit(reduce="dynamicvit:keep=0.0001,layers=1").plan((56, 56))
  model = tiny_vit(reduce="topk:keep=0.7,layers=0+dynamicvit:keep=0.7,layers=2")
  params = random_params(model)
  with pytest.raises(ValueError, match="trains at full length"):  # a trace-time error: no compute needed
    jax.eval_shape(lambda p: model.apply(p, images(), train=True, rngs={"gumbel": jax.random.key(0)},
                                         mutable=["losses"]), params)


def test_converter_needs_the_schedule(golden):
  _, state, _ = load("dynamicvit_p2_r07")
  with pytest.raises(ValueError, match="3 DynamicViT predictors"):
    checkpoints.load(state, num_heads=2)
  with pytest.raises(ValueError, match="3 DynamicViT predictors"):
    checkpoints.load(state, num_heads=2, reduce="dynamicvit:keep=0.7,layers=1-2")

"""SiT's token slimming module (tokcomp/reducers/sit.py): parity with the official TSM in a whole ViT, a
loop-based NumPy reference of the map, the count rule, the whole model, gradients, and errors.

Goldens: tests/goldens/sit_*.npz from tools/goldens/make_sit.py (Sense-X/SiT @ f577808, models/lvvit.py
`LVViT` with its `TokenSlimmingModule`s, fp32): logits, every block's output, and each stage's weights A.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load, model_from_state, nhwc, run_with_blocks
from helpers import assert_close, images, random_params, tiny_vit, tokens_and_signals
from tokcomp import reducers, schedules

CASES = ["sit_b112_k06", "sit_b22_k04"]


def tsm_params(state, stage):
  """The reference's `tsm.<s>` (Sequential LayerNorm, Linear, GELU, Linear; scale [1, 1, 1]) -> our names."""
  t = f"tsm.{stage}."
  return {"norm": {"scale": state[t + "weight.0.weight"], "bias": state[t + "weight.0.bias"]},
          "hidden": {"kernel": state[t + "weight.1.weight"].T, "bias": state[t + "weight.1.bias"]},
          "out": {"kernel": state[t + "weight.3.weight"].T, "bias": state[t + "weight.3.bias"]},
          "scale": state[t + "scale"].reshape(())}


def golden_model(name):
  config, state, g = load(name)
  dense = {k: v for k, v in state.items() if not k.startswith("tsm.")}
  model, params = model_from_state(dense, num_heads=config["num_heads"])
  model = model.clone(reduce=config["spec"])
  blocks = dict(params["params"]["Transformer"])
  for s, layer in enumerate(config["slim_index"]):
    blocks[f"encoderblock_{layer}"] = {**blocks[f"encoderblock_{layer}"], "sit": tsm_params(state, s)}
  return config, model, {"params": {**params["params"], "Transformer": blocks}}, g


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
  config, model, params, g = golden_model(name)
  _, counts = model.plan((56, 56))
  kept = [1 + k for k in config["kept_counts"]]
  assert sorted({c.n_attn for c in counts}, reverse=True) == [50] + kept
  logits, aux, blocks = run_with_blocks(model, params, nhwc(g["input"]))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for i, block in enumerate(blocks):
    assert_close(block.x, g[f"block/{i}"], rtol=1e-5, atol=1e-5, err_msg=f"block {i}")
  # index: each original patch follows the argmax of the reference's weights, stage after stage.
  slot = np.broadcast_to(np.arange(49), (3, 49))
  for s, layer in enumerate(config["slim_index"]):
    w = g[f"weights/{s}"]  # [B, N_s, M_s]
    slot = np.stack([np.argmax(w[b], axis=1)[slot[b]] for b in range(3)])
    index = np.asarray(blocks[layer].index)
    np.testing.assert_array_equal(index[:, 1:], 1 + slot, err_msg=f"stage {s}")
    np.testing.assert_array_equal(index[:, 0], 0)
    size = np.asarray(blocks[layer].size)
    np.testing.assert_array_equal(size[:, 1:], np.stack([np.bincount(r, minlength=w.shape[2]) for r in slot]))


def np_gelu(v):
  return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def np_tsm(x, valid, protected, p):
  """One example, loop by loop: x [N, D] -> [P + M, D] and the weights A [N - P, M]."""
  n, d = x.shape
  hid, m = p["hidden"]["kernel"].shape[1], p["out"]["kernel"].shape[1]
  logits = np.full((n - protected, m), -np.inf)
  for i in range(protected, n):
    if not valid[i]:
      continue
    mu = sum(x[i]) / d
    var = sum((v - mu) ** 2 for v in x[i]) / d
    h = [(x[i, k] - mu) / math.sqrt(var + 1e-5) * p["norm"]["scale"][k] + p["norm"]["bias"][k] for k in range(d)]
    z = [np_gelu(sum(h[k] * p["hidden"]["kernel"][k, j] for k in range(d)) + p["hidden"]["bias"][j])
         for j in range(hid)]
    for j in range(m):
      logits[i - protected, j] = (sum(z[k] * p["out"]["kernel"][k, j] for k in range(hid))
                                  + p["out"]["bias"][j]) * float(p["scale"])
  weights = np.zeros_like(logits)
  for j in range(m):
    col = logits[:, j]
    e = np.where(np.isfinite(col), np.exp(col - col.max()), 0.0)
    weights[:, j] = e / e.sum()
  out = [x[i] for i in range(protected)] + [sum(weights[i, j] * x[protected + i] for i in range(n - protected))
                                            for j in range(m)]
  return np.stack(out), weights


def slim(spec, tokens, signals, seed):
  steps, _ = schedules.resolve(reducers.build_schedule(spec, 4), tokens.num_original, tokens.num_protected)
  step = [s for s in steps if s is not None][0]
  module = reducers.module(step)
  params = jax.jit(module.init)(jax.random.key(seed), tokens, signals)
  leaves, tree = jax.tree_util.tree_flatten(params)  # away from the near-uniform init, every parameter used
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_unflatten(tree, [l + 0.3 * rng.normal(size=np.shape(l)) for l in leaves])
  return jax.jit(module.apply)(params, tokens, signals), jax.tree_util.tree_map(np.asarray, params["params"])


@pytest.mark.parametrize("n,protected,keep,masked", [(37, 1, 0.6, 0), (26, 0, 0.3, 0), (31, 2, 0.5, 5)])
def test_map_matches_loop_reference(n, protected, keep, masked):
  tokens, signals = tokens_and_signals(batch=2, n=n, d=8, protected=protected, seed=n)
  if masked:  # invalid slots at the end (an earlier reducer's capacity): they get no weight
    tokens = tokens.replace(mask=tokens.mask.at[:, n - masked:].set(False),
                            index=jnp.where(tokens.index >= n - masked, -1, tokens.index))
  out, p = slim(f"sit:keep={keep},layers=0", tokens, signals, seed=n)
  m = int((n - protected) * keep)
  assert out.n == protected + m and np.asarray(out.mask).all() and out.grid is None
  x, valid = np.asarray(tokens.x, np.float64), np.asarray(tokens.mask)
  for b in range(2):
    want, weights = np_tsm(x[b], valid[b], protected, p)
    assert_close(out.x[b], want, rtol=1e-5, atol=1e-5, err_msg=f"row {b}")
    dom = np.argmax(weights, axis=1) + protected
    idx = np.asarray(out.index[b])
    expect = [q if q < protected else (dom[q - protected] if valid[b, q] else -1) for q in range(n)]
    np.testing.assert_array_equal(idx, expect)
    np.testing.assert_array_equal(np.asarray(out.size[b]), np.bincount(idx[idx >= 0], minlength=out.n))


def test_counts_follow_the_initial_patch_count():
  """int(N0 ρ^s) of the model's initial patches, as the reference's keeped_patches, at every stage."""
  model = tiny_vit(reduce="sit:keep=0.7,layers=1-2-3")
  _, counts = model.plan((56, 56))
  assert [c.n_attn - 1 for c in counts] == [49, int(49 * 0.7), int(49 * 0.7 ** 2), int(49 * 0.7 ** 3)]
  steps = reducers.build_schedule("sit:keep=0.5", 16)  # the default: SiT-S's stage_blocks [9, 3, 2, 2]
  assert [i for i, s in enumerate(steps) if s is not None] == [9, 12, 14]
  assert [s.config.stage for s in steps if s is not None] == [1, 2, 3]


def test_whole_vit_compiles_once_and_trains_the_tsm():
  model = tiny_vit(reduce="sit:keep=0.6,layers=1-2", depth=3, width=32, mlp_dim=64)
  params = random_params(model)
  own = params["params"]["Transformer"]["encoderblock_2"]["sit"]
  assert own["hidden"]["kernel"].shape == (32, 16) and own["out"]["kernel"].shape == (16, int(49 * 0.6 ** 2))
  fn = jax.jit(chex.assert_max_traces(lambda p, x: model.apply(p, x), n=1))
  for seed in (0, 1):
    logits, aux = fn(params, images(seed=seed))
    assert logits.shape == (3, 10) and np.isfinite(np.asarray(logits)).all()
    assert aux["tokens"].n == 1 + int(49 * 0.6 ** 2)
  chex.clear_trace_counter()
  x = images(batch=2)
  train = jax.jit(lambda p: model.apply(p, x, train=True)[0])
  assert_close(train(params), jax.jit(lambda p: model.apply(p, x)[0])(params), rtol=1e-6, atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(train(p) ** 2)))(params)["params"]["Transformer"]
  for block in ("encoderblock_1", "encoderblock_2"):
    for leaf in jax.tree_util.tree_leaves(grads[block]["sit"]):
      assert np.abs(np.asarray(leaf)).sum() > 0, block


@pytest.mark.parametrize("spec,match", [
    ("sit:keep=0", r"keep=0: must be the per-stage keep ratio in \(0, 1\]"),
    ("sit:keep=1.5", r"keep=1.5: must be the per-stage keep ratio"),
    ("sit:keep=0.5,hidden=0", r"hidden=0: must be the MLP's hidden width"),
    ("sit:keep=0.5,layers=4", r"sit layers entry 4: must be a block index in \[0, 4\)"),
    ("sit:keep=0.5,layers=1-1", "repeated"),
    ("sit:keep=0.01,layers=1", r"keeps int\(49 \* 0.01\^1\) = 0 tokens: must be in \[1, 49\]"),
    ("sit:keep=0.5,ratio=2", r"unknown argument.*\['ratio'\]"),
])
def test_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    tiny_vit(reduce=spec).plan((56, 56))

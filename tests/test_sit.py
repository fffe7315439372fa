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


# --- FRD (Feature Recalibration Distillation, §3.2): reverse TSMs and the token distillation -------------------

FRD_CASES = ["sit_frd_b112_k06", "sit_frd_b22_k04"]


def linear(state, key):
  return {"kernel": state[key + ".weight"].T, "bias": state[key + ".bias"]}


def rtsm_params(state, block):
  """The reference's `rtsm.<i>` (ReverseTSM: norm1, mlp1.fc{1,2}, norm2, mlp2.fc{1,2}) -> our names (the same)."""
  r = f"rtsm.{block}."
  norm = lambda k: {"scale": state[r + k + ".weight"], "bias": state[r + k + ".bias"]}
  return {"norm1": norm("norm1"), "norm2": norm("norm2"),
          "mlp1": {"fc1": linear(state, r + "mlp1.fc1"), "fc2": linear(state, r + "mlp1.fc2")},
          "mlp2": {"fc1": linear(state, r + "mlp2.fc1"), "fc2": linear(state, r + "mlp2.fc2")}}


def frd_golden(name):
  """Student (spec with frd=1: TSM s after block slim_index[s] - 1, reverse TSM i after block i) and teacher."""
  config, state, g = load(name)
  dense = {k: v for k, v in state.items() if not k.startswith(("tsm.", "rtsm."))}
  model, params = model_from_state(dense, num_heads=config["num_heads"])
  model = model.clone(reduce=config["spec"])
  blocks = dict(params["params"]["Transformer"])
  for i in range(config["depth"]):
    own = {}
    if i + 1 in config["slim_index"]:
      own.update(tsm_params(state, config["slim_index"].index(i + 1)))
    if not config["rtsm_identity"][i]:
      own["rtsm"] = rtsm_params(state, i)
    if own:
      blocks[f"encoderblock_{i}"] = {**blocks[f"encoderblock_{i}"], "sit": own}
  student = {"params": {**params["params"], "Transformer": blocks}}
  t_state = {k[len("teacher/"):]: g[k] for k in g if k.startswith("teacher/")}
  teacher, t_params = model_from_state(t_state, num_heads=config["num_heads"])
  return config, model, student, teacher, t_params, g


@pytest.mark.parametrize("name", FRD_CASES)
def test_frd_matches_reference(name):
  """The training pass: logits, every block's tokens mapped back by the reverse TSMs, the teacher's block tokens,
  and the reference's loss terms (token MSE, logits KL, CE) through train.py's own functions, at 1e-5."""
  import optax
  import train
  config, model, params, teacher, t_params, g = frd_golden(name)
  hw = (config["img_size"], config["img_size"])
  # Our init builds the same tree (reverse TSMs too, though inference never runs them).
  ours = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, 3)))["params"]
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(params["params"])
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a.shape == np.shape(b), ours, params["params"]))
  x = nhwc(g["input"])
  (logits, aux), sown = jax.jit(lambda p, x: model.apply(p, x, train=True, mutable=["distill", "losses"]))(params, x)
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="student logits")
  assert not sown.get("losses")
  student = sown["distill"]["Transformer"]
  assert sorted(student) == [f"encoderblock_{i}" for i in range(config["depth"])]
  for i in range(config["depth"]):
    (tokens,) = student[f"encoderblock_{i}"]["sit"]["tokens"]
    assert_close(tokens, g[f"student_tokens/{i}"], rtol=1e-5, atol=1e-5, err_msg=f"reverse TSM, block {i}")

  t_logits, t_aux, t_blocks = jax.jit(lambda p, x: train.teacher_forward(teacher, p, x, blocks=True))(t_params, x)
  assert_close(t_logits, g["teacher_logits"], rtol=1e-5, atol=1e-5, err_msg="teacher logits")
  for i in range(config["depth"]):
    assert_close(t_blocks[f"encoderblock_{i}"]["__call__"][0].x[:, 1:], g[f"teacher_tokens/{i}"], rtol=1e-5,
                 atol=1e-5, err_msg=f"teacher block {i}")
  token = train.frd_loss(config["lambda_token"], sown["distill"], t_blocks, 1)
  np.testing.assert_allclose(float(token), float(g["loss_token"]), rtol=1e-5)
  assert float(g["loss_token"]) > 1.0  # far from 0: the comparison means something
  parts = train.distill_losses({"logits": config["lambda_logits"], "tokens": 0.0}, logits, aux["tokens"], t_logits,
                               t_aux["tokens"])
  assert config["tau"] == 1.0  # train.py's KL has no temperature: the reference's at tau = 1
  np.testing.assert_allclose(float(parts["distill_logits"]), float(g["loss_logits"]), rtol=1e-5)
  ce = optax.softmax_cross_entropy(logits, jax.nn.one_hot(g["labels"], 10)).mean()
  np.testing.assert_allclose(float(ce), float(g["loss_cls"]), rtol=1e-5)
  np.testing.assert_allclose(float(ce + token + parts["distill_logits"]), float(g["loss"]), rtol=1e-5)
  assert float(g["loss_cnn"]) == 0.0  # no CNN teacher: the reference's hard-distillation term is off

  # Inference: no reverse TSM runs and nothing is sown; the logits are the plain TSMs' (pre slots, same weights).
  (eval_logits, _), state = model.apply(params, x, mutable=["distill"])
  assert not state.get("distill")
  assert_close(eval_logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="inference logits")
  plain = model.clone(reduce=config["spec"].replace(",frd=1", ""))
  state = load(name)[1]
  moved = {k: ({kk: vv for kk, vv in v.items() if kk != "sit"} if k.startswith("encoderblock_") else v)
           for k, v in params["params"]["Transformer"].items()}
  for s, layer in enumerate(config["slim_index"]):
    moved[f"encoderblock_{layer}"] = {**moved[f"encoderblock_{layer}"], "sit": tsm_params(state, s)}
  plain_logits, _ = plain.apply({"params": {**params["params"], "Transformer": moved}}, x)
  np.testing.assert_array_equal(np.asarray(plain_logits), np.asarray(eval_logits))


def test_frd_schedule_counts_and_flops():
  """frd=1: a post step after every block, the TSMs one block earlier than the pre-slot ones; the same counts and
  the same inference FLOPs as without FRD (reverse TSMs are training-only)."""
  plain, frd = tiny_vit(reduce="sit:keep=0.6,layers=1-2"), tiny_vit(reduce="sit:keep=0.6,layers=1-2,frd=1")
  assert plain.plan((56, 56))[1] == frd.plan((56, 56))[1]
  assert plain.flops((56, 56)) == frd.flops((56, 56))
  steps, _ = frd.plan((56, 56))
  assert [s.slot for s in steps] == ["post"] * 4
  assert [(s.config.slim, s.config.stage) for s in steps] == [(True, 1), (True, 2), (False, 2), (False, 2)]
  late = tiny_vit(reduce="sit:keep=0.5,layers=2,frd=1").plan((56, 56))[0]
  assert [(s.config.slim, s.config.stage, s.config.kept()) for s in late] == [
      (False, 0, 49), (True, 1, 24), (False, 1, 24), (False, 1, 24)]
  default = reducers.build_schedule("sit:keep=0.5,layers=1-2", 4)  # frd=0: exactly the old pre-slot schedule
  assert [None if s is None else (s.slot, s.config.frd) for s in default] == [None, ("pre", False), ("pre", False),
                                                                               None]


def test_frd_gradients_reach_every_reverse_tsm():
  model = tiny_vit(reduce="sit:keep=0.5,layers=2,frd=1", depth=3, width=32, mlp_dim=64)
  params = random_params(model)
  blocks = params["params"]["Transformer"]
  assert "sit" not in blocks["encoderblock_0"]  # block 0: nothing dropped yet, the identity has no parameters
  assert set(blocks["encoderblock_1"]["sit"]) == {"norm", "hidden", "out", "scale", "rtsm"}
  assert set(blocks["encoderblock_2"]["sit"]) == {"rtsm"}
  x = images(batch=2)

  def loss(p):
    _, sown = model.apply(p, x, train=True, mutable=["distill"])
    return sum(jnp.mean(t ** 2) for t in jax.tree_util.tree_leaves(sown["distill"]))
  grads = jax.jit(jax.grad(loss))(params)["params"]["Transformer"]
  for block in ("encoderblock_1", "encoderblock_2"):
    for leaf in jax.tree_util.tree_leaves(grads[block]["sit"]["rtsm"]):
      assert np.abs(np.asarray(leaf)).sum() > 0, block


@pytest.mark.parametrize("spec,match", [
    ("sit:keep=0.5,layers=1,frd=2", r"frd=2: must be 0 \(plain TSMs\) or 1"),
    ("sit:keep=0.5,layers=0-2,frd=1", r"layers entry 0 would slim before the first block"),
    ("tome:r=0-0-0-2+sit:keep=0.5,layers=1,frd=1", r"block 3 gets both tome and sit"),  # FRD takes every block
])
def test_frd_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    tiny_vit(reduce=spec).plan((56, 56))


def test_frd_reverse_step_checks_its_count():
  """A reverse-only step maps exactly the patches its stage leaves (its first MLP's input width)."""
  step = reducers.build_schedule("sit:keep=0.5,layers=1,frd=1", 3)[2]
  method = reducers.get("sit")
  config = method.bind(step.config, 50, 1)
  assert not config.slim and method.resolve(config, 25, 1) == config and method.out_count(config, 25, 1) == 25
  with pytest.raises(ValueError, match=r"reverse TSM after stage 1 expects 24 patches but 22 enter"):
    method.resolve(config, 23, 1)


def test_frd_trains_through_train_py(dense_run, tmp_path):
  """Two fine-tuning steps through train.py with FRD on: the token term is logged and in the objective, the
  reverse TSMs are trained parameters of the run, and inference runs the slimmed model."""
  import json
  import train
  from configs import fmnist_learned
  from tokcomp import evaluation
  c = fmnist_learned.get_config(f"method=sit_frd,runlocal,init_from={dense_run}")
  assert c.reduce == "sit:keep=0.5,layers=1,frd=1" and c.distill.frd == 2.0
  c.steps, c.log_every = 2, 1
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["steps"] == 2 and summary["tokens_per_layer"][-1] < summary["tokens_per_layer"][0]
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert len(rows) == 2
  for row in rows:
    assert row["loss_distill_frd"] > 0 and row["loss_distill_logits"] >= 0
    np.testing.assert_allclose(sum(v for k, v in row.items() if k.startswith("loss_")), row["loss"], rtol=1e-5)
  params, _ = evaluation.restore_params(str(tmp_path))
  blocks = params["params"]["Transformer"]
  assert {"norm", "hidden", "out", "scale", "rtsm"} <= set(blocks["encoderblock_0"]["sit"])
  assert set(blocks["encoderblock_1"]["sit"]) == {"rtsm"}

  c.distill = dict(teacher="init", logits=2.0, tokens=0.0)  # FRD tokens sown but no weight for them
  with pytest.raises(ValueError, match=r"sows per-block tokens for SiT's FRD.*config.distill.frd|set config.distill"):
    train.train_and_evaluate(c, str(tmp_path / "no_weight"))
  c.reduce, c.distill = "sit:keep=0.5,layers=1", dict(teacher="init", logits=2.0, tokens=0.0, frd=2.0)
  with pytest.raises(ValueError, match=r"FRD needs a reducer that sows every block's full-length tokens"):
    train.train_and_evaluate(c, str(tmp_path / "no_frd"))

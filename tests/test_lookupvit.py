"""LookupViT (tokcomp/models/lookupvit.py): a loop-based NumPy reference of the block and of the whole forward
on the module's own parameters, the pooled compressed tokens, the grid chosen at inference with the same
parameters, multi-resolution training, FLOPs, one compile, batch independence, errors, batch sharding (in a
subprocess with 8 simulated devices: this file run as a script) and train.py on configs/fmnist_lookupvit.py.

No official code is public, so the NumPy reference follows the equations of the module docstring.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.special import erf  # noqa: E402

from tokcomp import models  # noqa: E402
from tokcomp.models import lookupvit  # noqa: E402

TINY = dict(num_classes=5, patch_size=(4, 4), width=8, depth=2, mlp_dim=16, num_heads=2, compressed=(3, 3),
            lookup_mlp_ratio=0.5)
HW = (20, 16)  # a 5x4 lookup grid: 3x3 compressed bins overlap in rows and in columns


def model(**kw) -> lookupvit.LookupViT:
  return lookupvit.LookupViT(**{**TINY, **kw})


def images(batch=3, hw=HW, channels=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, *hw, channels))


def perturbed_params(m, hw=HW, channels=3, seed=0, std=0.3):
  """Init, then add N(0, std) to every leaf so that the zero-initialised head and CLS are non-trivial."""
  p = jax.jit(m.init)(jax.random.key(seed), jnp.zeros((1, *hw, channels)))
  leaves, tree = jax.tree_util.tree_flatten({"params": p["params"]})
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [np.asarray(l) + std * np.asarray(jax.random.normal(k, l.shape))
                                             for l, k in zip(leaves, keys)])


# --- the NumPy reference (float64, explicit loops over heads and tokens) -------------------------------------

def f64(p):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), p)


def ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def heads_in(x, p):  # [n, D] -> [n, H, d]
  return np.einsum("nd,dhk->nhk", x, p["kernel"]) + p["bias"]


def heads_out(y, p):  # [n, H, d] -> [n, D]
  return np.einsum("nhk,hkd->nd", y, p["kernel"]) + p["bias"]


def mlp(x, p):
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
  return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def softmax_1d(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def attend(q, k, v, scores=None):
  """q [m, H, d], k [n, H, d], v [n, H, d] -> ([m, H, d], logits [H, m, n]), one query row at a time."""
  m, heads, d = q.shape
  n = k.shape[0]
  logits = np.zeros((heads, m, n))
  out = np.zeros((m, heads, v.shape[-1]))
  for h in range(heads):
    for i in range(m):
      for j in range(n):
        logits[h, i, j] = np.dot(q[i, h], k[j, h]) / math.sqrt(d)
      w = softmax_1d(logits[h, i])
      for j in range(n):
        out[i, h] += w[j] * v[j, h]
  return out, logits


def ref_block(c, l, p, propagation):
  """One LookupViT block on one example: c [M', D] compressed, l [N, D] lookup."""
  ln_l = ln(l, p["gather_norm_lookup"])
  y, logits = attend(heads_in(ln(c, p["gather_norm_compressed"]), p["gather_query"]),
                     heads_in(ln_l, p["gather_key"]), heads_in(ln_l, p["gather_value"]))
  c = c + heads_out(y, p["gather_out"])
  a = p["MultiHeadDotProductAttention_0"]
  x = ln(c, p["LayerNorm_0"])
  y, _ = attend(heads_in(x, a["query"]), heads_in(x, a["key"]), heads_in(x, a["value"]))
  c = c + heads_out(y, a["out"])
  c = c + mlp(ln(c, p["LayerNorm_1"]), p["MlpBlock_0"])
  heads, m, n = logits.shape
  v = heads_in(ln(c, p["propagate_norm"]), p["propagate_value"])  # [M', H, d]
  y = np.zeros((n, heads, v.shape[-1]))
  for h in range(heads):
    for j in range(n):  # lookup token j reads the compressed tokens
      if propagation == "transpose":
        w = np.array([softmax_1d(logits[h, i])[j] for i in range(m)])  # column j of the gathering map
      else:
        w = softmax_1d(logits[h, :, j])
      for i in range(m):
        y[j, h] += w[i] * v[i, h]
  l = l + heads_out(y, p["propagate_out"])
  l = l + mlp(ln(l, p["lookup_mlp_norm"]), p["lookup_mlp"])
  return c, l


def adaptive_bins(n_in, n_out):
  return [(math.floor(i * n_in / n_out), math.ceil((i + 1) * n_in / n_out)) for i in range(n_out)]


def ref_pool(l, patch_grid, compressed):
  """2D adaptive average pooling of the raster-ordered lookup tokens, bin by bin."""
  grid = l.reshape(*patch_grid, -1)
  return np.stack([grid[r0:r1, c0:c1].mean(axis=(0, 1)) for r0, r1 in adaptive_bins(patch_grid[0], compressed[0])
                   for c0, c1 in adaptive_bins(patch_grid[1], compressed[1])])


def ref_forward(m, params, image):
  """The whole LookupViT on one image [H, W, C] -> (logits, final normed compressed tokens)."""
  p = f64(params)["params"]
  ph, pw = m.patch_size
  gh, gw = image.shape[0] // ph, image.shape[1] // pw
  patches = np.asarray(image, np.float64).reshape(gh, ph, gw, pw, -1).transpose(0, 2, 1, 3, 4)
  patches = patches.reshape(gh * gw, -1)
  l = patches @ p["embedding"]["kernel"].reshape(-1, m.width) + p["embedding"]["bias"]
  pos = p["pos_embedding"][0]
  l = l + pos[m.num_prefix:]
  c = ref_pool(l, (gh, gw), tuple(m.compressed))
  if m.class_token:
    c = np.concatenate([p["cls"][0] + pos[:1], c])
  for i in range(m.depth):
    c, l = ref_block(c, l, p["Transformer"][f"encoderblock_{i}"], m.propagation)
  c = ln(c, p["Transformer"]["encoder_norm"])
  if m.pool == "token":
    pre = c[0]
  else:
    pre = c[m.num_prefix:].mean(0) + ln(l, p["Transformer"]["lookup_norm"]).mean(0)
  return pre @ p["head"]["kernel"] + p["head"]["bias"], c


# --- parity with the reference --------------------------------------------------------------------------------

@pytest.mark.parametrize("propagation", ["transpose", "softmax"])
def test_block_matches_numpy_reference(propagation):
  block = lookupvit.LookupBlock(num_heads=2, mlp_dim=16, lookup_mlp_dim=6, propagation=propagation)
  c = jax.random.normal(jax.random.key(1), (2, 7, 8))
  l = jax.random.normal(jax.random.key(2), (2, 13, 8))
  params = block.init(jax.random.key(0), c, l)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  out_c, out_l = jax.jit(block.apply)(params, c, l)
  for b in range(2):
    ref_c, ref_l = ref_block(np.asarray(c[b], np.float64), np.asarray(l[b], np.float64), f64(params)["params"],
                             propagation)
    np.testing.assert_allclose(out_c[b], ref_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_l[b], ref_l, rtol=1e-5, atol=1e-5)
    other = "softmax" if propagation == "transpose" else "transpose"  # the two propagations are told apart
    _, other_l = ref_block(np.asarray(c[b], np.float64), np.asarray(l[b], np.float64), f64(params)["params"], other)
    assert np.max(np.abs(other_l - ref_l)) > 1e-2
  assert float(jnp.max(jnp.abs(out_l - l))) > 0.1  # propagation and the lookup MLP changed the lookup tokens


@pytest.mark.parametrize("kw", [{}, dict(propagation="softmax"), dict(pool="gap"),
                                dict(pool="gap", class_token=False), dict(compressed=(5, 4)),
                                dict(compressed=(1, 1))])
def test_forward_matches_numpy_reference(kw):
  m = model(**kw)
  params = perturbed_params(m)
  x = images(batch=2)
  logits, aux = jax.jit(m.apply)(params, x)
  for b in range(2):
    ref_logits, ref_c = ref_forward(m, params, x[b])
    np.testing.assert_allclose(logits[b], ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["tokens"].x[b], ref_c, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(logits)) > 0.1  # a non-trivial head


def test_pooled_initial_compressed_tokens():
  """The compressed stream starts as CLS + the adaptive average pool of the embedded lookup grid."""
  m = model(depth=0)  # no blocks: the encoder returns the (normed) initial compressed stream
  params = perturbed_params(m)
  p = f64(params)["params"]
  p["Transformer"]["encoder_norm"] = {"scale": np.ones(8), "bias": np.zeros(8)}
  x = images(batch=1)
  _, aux = m.apply(jax.tree.map(jnp.asarray, {"params": p}), x)
  _, ref = ref_forward(m, {"params": p}, x[0])
  np.testing.assert_allclose(aux["tokens"].x[0], ref, rtol=1e-5, atol=1e-5)
  pool, index, size = lookupvit.pooling_layout((5, 4), (3, 3), 1)
  # rows 0-1, 1-3, 3-4 of 5 and columns 0-1, 1-2, 2-3 of 4 (torch's adaptive bins)
  assert [b for b in adaptive_bins(5, 3)] == [(0, 2), (1, 4), (3, 5)]
  np.testing.assert_allclose(pool.sum(1), 1.0, rtol=1e-6)
  assert index[0] == 0 and size.sum() == 21 and size[0] == 1
  np.testing.assert_array_equal(np.bincount(index, minlength=10), size)


# --- the grid at inference, multi-resolution training ----------------------------------------------------------

def test_grid_selectable_at_inference_with_the_same_params():
  m = model()
  params = perturbed_params(m)
  x = images(batch=2)
  shapes = {g: jax.tree.map(jnp.shape, jax.eval_shape(model(compressed=g).init, jax.random.key(0), x))
            for g in ((1, 1), (2, 3), (5, 4))}
  assert len({json.dumps(jax.tree.leaves(s)) for s in shapes.values()}) == 1  # no grid-specific parameters
  outs = {}
  for g in ((1, 1), (2, 3), (3, 3), (5, 4)):
    mg = m.clone(compressed=g)
    logits, aux = jax.jit(mg.apply)(params, x)
    assert aux["tokens"].n == 1 + g[0] * g[1] and aux["tokens"].grid == g
    assert [c.n_mlp for c in mg.plan(HW)[1]] == [1 + g[0] * g[1]] * 2
    np.testing.assert_allclose(logits[0], ref_forward(mg, params, x[0])[0], rtol=1e-5, atol=1e-5)
    outs[g] = np.asarray(logits)
  assert not np.allclose(outs[(1, 1)], outs[(3, 3)])


def test_multiresolution_training_draws_a_grid_per_step():
  grids = ((1, 1), (2, 2), (3, 3))
  m = model(train_compressed=grids)
  params = perturbed_params(m)
  x = images(batch=2)

  traces = {"n": 0}

  def train_forward(p, x, rng):
    traces["n"] += 1
    (logits, aux), _ = m.apply(p, x, train=True, rngs={"gumbel": rng}, mutable=["losses"])
    return logits, aux["tokens"]

  fn = jax.jit(train_forward)
  inference = {g: jax.jit(m.clone(compressed=g, train_compressed=()).apply) for g in grids}
  seen = set()
  for seed in range(12):
    logits, tokens = fn(params, x, jax.random.key(seed))
    assert tokens.n == 10  # padded to the largest grid's 1 + 3*3
    count = int(tokens.mask[0].sum())
    g = next(g for g in grids if 1 + g[0] * g[1] == count)
    seen.add(g)
    assert not bool(tokens.mask[:, count:].any()) and float(tokens.size[0].sum()) == 21
    # The step ran exactly the inference model at the drawn grid (no dropout: train and eval forwards agree).
    ref_logits, ref_aux = inference[g](params, x)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tokens.x[:, :count], ref_aux["tokens"].x, rtol=1e-5, atol=1e-5)
  assert seen == set(grids) and traces["n"] == 1
  # Inference ignores train_compressed; gradients flow through the switch.
  assert jax.eval_shape(m.apply, params, x)[1]["tokens"].n == 10
  grads = jax.grad(lambda p: jnp.sum(train_forward(p, x, jax.random.key(0))[0] ** 2))(params)
  g = grads["params"]["Transformer"]["encoderblock_0"]
  assert float(jnp.abs(g["gather_query"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g["lookup_mlp"]["Dense_0"]["kernel"]).sum()) > 0


# --- FLOPs --------------------------------------------------------------------------------------------------------

def dot_macs(jaxpr) -> int:
  """Multiply-adds of every dot_general and convolution in a jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (_, rc), (_, rb) = eqn.params["dimension_numbers"]
      total += int(np.prod(lhs)) * int(np.prod([s for i, s in enumerate(rhs) if i not in rc + rb]))
    elif eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod(kernel)) // out_features
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += dot_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += dot_macs(sub)
  return total


@pytest.mark.parametrize("kw", [{}, dict(compressed=(5, 4), pool="gap"), dict(propagation="softmax", depth=3)])
def test_flops_formula_equals_the_matmul_count(kw):
  m = model(**kw)
  x = jnp.zeros((1, *HW, 3))
  params = jax.eval_shape(m.init, jax.random.key(0), x)
  macs = dot_macs(jax.make_jaxpr(m.apply)(params, x).jaxpr)
  assert m.flops(HW, 3) == 2.0 * macs


def test_flops_close_to_xla_cost_analysis():
  m = model(width=192, mlp_dim=768, num_heads=3, depth=2, patch_size=(8, 8), compressed=(3, 3))
  x = jnp.zeros((2, 56, 56, 3))
  params = jax.eval_shape(m.init, jax.random.key(0), x)
  cost = jax.jit(m.apply).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = cost["flops"] / 2  # per image
  ours = m.flops((56, 56))
  # XLA also counts LayerNorm, softmax, GELU and the residual adds; the analytic count is the matmuls.
  assert 0.9 < ours / xla < 1.01, (ours, xla)


def test_fmnist_config_is_about_half_the_dense_flops():
  from configs import fmnist_lookupvit, fmnist_vit
  c = fmnist_lookupvit.get_config()
  dense = models.get("vit")(**fmnist_vit.get_config().model).flops((28, 28), 1)
  ratio = models.get(c.model_name)(**c.model).flops((28, 28), 1) / dense
  assert 0.45 < ratio < 0.55, ratio


# --- compile once, batch, errors ----------------------------------------------------------------------------------

def test_compiles_once():
  m = model()
  traces = {"n": 0}

  def forward(p, x):
    traces["n"] += 1
    return m.apply(p, x)

  fn = jax.jit(forward)
  p0, p1 = perturbed_params(m, seed=0), perturbed_params(m, seed=5)
  for p, seed in ((p0, 0), (p1, 1), (p0, 2)):
    logits, aux = fn(p, images(batch=3, seed=seed))
    assert bool(jnp.all(jnp.isfinite(logits)))
  assert traces["n"] == 1


def test_batch_rows_are_independent():
  m = model(pool="gap")
  params = perturbed_params(m)
  x = images(batch=4)
  fn = jax.jit(m.apply)
  logits, aux = fn(params, x)
  for b in range(4):
    one, one_aux = fn(params, x[b:b + 1])
    np.testing.assert_allclose(logits[b], one[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["lookup"][b], one_aux["lookup"][0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[0], logits[1])


@pytest.mark.parametrize("kw,match", [
    (dict(compressed=(6, 3)), r"LookupViT.compressed=\(6, 3\): must be at most the lookup grid 5x4"),
    (dict(compressed=(0, 3)), r"LookupViT.compressed=\(0, 3\): must be a grid"),
    (dict(compressed=(3,)), r"LookupViT.compressed=\(3,\): must be a grid"),
    (dict(compressed="3x3"), r"LookupViT.compressed='3x3': must be a grid"),
    (dict(reduce="tome:r=4"), r"LookupViT.reduce='tome:r=4': must be None or ''"),
    (dict(propagation="both"), r"LookupViT.propagation='both'"),
    (dict(pool="token", class_token=False), r"pool='token' needs class_token=True"),
    (dict(lookup_mlp_ratio=0.0), r"LookupViT.lookup_mlp_ratio=0.0"),
    (dict(num_heads=3), r"LookupViT.num_heads=3 must divide LookupViT.width=8"),
])
def test_bad_config_raises(kw, match):
  m = model(**kw)
  with pytest.raises(ValueError, match=match):
    m.plan(HW)
  with pytest.raises(ValueError, match=match):
    m.init(jax.random.key(0), jnp.zeros((1, *HW, 3)))


def test_bad_train_grids_and_missing_rng():
  m = model(train_compressed=((2, 2), (9, 9)))
  x = jnp.zeros((1, *HW, 3))
  params = m.init(jax.random.key(0), x)  # inference does not use the training grids
  with pytest.raises(ValueError, match=r"LookupViT.train_compressed\[1\]=\(9, 9\): must be at most"):
    m.apply(params, x, train=True, rngs={"gumbel": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"pass rngs=\{'gumbel': key\}"):
    model(train_compressed=((2, 2), (3, 3))).apply(params, x, train=True)
  with pytest.raises(ValueError, match="multiple of LookupViT.patch_size"):
    model().plan((21, 16))
  assert model().reduce is None and model(reduce="").plan(HW)[0] == (None, None)


def test_registered_in_models():
  assert models.get("lookupvit") is lookupvit.LookupViT


# --- batch sharding (subprocess: 8 simulated CPU devices) --------------------------------------------------------

def sharding_check() -> dict:
  """Run as a script: the batch-sharded forward (inference, and a multi-resolution training forward) against
  the unsharded one, and the collectives in the compiled HLO."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import sharding_check as sc

  mesh = Mesh(np.array(jax.devices()), ("data",))
  data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  x = images(batch=8)
  out = {"devices": jax.device_count()}
  for label, m in (("inference", model(pool="gap")), ("train_multires", model(train_compressed=((2, 2), (3, 3))))):
    params = perturbed_params(m)
    train = label != "inference"

    def fwd(p, x, rng, m=m, train=train):
      (logits, aux), _ = m.apply(p, x, train=train, rngs={"gumbel": rng}, mutable=["losses"])
      return logits, aux["tokens"]

    rng = jax.random.key(3)
    ref = jax.jit(fwd)(params, x, rng)
    sharded = jax.jit(fwd, in_shardings=(repl, data, repl), out_shardings=data)
    compiled = sharded.lower(params, x, rng).compile()
    res = compiled(jax.device_put(params, repl), jax.device_put(x, data), rng)
    out[label] = {**sc.compare(res, ref), "collectives": sc.collectives(compiled.as_text()),
                  "logit_shards": len(sc.shards_of(res[0]))}
  return out


def test_batch_sharded_forward_equals_unsharded_without_collectives():
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([ROOT, HERE])}
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "--sharding-check"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert res["devices"] == 8
  for label in ("inference", "train_multires"):
    assert res[label]["close"], (label, res[label])
    assert res[label]["collectives"] == [], (label, res[label])
    assert res[label]["logit_shards"] == 8


# --- train.py on configs/fmnist_lookupvit.py ----------------------------------------------------------------------

def test_train_py_runlocal_two_steps(tmp_path):
  import train
  from configs import fmnist_lookupvit
  c = fmnist_lookupvit.get_config("runlocal")
  assert c.steps == 2 and c.init_from == "" and c.model["train_compressed"]
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
  assert summary["tokens_per_layer"] == [10, 10]  # CLS + 3x3 compressed tokens at inference
  m = models.get("lookupvit")(**c.model)
  assert summary["gflops"] == pytest.approx(m.flops((28, 28), 1) / 1e9)
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f]
  assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def test_fine_tunes_from_a_vit_run(dense_run, tmp_path):
  """The compressed stream takes every parameter of a vit.ViT run; only LookupViT's own start fresh."""
  import train
  from configs import fmnist_lookupvit
  from tokcomp import evaluation
  c = fmnist_lookupvit.get_config(f"runlocal,init_from={dense_run}")
  m = models.get("lookupvit")(**c.model)
  fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                       jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  loaded, kept_fresh = train.load_init(dense_run, fresh)
  own = ("gather_", "propagate_", "lookup_mlp")
  assert kept_fresh and all(any(o in k for o in own) for k in kept_fresh)
  dense, _ = evaluation.restore_params(dense_run)
  np.testing.assert_array_equal(loaded["params"]["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"],
                                dense["params"]["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"])
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])


def test_benchmark_vit_checkpoint_initialises_the_fmnist_config():
  import train
  from configs import fmnist_lookupvit
  bench = os.path.join(ROOT, "benchmarks", "fmnist_vit")
  if not os.path.isdir(os.path.join(bench, "ckpt")):
    pytest.skip("benchmarks/fmnist_vit/ckpt is not in this checkout")
  c = fmnist_lookupvit.get_config()
  assert c.init_from == "benchmarks/fmnist_vit"
  m = models.get("lookupvit")(**c.model)
  fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                       jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
  _, kept_fresh = train.load_init(bench, fresh)
  assert all(any(o in k for o in ("gather_", "propagate_", "lookup_mlp")) for k in kept_fresh)
  assert len(kept_fresh) == 6 * 24  # per block: 12 LayerNorms and Denses (scale or kernel, and bias)


if __name__ == "__main__" and "--sharding-check" in sys.argv:
  print(json.dumps(sharding_check()))

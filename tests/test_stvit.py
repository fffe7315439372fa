"""STViT / STViT-R (tokcomp/reducers/stvit.py): parity with the official modules, a loop-based NumPy reference of
the generation and the recovery, the token-state bookkeeping, the whole ViT, and errors.

Golden: tests/goldens/stvit_g10_m16.npz from tools/goldens/make_stvit.py (changsn/STViT-R @ b4a27a0, fp32): the
reference's SemanticAttentionBlock and Block on a 10 x 10 grid (one window = the global variant), both values of
its SHORTCUT flag, and the recovery Block.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load
from helpers import assert_close, images, random_params, tiny_vit
from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.reducers import stvit
from tokcomp.tokens import Tokens

EPS = 1e-6


# --- parity with the official modules ------------------------------------------------------------------------

def layer_params(state, prefix, heads):
  """The reference's Block / SemanticAttentionBlock state -> our CrossLayer params."""
  g = lambda k: np.asarray(state[f"{prefix}.{k}"])
  d = g("q.weight").shape[0]
  hd = d // heads
  kv_w, kv_b = g("kv.weight"), g("kv.bias")
  heads_in = lambda w: w.T.reshape(d, heads, hd)
  return {
      "norm1": {"scale": g("norm1.weight"), "bias": g("norm1.bias")},
      "query": {"kernel": heads_in(g("q.weight")), "bias": g("q.bias").reshape(heads, hd)},
      "key": {"kernel": heads_in(kv_w[:d]), "bias": kv_b[:d].reshape(heads, hd)},
      "value": {"kernel": heads_in(kv_w[d:]), "bias": kv_b[d:].reshape(heads, hd)},
      "out": {"kernel": g("attn.proj.weight").T.reshape(heads, hd, d), "bias": g("attn.proj.bias")},
      "layer_scale_1": g("layer_scale_1"),
      "norm2": {"scale": g("norm2.weight"), "bias": g("norm2.bias")},
      "mlp_in": {"kernel": g("mlp.fc1.weight").T, "bias": g("mlp.fc1.bias")},
      "mlp_out": {"kernel": g("mlp.fc2.weight").T, "bias": g("mlp.fc2.bias")},
      "layer_scale_2": g("layer_scale_2"),
  }


@pytest.fixture(scope="module")
def golden():
  config, state, g = load("stvit_g10_m16")
  # The reference's Attention keeps q, kv and proj under "attn."; its LayerNorms and MLP under the block.
  state = {k.replace(".attn.q.", ".q.").replace(".attn.kv.", ".kv."): v for k, v in state.items()}
  heads = config["num_heads"]
  params = {name: layer_params(state, name, heads) for name in ("generate", "refine", "recover")}
  params["global_centres"] = state["global_centres"]
  tokens = Tokens.create(jnp.concatenate([g["cls"], g["x"]], axis=1), 1, grid=tuple(config["grid"]))
  return config, params, tokens, g


def stvit_config(config, **kw):
  return stvit.build_config(reducers.check_args("stvit", {"tokens": "x".join(map(str, config["tokens"])),
                                                           "heads": config["num_heads"], **kw},
                                                 {"tokens": 16, "heads": None, "shortcut": 1, "global": 1,
                                                  "layer_scale": 1e-5, "mlp_ratio": 4}))


def test_generation_matches_reference(golden):
  config, params, tokens, g = golden
  c = stvit_config(config)
  out = stvit.STViT(c).apply({"params": {k: params[k] for k in ("generate", "refine", "global_centres")}},
                             tokens, Signals())
  assert out.n == 1 + 16
  assert_close(out.x[:, 0], tokens.x[:, 0], err_msg="CLS passes through")
  assert_close(out.x[:, 1:], g["s2"], rtol=1e-5, atol=1e-5, err_msg="semantic tokens (shortcut, global)")
  # The first layer alone: pooled queries over [pooled; patches].
  x = jnp.asarray(g["x"])
  pooled = stvit.adaptive_max_pool(x, tuple(config["grid"]), tuple(config["tokens"]))
  s1, _ = stvit.CrossLayer(c.heads, residual=True).apply(
      {"params": params["generate"]}, pooled, jnp.concatenate([pooled, x], 1), jnp.ones((3, 116), bool))
  assert_close(s1, g["s1"], rtol=1e-5, atol=1e-5, err_msg="first layer")


def test_plain_variant_matches_reference(golden):
  config, params, tokens, g = golden
  c = stvit_config(config, shortcut=0, **{"global": 0})
  out = stvit.STViT(c).apply({"params": {k: params[k] for k in ("generate", "refine")}}, tokens, Signals())
  assert_close(out.x[:, 1:], g["s2_plain"], rtol=1e-5, atol=1e-5, err_msg="shortcut off, no global centres")


def test_recovery_matches_reference(golden):
  config, params, tokens, g = golden
  final = Tokens.create(jnp.concatenate([g["cls"], g["s2"]], axis=1), 1)
  dense = stvit.Recovery(config["num_heads"]).apply({"params": {"recover": params["recover"]}}, final,
                                                    tokens.x, tuple(config["grid"]))
  assert dense.shape == (3, 10, 10, 48)
  assert_close(dense.reshape(3, 100, 48), g["recovered"], rtol=1e-5, atol=1e-5, err_msg="recovered map")


# --- loop-based NumPy reference ------------------------------------------------------------------------------

def np_ln(x, p):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def np_gelu(x):
  from math import erf, sqrt
  flat = [0.5 * v * (1 + erf(v / sqrt(2))) for v in np.ravel(x).tolist()]
  return np.asarray(flat).reshape(np.shape(x))


def np_layer(p, q_in, kv_in, valid, heads, residual):
  """One CrossLayer for one example, loops over queries, heads and keys. Returns (out [M, D], probs [H, M, K])."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  m, d = q_in.shape
  hd = d // heads
  qn, kn = np_ln(q_in, p["norm1"]), np_ln(kv_in, p["norm1"])
  proj = lambda x, name: np.einsum("nd,dhe->nhe", x, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj(qn, "query"), proj(kn, "key"), proj(kn, "value")
  probs = np.zeros((heads, m, kv_in.shape[0]))
  y = np.zeros((m, heads, hd))
  for h in range(heads):
    for i in range(m):
      logits = [q[i, h] @ k[j, h] / np.sqrt(hd) if valid[j] else -np.inf for j in range(kv_in.shape[0])]
      e = np.exp(np.asarray(logits) - max(logits))
      probs[h, i] = e / e.sum()
      for j in range(kv_in.shape[0]):
        y[i, h] += probs[h, i, j] * v[j, h]
  y = np.einsum("mhe,hed->md", y, p["out"]["kernel"]) + p["out"]["bias"]
  x = (q_in if residual else 0) + p["layer_scale_1"] * y
  hid = np_gelu(np_ln(x, p["norm2"]) @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"])
  return x + p["layer_scale_2"] * (hid @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]), probs


def np_pool(x, grid, out):
  """Adaptive max pooling, torch's bins, one output cell at a time."""
  img = np.asarray(x).reshape(grid[0], grid[1], -1)
  cells = []
  for i in range(out[0]):
    r0, r1 = (i * grid[0]) // out[0], -(-(i + 1) * grid[0] // out[0])
    for j in range(out[1]):
      c0, c1 = (j * grid[1]) // out[1], -(-(j + 1) * grid[1] // out[1])
      cell = np.full(img.shape[-1], -np.inf)
      for r in range(r0, r1):
        for c in range(c0, c1):
          cell = np.maximum(cell, img[r, c])
      cells.append(cell)
  return np.stack(cells)


def np_stvit(params, c, x, grid, heads):
  """Generation for one example: (semantic tokens [M, D], index of each patch, size of each slot)."""
  pooled = np_pool(x, grid, c.grid)
  m, n = len(pooled), len(x)
  valid = np.ones(m + n, bool)
  s1, probs = np_layer(params["generate"], pooled, np.concatenate([pooled, x]), valid, heads, c.shortcut)
  q = s1 + (np.asarray(params["global_centres"][0], np.float64) if c.global_centres else 0)
  s2, _ = np_layer(params["refine"], q, np.concatenate([s1, x]), valid, heads, True)
  share = probs[:, :, m:].mean(0).T  # [N, M]
  share = share / share.sum(1, keepdims=True)
  return s2, share.argmax(1), share.sum(0)


@pytest.mark.parametrize("tokens,shortcut,glob", [("3x2", 1, 1), (4, 0, 0)])
def test_matches_numpy_loops(tokens, shortcut, glob):
  step = reducers.build_schedule(f"stvit:tokens={tokens},layer=0,heads=2,shortcut={shortcut},global={glob}", 2)[0]
  c = step.config
  grid = (5, 7)  # 35 patches: odd, not a multiple of the pooling grid (overlapping bins)
  x = jax.random.normal(jax.random.key(4), (2, 2 + 35, 16))
  tokens = Tokens.create(x, 2, grid=grid)  # two prefix tokens
  module = stvit.STViT(c)
  params = jax.jit(lambda t: module.init(jax.random.key(5), t, Signals()))(tokens)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(6), len(leaves))  # perturb: non-trivial layer scales and centres
  params = jax.tree_util.tree_unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  out = jax.jit(lambda p, t: module.apply(p, t, Signals()))(params, tokens)
  m = c.num_tokens
  assert out.n == 2 + m and out.grid is None and bool(jnp.all(out.mask))
  for b in range(2):
    s, index, size = np_stvit(params["params"], c, np.asarray(x[b, 2:], np.float64), grid, 2)
    assert_close(out.x[b, 2:], s, rtol=1e-5, atol=1e-5, err_msg=f"semantic tokens, row {b}")
    assert_close(out.x[b, :2], x[b, :2])
    np.testing.assert_array_equal(np.asarray(out.index[b]), np.concatenate([[0, 1], 2 + index]))
    np.testing.assert_allclose(np.asarray(out.size[b]), np.concatenate([[1, 1], size]), rtol=1e-4, atol=1e-4)
    assert float(jnp.sum(out.size[b])) == 37.0  # conserved exactly
  assert len(set(np.asarray(out.index[0, 2:]).tolist())) > 1  # the assignment is not degenerate


def test_recovery_matches_numpy_loops():
  x = jax.random.normal(jax.random.key(7), (2, 1 + 12, 8))
  final = Tokens.create(jax.random.normal(jax.random.key(8), (2, 1 + 5, 8)), 1)
  final = final.replace(mask=final.mask.at[1, 3].set(False))  # a masked slot is not attended
  module = stvit.Recovery(2)
  params = jax.jit(lambda f, x: module.init(jax.random.key(9), f, x, (3, 4)))(final, x)
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(10), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  dense = jax.jit(lambda p, f, x: module.apply(p, f, x, (3, 4)))(params, final, x)
  assert dense.shape == (2, 3, 4, 8)
  for b in range(2):
    ref, _ = np_layer(params["params"]["recover"], np.asarray(x[b, 1:], np.float64),
                      np.asarray(final.x[b, 1:], np.float64), np.asarray(final.mask[b, 1:]), 2, True)
    assert_close(dense[b].reshape(12, 8), ref, rtol=1e-5, atol=1e-5, err_msg=f"row {b}")


# --- the whole ViT -------------------------------------------------------------------------------------------

SPEC = "stvit:tokens=16,layer=1,heads=2"


@pytest.fixture(scope="module")
def vit():
  model = tiny_vit(reduce=SPEC)  # 56 px / 8 -> 7 x 7 patches + CLS
  return model, random_params(model)


def test_whole_vit_compiles_once_and_recovers(vit):
  model, params = vit
  _, counts = model.plan((56, 56))
  assert [c.n_attn for c in counts] == [50, 17, 17, 17]
  assert set(params["params"]["Transformer"]["encoderblock_1"]["stvit"]) == {"generate", "refine", "global_centres"}
  recovery = stvit.Recovery(2)

  def forward(p, rp, x):
    (logits, aux), state = model.apply(p, x, mutable=["intermediates"])
    saved = stvit.image_tokens_of(state)
    return logits, aux["tokens"], saved, recovery.apply(rp, aux["tokens"], saved, (7, 7))

  fwd = jax.jit(chex.assert_max_traces(forward, n=1))
  rp = jax.jit(lambda t, s: recovery.init(jax.random.key(0), t, s, (7, 7)))(
      Tokens.create(jnp.zeros((3, 17, 64)), 1), jnp.zeros((3, 50, 64)))
  for seed in (0, 1):
    logits, tokens, saved, dense = fwd(params, rp, images(seed=seed))
    assert logits.shape == (3, 10) and np.isfinite(np.asarray(logits)).all()
    assert tokens.n == 17 and tokens.index.shape == (3, 50)
    np.testing.assert_allclose(np.asarray(tokens.size).sum(1), 50)
    assert saved.shape == (3, 50, 64)
    assert dense.shape == (3, 7, 7, 64) and np.isfinite(np.asarray(dense)).all()
  chex.clear_trace_counter()


def test_training_is_the_static_path_and_trains_the_generation(vit):
  model, params = vit
  x = images(batch=2)

  @jax.jit
  def both(p):
    (train, _), _ = model.apply(p, x, train=True, rngs={"gumbel": jax.random.key(0)}, mutable=["losses"])
    # Without the "intermediates" collection the sow is a no-op: plain inference, as for any reducer.
    return train, model.apply(p, x)[0]
  out_train, out_eval = both(params)
  assert_close(out_train, out_eval)
  assert np.isfinite(np.asarray(out_eval)).all()

  def loss(p):
    (logits, _), _ = model.apply(p, x, train=True, mutable=["losses"])
    return jnp.sum(logits ** 2)
  grads = jax.jit(jax.grad(loss))(params)["params"]["Transformer"]["encoderblock_1"]["stvit"]
  for name in ("generate", "refine", "global_centres"):
    assert all(np.abs(np.asarray(l)).sum() > 0 for l in jax.tree_util.tree_leaves(grads[name])), name


def test_generation_flops():
  c = reducers.build_schedule(SPEC, 4)[1].config
  m, n, d, f = 16, 49, 64, 256
  per_layer = 2 * m * d * d + 2 * (m + n) * d * d + 2 * m * (m + n) * d + 2 * m * d * f
  assert stvit.generation_flops(c, n, d) == 2.0 * 2 * per_layer


# --- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("stvit:tokens=15,layer=1", r"tokens=15: must be a perfect square"),
    ("stvit:tokens=2x0,layer=1", r"tokens=.2x0.: must be a perfect square"),
    ("stvit:tokens=16", r"stvit layer: required"),
    ("stvit:tokens=16,layer=1-2", r"must be one block index"),
    ("stvit:tokens=16,layer=9", r"stvit layer"),
    ("stvit:tokens=16,layer=1,heads=0", r"heads=0: must be an int >= 1"),
    ("stvit:tokens=16,layer=1,shortcut=2", r"shortcut=2: must be 0 or 1"),
    ("stvit:tokens=16,layer=1,global=yes", r"global='yes': must be 0 or 1"),
    ("stvit:tokens=16,layer=1,layer_scale=-1", r"layer_scale=-1: must be a finite number > 0"),
    ("stvit:tokens=16,layer=1,mlp_ratio=0", r"mlp_ratio=0: must be a finite number > 0"),
    ("stvit:tokens=16,layer=1,rate=3", r"unknown argument"),
    ("stvit:tokens=64,layer=1", r"tokens=64 \(8x8\): must be at most the 49 patches"),
])
def test_config_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    tiny_vit(reduce=spec).plan((56, 56))


def test_trace_time_errors():
  with pytest.raises(ValueError, match=r"heads=3: must divide the width 64"):
    model = tiny_vit(reduce="stvit:tokens=16,layer=1,heads=3")
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 56, 56, 3)))
  with pytest.raises(ValueError, match=r"pooling grid must fit the patch grid 7x7"):
    model = tiny_vit(reduce="stvit:tokens=1x9,layer=1,heads=2")
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 56, 56, 3)))
  with pytest.raises(ValueError, match=r"no longer a full grid .* stvit must come first"):
    model = tiny_vit(reduce="topk:keep=0.7,layers=0+stvit:tokens=9,layer=2,heads=2")
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 56, 56, 3)))
  tokens = Tokens.create(jnp.zeros((1, 10, 8)), 1, grid=(3, 3))
  with pytest.raises(ValueError, match=r"image_tokens \(1, 11, 8\) must be"):
    jax.eval_shape(lambda t, x: stvit.Recovery(1).init(jax.random.key(0), t, x, (3, 3)), tokens, jnp.zeros((1, 11, 8)))
  with pytest.raises(ValueError, match="found 0 saved stvit inputs"):
    stvit.image_tokens_of({"intermediates": {}})

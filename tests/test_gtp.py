"""GTP-ViT: parity with the official code (Ackesnal/GTP-ViT @ 97a1178, goldens by tools/goldens/make_gtp.py),
a loop-based NumPy reference of the selection, graph and propagation rules, and the clear errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import HERE, model_from_state, nhwc, run_with_blocks
from helpers import assert_close, tokens_and_signals
from tokcomp import reducers
from tokcomp.ops import graph
from tokcomp.tokens import Tokens

CASES = ["gtp_mixed_scale_50", "gtp_spatial_list_50", "gtp_mean_cls_50", "gtp_none_cossim_50", "gtp_semantic_gap_49",
         "gtp_sparse_mixed_50", "gtp_sparse_scale_cls_50"]


# --- parity with the reference -------------------------------------------------------------------------------

def load_case(name):
  g = np.load(os.path.join(HERE, "goldens", name + ".npz"), allow_pickle=False)
  config = json.loads(str(g["config"]))
  p = np.load(os.path.join(HERE, "goldens", config["params"] + ".npz"), allow_pickle=False)
  state = {k[len("param/"):]: p[k].astype(np.float32) for k in p.files if k.startswith("param/")}
  return config, state, {k: g[k] for k in g.files}



@pytest.mark.parametrize("name", CASES)
def test_gtp_matches_reference(name):
  config, state, g = load_case(name)
  model, params = model_from_state(state, num_heads=config["num_heads"], reduce=config["ours"])
  _, counts = model.plan((config["img_size"],) * 2)
  assert [c.n_mlp for c in counts] == list(g["tokens_per_layer"]), "token schedule differs from the reference"
  logits, aux, blocks = run_with_blocks(model, params, nhwc(g["input"]))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for i, t in enumerate(blocks):  # same order as the reference (kept by descending significance): slot by slot
    assert_close(t.x, g[f"block_out/{i}"], rtol=1e-5, atol=1e-5, err_msg=f"block {i}")
    if f"token_scales/{i}" in g:
      assert_close(t.size, g[f"token_scales/{i}"], rtol=1e-5, atol=1e-6, err_msg=f"block {i} token scales")


def test_golden_cases_cover_the_reference_knobs():
  """The fixtures are what they claim: every graph, every propagation, CLS and GAP, with and without scales."""
  seen = [load_case(n)[0] for n in CASES]
  refs = [c["reference_kwargs"] for c in seen]
  assert {r["graph_type"] for r in refs if r["propagation"] == "GraphProp"} == {"Spatial", "Semantic", "Mixed"}
  assert {r["propagation"] for r in refs} == {"GraphProp", "None", "Mean"}
  assert {r["token_scale"] for r in refs} == {True, False}
  assert {c["class_token"] for c in seen} == {True, False}
  assert all(c["min_margin"] > 1e-4 for c in seen)
  sparse = [c for c in seen if c["reference_kwargs"]["sparsity"] < 1]
  assert {c["reference_kwargs"]["token_scale"] for c in sparse} == {True, False}
  assert all(c["min_sparsity_gap"] > 1e-4 and len(c["sparsity_k_per_layer"]) == 4 for c in sparse)
  assert all(f"sparsity={c['reference_kwargs']['sparsity']}" in c["ours"] for c in sparse)


# --- NumPy reference of the equations ------------------------------------------------------------------------

def np_graph(embed, grid, kind, num_neighbours):
  """Normalised patch graph of the encoder input, by loops (reference forward_features)."""
  m = embed.shape[0]
  h, w = grid
  spatial = np.zeros((m, m), np.int64)
  for p in range(m):
    for q in range(m):
      if p != q and abs(p // w - q // w) <= 1 and abs(p % w - q % w) <= 1:
        spatial[p, q] = 1
  e = embed / np.linalg.norm(embed, axis=-1, keepdims=True)
  cos = e @ e.T
  semantic = np.zeros((m, m), np.int64)
  for p in range(m):
    order = np.argsort(-cos[p], kind="stable")
    semantic[p, order[:num_neighbours + 1]] = 1  # self plus its num_neighbours nearest
    semantic[p, p] -= 1
  g = {"Spatial": spatial, "Semantic": semantic, "Mixed": semantic | spatial}[kind].astype(np.float64)
  d = g.sum(1) ** -0.5
  return d[:, None] * g * d[None, :]


def np_significance(attn, protected):
  """MixedAttnMax over the reducible slots: max_h A[j, j] * max_h sum_i A[i, j]."""
  n = attn.shape[-1]
  return np.array([attn[:, j, j].max() * attn[:, :, j].sum(1).max() for j in range(protected, n)])


def np_gtp(x, origin, attn, ghat, num_prop, alpha, protected):
  """One GraphProp step on one example; origin[s] = original patch of slot s (reducible slots only)."""
  score = np_significance(attn, protected)
  order = np.argsort(-score, kind="stable")
  kept, prop = order[:len(order) - num_prop], order[len(order) - num_prop:]
  xr = x[protected:]
  w = ghat[np.ix_(origin[kept], origin[prop])]
  new = xr[kept] + alpha * w @ xr[prop]
  return np.concatenate([x[:protected], new]), origin[kept]


def fresh_state(seed, batch=2, protected=1, grid=(6, 6), d=16):
  n = protected + grid[0] * grid[1]
  tokens, signals = tokens_and_signals(batch=batch, n=n, d=d, protected=protected, seed=seed)
  tokens = tokens.replace(grid=grid)
  embed = Tokens.create(jax.random.normal(jax.random.key(seed + 100), (batch, n, d)), protected, grid)
  return tokens, signals.replace(encoder_input=embed)


@pytest.mark.parametrize("kind", ["Spatial", "Semantic", "Mixed"])
def test_two_steps_match_loop_reference(kind):
  """Two GraphProp steps: the second uses the first-step graph restricted to the survivors, unrenormalised."""
  tokens, signals = fresh_state(seed=7)
  steps = reducers.build_schedule(f"gtp:num_prop=5,graph_type={kind},num_neighbours=3,alpha=0.3", 2)
  out1 = reducers.apply(steps[0], tokens, signals)
  attn2 = jax.nn.softmax(3 * jax.random.normal(jax.random.key(9), (2, 2, out1.n, out1.n)), axis=-1)
  out2 = reducers.apply(steps[1], out1, signals.replace(attn=attn2, cls_attn=attn2[:, :, 0]))
  for b in range(2):
    ghat = np_graph(np.asarray(signals.encoder_input.x[b, 1:], np.float64), (6, 6), kind, 3)
    x1, origin1 = np_gtp(np.asarray(tokens.x[b], np.float64), np.arange(36), np.asarray(signals.attn[b]),
                         ghat, 5, 0.3, 1)
    assert_close(out1.x[b], x1, rtol=1e-5, atol=1e-5, err_msg=f"{kind} step 1, row {b}")
    x2, origin2 = np_gtp(np.asarray(out1.x[b], np.float64), origin1, np.asarray(attn2[b]), ghat, 5, 0.3, 1)
    assert_close(out2.x[b], x2, rtol=1e-5, atol=1e-5, err_msg=f"{kind} step 2, row {b}")
    # index: every survivor's original patch maps to its slot; propagated originals are dropped.
    idx = np.asarray(out2.index[b])
    np.testing.assert_array_equal(idx[1 + origin2], np.arange(1, out2.n))
    assert (idx >= 0).sum() == out2.n


def test_token_scales_follow_the_propagation():
  tokens, signals = fresh_state(seed=3)
  tokens = tokens.replace(size=jnp.asarray(np.random.default_rng(0).uniform(1, 2, (2, 37)), jnp.float32))
  step = reducers.build_schedule("gtp:num_prop=6,graph_type=Spatial,alpha=0.5,token_scale=True", 1)[0]
  assert reducers.get("gtp").prop_attn(step.config)
  out = reducers.apply(step, tokens, signals)
  ghat = np_graph(np.zeros((36, 4)) + 1.0, (6, 6), "Spatial", 1)
  for b in range(2):
    score = np_significance(np.asarray(signals.attn[b]), 1)
    order = np.argsort(-score, kind="stable")
    kept, prop = order[:30], order[30:]
    s = np.asarray(tokens.size[b, 1:], np.float64)
    assert_close(out.size[b, 1:], s[kept] + 0.5 * ghat[np.ix_(kept, prop)] @ s[prop], rtol=1e-5, atol=1e-6)
    assert_close(out.size[b, 0], tokens.size[b, 0])


def test_mean_propagation_appends_the_mean_and_keeps_sizes():
  tokens, signals = fresh_state(seed=4)
  step = reducers.build_schedule("gtp:num_prop=6,propagation=Mean,selection=CLSAttnMean", 1)[0]
  out = reducers.apply(step, tokens, signals)
  assert out.n == 37 - 6 + 1
  for b in range(2):
    score = np.asarray(signals.attn[b, :, 0, 1:]).mean(0)
    order = np.argsort(-score, kind="stable")
    kept, prop = order[:30] + 1, order[30:] + 1
    assert_close(out.x[b, 1:31], tokens.x[b, kept])
    assert_close(out.x[b, 31], np.asarray(tokens.x[b, prop]).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.index[b])[prop], 31)
  np.testing.assert_allclose(np.asarray(out.size).sum(1), 37)


def test_invalid_slots_are_propagated_first_and_carry_nothing():
  tokens, signals = fresh_state(seed=5)
  mask = np.ones((2, 37), bool)
  mask[:, [4, 9, 30]] = False
  tokens = tokens.replace(mask=jnp.asarray(mask), x=tokens.x.at[:, [4, 9, 30]].set(1e6))
  step = reducers.build_schedule("gtp:num_prop=5,graph_type=Spatial,alpha=1.0", 1)[0]
  out = reducers.apply(step, tokens, signals)
  assert np.asarray(out.mask).all()
  assert (np.asarray(out.index)[:, [4, 9, 30]] == -1).all()
  assert np.abs(np.asarray(out.x)).max() < 1e3  # the huge invalid features were not propagated


def test_graph_primitives():
  tokens, _ = fresh_state(seed=6)
  perm = jnp.asarray(np.stack([np.r_[0, np.random.default_rng(b).permutation(36)[:20] + 1] for b in range(2)]))
  sub = tokens.gather(perm)
  np.testing.assert_array_equal(np.asarray(graph.slot_origin(sub)), np.asarray(perm))
  adj = np.asarray(graph.grid_adjacency(jnp.arange(12), jnp.arange(12), (3, 4)))
  assert adj.sum(1).tolist() == [3, 5, 5, 3, 5, 8, 8, 5, 3, 5, 5, 3] and not adj.diagonal().any()
  scores = jnp.asarray([[0.1, 0.5, 0.5, 0.2, 0.9]])
  np.testing.assert_array_equal(np.asarray(graph.at_least_kth_largest(scores, 2)), [[0, 1, 1, 0, 1]])  # ties kept
  assert_close(graph.inverse_sqrt_degree(jnp.asarray([[1, 1, 1, 1], [0, 0, 0, 0]])), [0.5, 0.0])


def test_model_forward_counts_and_is_finite():
  from helpers import images, random_params, tiny_vit
  model = tiny_vit(reduce="gtp:num_prop=3-0-5-4,num_neighbours=4,token_scale=True")
  steps, counts = model.plan((56, 56))
  assert [c.n_mlp for c in counts] == [47, 47, 42, 38]
  logits, aux = jax.jit(model.apply)(random_params(model), images())
  assert np.isfinite(np.asarray(logits)).all() and aux["tokens"].n == 38


# --- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("gtp", "num_prop=None: required"),
    ("gtp:num_prop=0", "propagates nothing"),
    ("gtp:num_prop=-2", r"num_prop at block 0 = -2: must be an int >= 0"),
    ("gtp:num_prop=4-4", "one per block, depth=4"),
    ("gtp:num_prop=4-4-4-4,layers=1", "layers only with an int"),
    ("gtp:num_prop=4,layers=7", r"in \[0, 4\)"),
    ("gtp:num_prop=4,selection=Random", "selection='Random': must be one of"),
    ("gtp:num_prop=4,propagation=Sum", "propagation='Sum'"),
    ("gtp:num_prop=4,graph_type=None", "graph_type='None'"),
    ("gtp:num_prop=4,sparsity=0", r"sparsity=0: must be a number in \(0, 1\]"),
    ("gtp:num_prop=4,sparsity=1.5", r"sparsity=1.5: must be a number in \(0, 1\]"),
    ("gtp:num_prop=4,sparsity=-0.3", r"sparsity=-0.3: must be"),
    ("gtp:num_prop=4,sparsity=nan", r"sparsity='nan': must be"),
    ("gtp:num_prop=4,sparsity=True", r"sparsity=True: must be"),
    ("gtp:num_prop=4,num_neighbours=0", "num_neighbours=0"),
    ("gtp:num_prop=4,alpha=nan", "alpha="),
    ("gtp:num_prop=4,token_scale=True,propagation=None", "token_scale=True: needs propagation=GraphProp"),
    ("gtp:num_prop=4,foo=1", "unknown argument"),
])
def test_bad_specs_fail_with_clear_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)


def test_count_out_of_range_fails_at_plan():
  from helpers import tiny_vit
  with pytest.raises(ValueError, match=r"gtp at block 2: gtp num_prop=20: must be in \[1, 9\]"):
    tiny_vit(reduce="gtp:num_prop=20,layers=0-1-2").plan((56, 56))


def test_missing_signals_fail_clearly():
  tokens, signals = fresh_state(seed=8)
  step = reducers.build_schedule("gtp:num_prop=4", 1)[0]
  with pytest.raises(ValueError, match="needs signals.attn"):
    reducers.apply(step, tokens, signals.replace(attn=None))
  with pytest.raises(ValueError, match="needs signals.encoder_input"):
    reducers.apply(step, tokens, signals.replace(encoder_input=None))
  with pytest.raises(ValueError, match="needs the original patch grid"):
    spatial = reducers.build_schedule("gtp:num_prop=4,graph_type=Spatial", 1)[0]
    reducers.apply(spatial, tokens.replace(grid=None), signals.replace(encoder_input=None))
  with pytest.raises(ValueError, match=r"num_neighbours=40: must be in \[1, 35\]"):
    reducers.apply(reducers.build_schedule("gtp:num_prop=4,num_neighbours=40", 1)[0], tokens, signals)


def test_cls_selection_without_prefix_fails():
  tokens, signals = fresh_state(seed=9, protected=0)
  step = reducers.build_schedule("gtp:num_prop=4,selection=CLSAttnMax,graph_type=Spatial", 1)[0]
  with pytest.raises(ValueError, match="no prefix token"):
    reducers.apply(step, tokens, signals)


# --- attention sparsification (sparsity < 1) -----------------------------------------------------------------

def np_sparsify(probs, mask, sparsity):
  """Loop reference of the reference's eval rule: per (example, head), t = kthvalue of the n x n probabilities
  of the valid tokens, k = int(n*n*(1 - sparsity)); entries < t become 0; k = 0 leaves the head as it is."""
  out = np.array(probs, np.float32)
  for b in range(probs.shape[0]):
    valid = np.flatnonzero(mask[b])
    n = len(valid)
    k = int(n * n * (1 - sparsity))
    for h in range(probs.shape[1]):
      if k == 0:
        continue
      t = sorted(probs[b, h][np.ix_(valid, valid)].ravel().tolist())[k - 1]
      for i in range(probs.shape[2]):
        for j in range(probs.shape[3]):
          if probs[b, h, i, j] < t:
            out[b, h, i, j] = 0.0
  return out


def random_probs(seed, batch=3, heads=2, n=11, mask=None, quantum=None):
  from tokcomp.attention import masked_softmax
  logits = 2 * jax.random.normal(jax.random.key(seed), (batch, heads, n, n))
  mask = np.ones((batch, n), bool) if mask is None else mask
  probs = np.asarray(masked_softmax(logits, jnp.asarray(mask)[:, None, None, :]))
  if quantum:  # many exact ties, also at the threshold
    probs = (np.round(probs / quantum) * quantum).astype(np.float32)
  return probs, mask


@pytest.mark.parametrize("sparsity", [0.7, 0.5, 0.95, 0.1])
def test_sparsify_matches_loop_reference(sparsity):
  from tokcomp.attention import sparsify_probs
  mask = np.ones((3, 11), bool)
  mask[1, [2, 7, 8]] = False          # an example with 8 valid tokens: n = 8 there, invalid keys do not count
  mask[2, 5:] = False
  for quantum in (None, 1 / 64):
    probs, _ = random_probs(seed=int(sparsity * 100), mask=mask, quantum=quantum)
    ours = np.asarray(jax.jit(sparsify_probs, static_argnums=2)(jnp.asarray(probs), jnp.asarray(mask), sparsity))
    np.testing.assert_array_equal(ours, np_sparsify(probs, mask, sparsity))
    assert (ours[~np.broadcast_to(mask[:, None, None, :], ours.shape)] == 0).all()  # invalid keys stay 0
  # Distinct values: exactly k - 1 of the valid n x n entries become 0 per head (the kth value itself stays).
  probs, _ = random_probs(seed=1, mask=mask)
  ours = np.asarray(sparsify_probs(jnp.asarray(probs), jnp.asarray(mask), sparsity))
  for b, n in enumerate(mask.sum(1)):
    k = int(n * n * (1 - sparsity))
    pair = mask[b][:, None] & mask[b][None, :]
    for h in range(2):
      assert ((ours[b, h] == 0) & (probs[b, h] != 0) & pair).sum() == max(k - 1, 0)


def test_sparsify_edge_counts():
  from tokcomp.attention import sparsify_probs
  probs, mask = random_probs(seed=3, n=10)
  # k = int(100 * (1 - 0.999)) = 0: the reference's kthvalue(k=0) raises; we zero nothing (the limit θ -> 1).
  assert int(10 * 10 * (1 - 0.999)) == 0
  np.testing.assert_array_equal(np.asarray(sparsify_probs(jnp.asarray(probs), jnp.asarray(mask), 0.999)), probs)
  # k = 1: the threshold is the minimum, nothing is below it.
  assert int(10 * 10 * (1 - 0.99)) == 1
  np.testing.assert_array_equal(np.asarray(sparsify_probs(jnp.asarray(probs), jnp.asarray(mask), 0.99)), probs)
  # sparsity = 1 is the identity; a fully masked example (n = 0) is left alone.
  np.testing.assert_array_equal(np.asarray(sparsify_probs(jnp.asarray(probs), jnp.asarray(mask), 1.0)), probs)
  empty = mask.copy()
  empty[0] = False
  out = np.asarray(sparsify_probs(jnp.asarray(probs), jnp.asarray(empty), 0.5))
  np.testing.assert_array_equal(out[0], probs[0])
  assert (out[1:] == 0).sum() > 0
  for bad in (0, -0.1, 1.2, float("nan"), True):
    with pytest.raises(ValueError, match=r"sparsity=.*must be in \(0, 1\]"):
      sparsify_probs(jnp.asarray(probs), jnp.asarray(mask), bad)


def test_sparse_attention_output_and_signals():
  """Attention(sparsity=θ): y = out(Â v) with Â the sparsified (not renormalised) probabilities, which are
  also the attn / cls_attn signals; the bias (log token scales) comes before the sparsification."""
  from tokcomp.attention import Attention
  x = jax.random.normal(jax.random.key(0), (2, 9, 32))
  mask = jnp.asarray(np.array([[True] * 9, [True] * 6 + [False] * 3]))
  bias = jnp.log(jnp.asarray(np.random.default_rng(0).uniform(0.5, 2, (2, 9)), jnp.float32))
  attn = Attention(num_heads=4, sparsity=0.7)
  params = attn.init(jax.random.key(1), x, mask)
  y, sig = attn.apply(params, x, mask, bias, signals=("cls_attn", "attn"))
  p = {k: {n: np.asarray(a, np.float64) for n, a in v.items()} for k, v in params["params"].items()}
  xx = np.asarray(x, np.float64)
  proj = lambda name: np.einsum("bnd,dhk->bnhk", xx, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query"), proj("key"), proj("value")
  logits = np.einsum("bqhk,bnhk->bhqn", q, k) / np.sqrt(8) + np.asarray(bias, np.float64)[:, None, None]
  logits = np.where(np.asarray(mask)[:, None, None, :], logits, -np.inf)
  dense = np.exp(logits - logits.max(-1, keepdims=True))
  dense = dense / dense.sum(-1, keepdims=True)
  # The dense fp32 probabilities of the same module (sparsity None), checked against fp64, then sparsified by
  # the loop reference: same zero pattern, same surviving values (not renormalised).
  _, dense_sig = Attention(num_heads=4).apply(params, x, mask, bias, signals=("attn",))
  assert_close(dense_sig.attn, dense, rtol=1e-5, atol=1e-7)
  sparse_ref = np_sparsify(np.asarray(dense_sig.attn), np.asarray(mask), 0.7)
  np.testing.assert_array_equal(np.asarray(sig.attn) == 0, sparse_ref == 0)
  assert_close(sig.attn, sparse_ref, rtol=1e-6, atol=1e-7)
  pair = np.asarray(mask)[:, None, :, None] & np.asarray(mask)[:, None, None, :]
  zeroed = ((np.asarray(sig.attn) == 0) & pair).sum((2, 3))  # [B, H]: k - 1 of the valid n x n entries
  np.testing.assert_array_equal(zeroed, [[int(81 * (1 - 0.7)) - 1] * 4, [int(36 * (1 - 0.7)) - 1] * 4])
  assert_close(sig.cls_attn, np.asarray(sig.attn)[:, :, 0])
  y_ref = np.einsum("bhqn,bnhk,hkd->bqd", np.asarray(sig.attn, np.float64), v, p["out"]["kernel"]) + p["out"]["bias"]
  assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="sparsity=0.7 cannot be combined with probs=, policy= or pair_mask="):
    attn.apply(params, x, mask, policy=jnp.ones((2, 9)))


def test_sparsity_one_keeps_the_dense_fused_path():
  """sparsity=1 (the default) is no attention change at all: the same program as without the argument, with
  the fused dot_product_attention and no N^2 sort; sparsity < 1 does change it (so this test can fail)."""
  from tokcomp.attention import Attention
  from helpers import images, random_params, tiny_vit
  x, mask = jnp.ones((2, 9, 32)), jnp.ones((2, 9), bool)
  params = Attention(num_heads=4).init(jax.random.key(1), x, mask)
  jaxpr = lambda s: str(jax.make_jaxpr(lambda p: Attention(num_heads=4, sparsity=s).apply(p, x, mask))(params))
  assert jaxpr(1.0) == jaxpr(None) and "sort" not in jaxpr(None)
  assert "sort" in jaxpr(0.7)
  assert reducers.attention_sparsity(reducers.build_schedule("gtp:num_prop=3,sparsity=1", 4)) is None
  assert reducers.attention_sparsity(reducers.build_schedule("gtp:num_prop=3,layers=2,sparsity=0.6", 4)) == 0.6
  model = tiny_vit(reduce="gtp:num_prop=3")
  params = random_params(model)
  program = lambda spec: str(jax.make_jaxpr(model.clone(reduce=spec).apply)(params, images()))
  assert program("gtp:num_prop=3,sparsity=1") == program("gtp:num_prop=3")
  assert program("gtp:num_prop=3,sparsity=0.7") != program("gtp:num_prop=3")


def test_sparsity_applies_to_every_block_and_compiles_once():
  """As the reference, θ reaches every block's attention, also blocks where gtp propagates nothing."""
  from flax import linen as nn
  from helpers import count_compiles, images, random_params, tiny_vit
  from tokcomp.models.vit import Encoder1DBlock
  model = tiny_vit(reduce="gtp:num_prop=3,layers=3,sparsity=0.7")
  params = random_params(model)
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, Encoder1DBlock) and context.method_name == "__call__":
      seen[context.module.name] = (args[0], out, context.module.attn_sparsity)
    return out

  with nn.intercept_methods(record):
    model.apply(params, images())
  assert {name: s for name, (_, _, s) in seen.items()} == {f"encoderblock_{i}": 0.7 for i in range(4)}
  tiny = dict(num_heads=model.num_heads, mlp_dim=model.mlp_dim)
  for i in range(3):  # no gtp step in blocks 0-2: the block alone with attn_sparsity=0.7 gives the same output
    tokens_in, tokens_out, _ = seen[f"encoderblock_{i}"]
    block_params = {"params": params["params"]["Transformer"][f"encoderblock_{i}"]}
    alone = Encoder1DBlock(**tiny, attn_sparsity=0.7).apply(block_params, tokens_in)
    dense = Encoder1DBlock(**tiny).apply(block_params, tokens_in)
    assert_close(alone.x, tokens_out.x, rtol=1e-6, atol=1e-6, err_msg=f"block {i}")
    assert np.abs(np.asarray(dense.x) - np.asarray(tokens_out.x)).max() > 1e-3
  run, traces = count_compiles(model.apply)
  for seed in range(3):
    logits, aux = run(params, images(seed=seed))
    assert np.isfinite(np.asarray(logits)).all() and aux["tokens"].n == 47
  assert traces() == 1


def test_different_sparsities_in_one_schedule_fail():
  steps = reducers.build_schedule("gtp:num_prop=3,layers=0,sparsity=0.7+gtp:num_prop=3,layers=2,sparsity=0.8", 4)
  with pytest.raises(ValueError, match="different attention sparsities"):
    reducers.attention_sparsity(steps)

"""PatchMerger (tokcomp/reducers/patchmerger.py): the merge against a loop-based NumPy reference of the paper's
Y = softmax(Wᵀ LN(X)ᵀ) X (no official code is public), its bookkeeping, the whole ViT, gradients, errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close, images, random_params, tiny_vit, tokens_and_signals
from tokcomp import reducers, schedules


def np_layer_norm(v, scale, bias, eps):
  mu = v.mean()
  var = ((v - mu) ** 2).mean()
  return (v - mu) / np.sqrt(var + eps) * scale + bias


def np_patchmerger(x, valid, protected, norm, kernel):
  """One example: x [N, D], valid [N]; returns (the new x [P + M, D], the weights [M, N - P])."""
  n, m = x.shape[0], kernel.shape[1]
  rows = range(protected, n)
  score = np.full((m, n - protected), -np.inf)
  for j in range(m):
    for i in rows:
      if valid[i]:
        h = np_layer_norm(x[i], norm["scale"], norm["bias"], 1e-6)
        score[j, i - protected] = sum(kernel[d, j] * h[d] for d in range(x.shape[1]))
  weights = np.zeros_like(score)
  out = [x[i] for i in range(protected)]
  for j in range(m):
    top = max(score[j])
    e = [np.exp(s - top) if np.isfinite(s) else 0.0 for s in score[j]]
    weights[j] = np.array(e) / sum(e)
    out.append(sum(weights[j, i] * x[protected + i] for i in range(n - protected)))
  return np.stack(out), weights


def merge_with_params(spec, tokens, signals, seed=0):
  step = [s for s in schedules.resolve(reducers.build_schedule(spec, 4), tokens.num_original,
                                       tokens.num_protected)[0] if s is not None][0]
  module = reducers.module(step)
  params = jax.jit(module.init)(jax.random.key(seed), tokens, signals)  # jitted: eager init is op by op
  leaves, tree = jax.tree_util.tree_flatten(params)  # perturb the LayerNorm too, so every parameter matters
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_unflatten(tree, [l + 0.3 * rng.normal(size=l.shape) for l in leaves])
  return jax.jit(module.apply)(params, tokens, signals), jax.tree_util.tree_map(np.asarray, params["params"])


@pytest.mark.parametrize("n,protected,m,masked", [(37, 1, 7, 0), (26, 0, 5, 0), (31, 2, 9, 4), (20, 1, 19, 0)])
def test_merge_matches_loop_reference(n, protected, m, masked):
  tokens, signals = tokens_and_signals(batch=2, n=n, d=8, protected=protected, seed=n)
  if masked:  # an earlier reducer left invalid slots at the end: they take no part in the merge
    tokens = tokens.replace(mask=tokens.mask.at[:, n - masked:].set(False),
                            index=jnp.where(tokens.index >= n - masked, -1, tokens.index))
  out, params = merge_with_params(f"patchmerger:tokens={m},layer=0", tokens, signals, seed=n)
  x, valid = np.asarray(tokens.x, np.float64), np.asarray(tokens.mask)
  assert out.n == protected + m and np.asarray(out.mask).all() and out.grid is None
  for b in range(2):
    want, weights = np_patchmerger(x[b], valid[b], protected, params["norm"], params["queries"]["kernel"])
    assert_close(out.x[b], want, rtol=1e-5, atol=1e-5, err_msg=f"row {b}")
    # index: every original token sits in the output its slot feeds most; sizes count them.
    dom = np.argmax(weights, axis=0) + protected
    idx = np.asarray(out.index[b])
    for p in range(tokens.num_original):
      want_slot = p if p < protected else (dom[p - protected] if valid[b, p] else -1)
      assert idx[p] == want_slot, (b, p)
    np.testing.assert_array_equal(np.asarray(out.size[b]), np.bincount(idx[idx >= 0], minlength=out.n))


def test_outputs_are_convex_combinations():
  tokens, signals = tokens_and_signals(batch=2, n=21, d=8, protected=1, seed=1)
  same = jnp.broadcast_to(jnp.arange(8.0), (2, 20, 8))  # identical patches: every merged token equals them
  tokens = tokens.replace(x=tokens.x.at[:, 1:].set(same))
  out, _ = merge_with_params("patchmerger:tokens=4,layer=0", tokens, signals)
  assert_close(out.x[:, 1:], jnp.broadcast_to(jnp.arange(8.0), (2, 4, 8)), rtol=1e-5, atol=1e-5)
  assert_close(out.x[:, 0], tokens.x[:, 0], rtol=0, atol=0)  # the prefix is passed through bit for bit


@pytest.mark.parametrize("pool,class_token", [("token", True), ("gap", False)])
def test_whole_vit_compiles_once(pool, class_token):
  model = tiny_vit(reduce="patchmerger:tokens=5,layer=2", pool=pool, class_token=class_token)
  prefix = int(class_token)
  _, counts = model.plan((56, 56))
  assert [c.n_attn for c in counts] == [prefix + 49] * 2 + [prefix + 5] * 2
  params = random_params(model)
  own = params["params"]["Transformer"]["encoderblock_2"]["patchmerger"]
  assert own["queries"]["kernel"].shape == (64, 5) and set(own) == {"norm", "queries"}
  fn = jax.jit(chex.assert_max_traces(lambda p, x: model.apply(p, x), n=1))
  for seed in (0, 1):
    logits, aux = fn(params, images(seed=seed))
    assert logits.shape == (3, 10) and np.isfinite(np.asarray(logits)).all()
    assert aux["tokens"].n == prefix + 5
    idx = np.asarray(aux["tokens"].index)
    assert (idx >= 0).all() and (idx < prefix + 5).all()
  chex.clear_trace_counter()


def test_training_pass_is_the_inference_map_and_trains_the_queries():
  model = tiny_vit(reduce="patchmerger:tokens=4,layer=1", depth=2, width=32, mlp_dim=64)
  params = random_params(model)
  x = images(batch=2)
  train = jax.jit(lambda p: model.apply(p, x, train=True))
  (logits_train, aux), logits = train(params), jax.jit(lambda p: model.apply(p, x)[0])(params)
  assert aux["tokens"].n == 5
  assert_close(logits_train, logits, rtol=1e-6, atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(train(p)[0] ** 2)))(params)
  own = grads["params"]["Transformer"]["encoderblock_1"]["patchmerger"]
  for leaf in jax.tree_util.tree_leaves(own):
    assert np.abs(np.asarray(leaf)).sum() > 0


@pytest.mark.parametrize("spec,match", [
    ("patchmerger:tokens=0", r"tokens=0: must be an int >= 1"),
    ("patchmerger:tokens=2.5", r"tokens=2.5: must be an int >= 1"),
    ("patchmerger:tokens=True", r"tokens=True: must be an int >= 1"),
    ("patchmerger:tokens=50,layer=1", r"tokens=50: must be in \[1, 49\]"),
    ("patchmerger:tokens=8,layer=4", r"patchmerger layer entry 4: must be a block index in \[0, 4\)"),
    ("patchmerger:tokens=8,layer=1-2", r"layer='1-2': must be one block index in \[0, 4\)"),
    ("patchmerger:tokens=8,keep=0.5", r"unknown argument.*\['keep'\]"),
])
def test_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    tiny_vit(reduce=spec).plan((56, 56))


def test_default_layer_is_halfway():
  steps = reducers.build_schedule("patchmerger:tokens=8", 12)
  assert [i for i, s in enumerate(steps) if s is not None] == [6] and steps[6].slot == "pre"

"""TokenLearner v1.1 and v1 (tokcomp/reducers/tokenlearner.py) and TokenFuser (tokcomp/reducers/tokenfuser.py): parity
with scenic's modules on the same weights, the placement in the ViT, the index/size bookkeeping, masks,
gradients, compile-once, and errors.

Goldens: tests/goldens/tokenlearner_{v11,v1,fuser}_*.npz from tools/goldens/make_tokenlearner.py
(google-research/scenic @ 4a38d47, `TokenLearnerModuleV11`, `TokenLearnerModule` and `TokenFuser`, fp32,
inference).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load, run_with_blocks
from helpers import apply_step, assert_close, images, random_params, tiny_vit, tokens_and_signals
from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.models.vit import Encoder1DBlock
from tokcomp.reducers.tokenfuser import TokenFuser
from tokcomp.reducers.tokenlearner import Config, TokenLearner
from tokcomp.tokens import Tokens

LEARNER_CASES = ["tokenlearner_v11_n49", "tokenlearner_v11_n45"]
V1_CASES = ["tokenlearner_v1_n49", "tokenlearner_v1_n25"]
FUSER_CASES = ["tokenlearner_fuser_n49", "tokenlearner_fuser_n37"]


def nest(state):
  """{"a/b/c": array} -> {"a": {"b": {"c": array}}}."""
  out = {}
  for path, v in state.items():
    *parents, leaf = path.split("/")
    d = out
    for k in parents:
      d = d.setdefault(k, {})
    d[leaf] = jnp.asarray(v)
  return out


def learner_from_golden(name):
  config, state, g = load(name)
  if config["kind"] == "learner_v1":
    cfg = Config(num_tokens=config["tokens"], version="1", pool="sum" if config["sum_pooling"] else "mean")
  else:
    cfg = Config(num_tokens=config["tokens"], bottleneck=config["bottleneck"])
  return TokenLearner(cfg), {"params": nest(state)}, g


@pytest.mark.parametrize("name", LEARNER_CASES + V1_CASES)
@pytest.mark.parametrize("protected", [0, 1])
def test_learner_matches_scenic(name, protected):
  module, params, g = learner_from_golden(name)
  x = jnp.asarray(g["x"])
  prefix = jax.random.normal(jax.random.key(5), (x.shape[0], protected, x.shape[2]))
  side = int(round(np.sqrt(x.shape[1])))  # the v1.1 cases need no grid (n45 has none); the v1 ones are square
  grid = (side, side) if side * side == x.shape[1] else None
  tokens = Tokens.create(jnp.concatenate([prefix, x], axis=1), protected, grid=grid)
  # The parameter tree is scenic's own: the same names and shapes as ours.
  ours = module.init(jax.random.key(0), tokens, Signals())
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(params)
  out = jax.jit(lambda p, t: module.apply(p, t, Signals()))(params, tokens)
  s = g["out"].shape[1]
  assert out.n == protected + s
  assert_close(out.x[:, protected:], g["out"], rtol=1e-5, atol=1e-5, err_msg="learned tokens")
  np.testing.assert_array_equal(np.asarray(out.x[:, :protected]), np.asarray(prefix))  # the prefix untouched
  # index: every patch sits in the learned slot that weighs it most (margins > 1e-4 in the golden).
  assert float(g["min_margin"]) > 1e-4
  home = protected + np.argmax(g["weights"], axis=1)
  np.testing.assert_array_equal(np.asarray(out.index[:, protected:]), home)
  np.testing.assert_array_equal(np.asarray(out.index[:, :protected]), np.tile(np.arange(protected), (3, 1)))
  counts = np.stack([np.bincount(row, minlength=protected + s) for row in home])[:, protected:]
  np.testing.assert_array_equal(np.asarray(out.size[:, protected:]), counts)
  np.testing.assert_array_equal(np.asarray(out.size[:, :protected]), 1.0)
  assert np.asarray(out.mask).all() and out.grid is None


@pytest.mark.parametrize("name", V1_CASES)
def test_v1_flops_count_every_conv(name):
  """Method.flops for v1 = 2 MACs per kernel weight at every grid position, for each conv in the parameter tree
  (so a conv the count forgot fails), plus the S weighted sums."""
  config, state, g = load(name)
  _, params, _ = learner_from_golden(name)
  n, c = g["x"].shape[1:]
  convs = [k for k in state if k.endswith("/kernel") and k.startswith("Conv_")]
  assert len(convs) == 4
  expect = sum(2.0 * n * state[k].size for k in convs) + 2.0 * n * config["tokens"] * c
  step = reducers.build_schedule(f"tokenlearner:tokens={config['tokens']},layer=0,version=1", 2)[0]
  assert reducers.get("tokenlearner").flops(step.config, 1 + n, 1, c) == expect


def test_v1_in_the_vit_flops_and_gradients():
  """v1 before block 2 of the tiny ViT (7x7 grid + CLS): counts, FLOPs = dense-at-those-counts + the learner's,
  and gradients reach every conv."""
  from tokcomp import schedules
  model = tiny_vit(reduce="tokenlearner:tokens=5,layer=2,version=1,pool=mean")
  _, counts = model.plan((56, 56))
  assert [(c.n_attn, c.n_mlp) for c in counts] == [(50, 50), (50, 50), (6, 6), (6, 6)]
  params = random_params(model)
  own = params["params"]["Transformer"]["encoderblock_2"]["tokenlearner"]
  assert set(own) == {"LayerNorm_0", "Conv_0", "Conv_1", "Conv_2", "Conv_3"}
  assert own["Conv_0"]["kernel"].shape == (3, 3, model.width, 5) and "bias" not in own["Conv_0"]
  base = schedules.vit_flops(counts, model.width, model.mlp_dim, tuple(model.patch_size), 49, model.num_classes, 3)
  convs = 2.0 * 49 * 9 * 5 * (model.width + 3 * 5)
  np.testing.assert_allclose(model.flops((56, 56)), base + convs + 2.0 * 49 * 5 * model.width, rtol=1e-12)

  def loss(p):
    logits, aux = model.apply(p, images(batch=2), train=True)
    assert aux["tokens"].n == 6
    return jnp.sum(logits ** 2)
  grads = jax.jit(jax.grad(loss))(params)["params"]["Transformer"]["encoderblock_2"]["tokenlearner"]
  assert all(np.abs(np.asarray(l)).sum() > 0 for l in jax.tree_util.tree_leaves(grads))


def test_v1_masked_slots_get_no_weight():
  """On a full grid with some slots masked: the learned tokens are the unmasked run's maps summed over the
  valid slots only (mean: divided by their count)."""
  tokens, signals = tokens_and_signals(batch=2, n=26, d=8, protected=1)
  tokens = Tokens.create(tokens.x, 1, grid=(5, 5))
  for pool in ("sum", "mean"):
    module = TokenLearner(Config(num_tokens=3, version="1", pool=pool))
    params = random_params_for(module, tokens, std=0.1)
    keep = np.ones((2, 26), bool)
    keep[0, [2, 9]] = False
    run = jax.jit(lambda t: module.apply(params, t, Signals(), capture_intermediates=True))
    full, state = run(tokens)
    maps = jax.nn.sigmoid(state["intermediates"]["Conv_3"]["__call__"][0].reshape(2, 25, 3))  # [B, N, S]
    masked, _ = run(tokens.replace(mask=jnp.asarray(keep)))
    w = np.asarray(maps) * keep[:, 1:, None]
    if pool == "mean":
      w = w / keep[:, 1:].sum(axis=1)[:, None, None]
    assert_close(masked.x[:, 1:], np.einsum("bns,bnd->bsd", w, np.asarray(tokens.x[:, 1:])), atol=1e-5)
    assert not np.allclose(np.asarray(masked.x[0]), np.asarray(full.x[0]))


def test_v1_needs_the_full_grid():
  """After a merge the patches are off their grid: v1 says so, v1.1 takes them."""
  tokens, signals = tokens_and_signals(batch=2, n=37, d=16, protected=1)
  tokens = Tokens.create(tokens.x, 1, grid=(6, 6))
  merged = reducers.apply(reducers.build_schedule("tome:r=6", 4)[0], tokens, signals)
  assert merged.grid is None
  with pytest.raises(ValueError, match=r"version=1: its 3x3 convs need the patches on their full grid"):
    TokenLearner(Config(num_tokens=4, version="1")).init(jax.random.key(0), merged, signals)
  TokenLearner(Config(num_tokens=4)).init(jax.random.key(0), merged, signals)
  with pytest.raises(ValueError, match="full grid"):
    tiny_vit(reduce="tome:r=4-0-0-0+tokenlearner:tokens=4,layer=2,version=1").init(jax.random.key(0), images(batch=1))


@pytest.mark.parametrize("name", FUSER_CASES)
def test_fuser_matches_scenic(name):
  config, state, g = load(name)
  module = TokenFuser(bottleneck=config["bottleneck"], use_normalization=config["norm"])
  params = {"params": nest(state)}
  learned, original = jnp.asarray(g["x"]), jnp.asarray(g["original"])
  ours = module.init(jax.random.key(0), learned, original)
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(params)
  assert_close(module.apply(params, learned, original), g["out"], rtol=1e-5, atol=1e-5, err_msg=name)


def test_fuser_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"must be \[B, S, C\] and \[B, N, C\]"):
    TokenFuser().init(jax.random.key(0), jnp.zeros((2, 4, 8)), jnp.zeros((2, 9, 6)))


def test_learned_tokens_are_convex_combinations_of_the_valid_patches():
  """Masked slots get no weight: the result equals the learner run on the valid patches alone."""
  tokens, signals = tokens_and_signals(batch=2, n=21, d=8, protected=1)
  module = TokenLearner(Config(num_tokens=3, bottleneck=8))
  params = random_params_for(module, tokens)
  keep = np.ones((2, 21), bool)
  keep[0, [3, 7, 8]] = False
  keep[1, [20]] = False
  masked = tokens.replace(mask=jnp.asarray(keep))
  run = jax.jit(lambda t: module.apply(params, t, Signals()))
  out = run(masked)
  for b in range(2):
    ref = run(Tokens.create(tokens.x[b:b + 1, keep[b]], 1))
    assert_close(out.x[b], ref.x[0], rtol=1e-5, atol=1e-6, err_msg=f"row {b}")
    dropped = np.flatnonzero(~keep[b])
    assert (np.asarray(out.index[b, dropped]) == -1).all()
    assert float(out.size[b].sum()) == keep[b].sum()
  assert np.asarray(out.mask).all()


def random_params_for(module, tokens, std=0.5):
  params = jax.jit(module.init)(jax.random.key(1), tokens, Signals())
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [l + std * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def test_composes_with_an_earlier_merge():
  """After a merge, index composes through the learner and sizes still sum to the originals held."""
  tokens, signals = tokens_and_signals(batch=3, n=37, d=16, protected=1)
  merge = reducers.build_schedule("tome:r=6", 4)[0]
  learn = reducers.build_schedule("tokenlearner:tokens=5,layer=0", 4)[0]
  out = jax.jit(lambda t, s: apply_step(learn, reducers.apply(merge, t, s), s))(tokens, signals)
  assert out.n == 6
  size, index = np.asarray(out.size), np.asarray(out.index)
  for b in range(3):
    np.testing.assert_array_equal(np.bincount(index[b], minlength=6), size[b])


def test_placement_in_the_vit():
  """"pre" at block l: the learner runs on block l-1's output, then block l (no reducer) on prefix + S."""
  model = tiny_vit(reduce="tokenlearner:tokens=5,layer=2")
  _, counts = model.plan((56, 56))
  assert [(c.n_attn, c.n_mlp) for c in counts] == [(50, 50), (50, 50), (6, 6), (6, 6)]
  params = random_params(model)
  assert set(params["params"]["Transformer"]["encoderblock_2"]["tokenlearner"]) == {"LayerNorm_0", "token_masking"}
  logits, aux, blocks = run_with_blocks(model, params, images())
  assert np.isfinite(np.asarray(logits)).all() and aux["tokens"].n == 6
  block_params = params["params"]["Transformer"]["encoderblock_2"]
  learner, block = TokenLearner(Config(num_tokens=5)), Encoder1DBlock(num_heads=2, mlp_dim=128)
  dense_params = {k: v for k, v in block_params.items() if k != "tokenlearner"}
  expect = jax.jit(lambda t: block.apply({"params": dense_params}, learner.apply(
      {"params": block_params["tokenlearner"]}, t, Signals())))(blocks[1])
  assert_close(blocks[2].x, expect.x, rtol=1e-5, atol=1e-5)


def test_fuser_wraps_the_block():
  """"wrap" from block l on (the reference's EncoderModFuser): learner -> the block on prefix + S -> fuser, and
  the sequence is N again after every block."""
  from tokcomp.reducers.tokenfuser import TokenFuser
  model = tiny_vit(reduce="tokenfuser:tokens=5,layer=2")
  _, counts = model.plan((56, 56))
  assert [(c.n_attn, c.n_mlp) for c in counts] == [(50, 50), (50, 50), (6, 6), (6, 6)]
  params = random_params(model)
  logits, aux, blocks = run_with_blocks(model, params, images())
  assert np.isfinite(np.asarray(logits)).all() and aux["tokens"].n == 50 and blocks[2].n == 50
  for i in (2, 3):
    block_params = params["params"]["Transformer"][f"encoderblock_{i}"]
    own = block_params["tokenfuser"]
    dense_params = {k: v for k, v in block_params.items() if k != "tokenfuser"}
    learner, block = TokenLearner(Config(num_tokens=5)), Encoder1DBlock(num_heads=2, mlp_dim=128)

    def expected(t):
      y = block.apply({"params": dense_params}, learner.apply({"params": own["learner"]}, t, Signals()))
      fused = TokenFuser().apply({"params": own["fuser"]}, y.x[:, 1:], t.x[:, 1:])
      return jnp.concatenate([y.x[:, :1], t.x[:, 1:] + fused], axis=1)
    assert_close(blocks[i].x, jax.jit(expected)(blocks[i - 1]), rtol=1e-5, atol=1e-5, err_msg=f"block {i}")
    np.testing.assert_array_equal(blocks[i].index, blocks[i - 1].index)  # the slots are the input's again


def test_whole_model_compiles_once_and_trains_with_gradients():
  model = tiny_vit(reduce="tokenlearner:tokens=7,layer=1,slot=mid")
  _, counts = model.plan((56, 56))
  assert [(c.n_attn, c.n_mlp) for c in counts] == [(50, 50), (50, 8), (8, 8), (8, 8)]
  params = random_params(model)
  infer = jax.jit(chex.assert_max_traces(lambda p, x: model.apply(p, x), n=1))
  for seed in (0, 1):
    logits, aux = infer(params, images(seed=seed))
    assert aux["tokens"].n == 8 and np.isfinite(np.asarray(logits)).all()
  chex.clear_trace_counter()

  def loss(p):  # the differentiable path is the same in training (no policy, no rng)
    logits, aux = model.apply(p, images(batch=2), train=True)
    assert aux["tokens"].n == 8
    return jnp.sum(logits ** 2)
  grads = jax.jit(jax.grad(loss))(params)["params"]["Transformer"]["encoderblock_1"]["tokenlearner"]
  assert all(np.abs(np.asarray(l)).sum() > 0 for l in jax.tree_util.tree_leaves(grads))


def test_default_layer_and_tokens():
  steps = reducers.build_schedule("tokenlearner", 12)
  assert [i for i, s in enumerate(steps) if s is not None] == [9]
  assert steps[9].config == Config(num_tokens=8, bottleneck=64, version="1.1") and steps[9].slot == "pre"
  v1 = reducers.build_schedule("tokenlearner:version=1", 12)[9].config
  assert (v1.version, v1.pool) == ("1", "sum")


@pytest.mark.parametrize("spec, match", [
    ("tokenlearner:tokens=0", r"tokens=0: must be an int >= 1"),
    ("tokenlearner:tokens=2.5", r"tokens=2.5: must be an int >= 1"),
    ("tokenlearner:tokens=50,layer=1", r"tokens=50: must be in \[1, 49\]"),
    ("tokenlearner:layer=4", r"layer=4: must be one block index in \[0, 4\)"),
    ("tokenlearner:layer=1-2", r"must be one block index"),
    ("tokenlearner:bottleneck=0", r"bottleneck=0: must be an int >= 1"),
    ("tokenlearner:slot=post", r"slot='post': must be one of"),
    ("tokenlearner:keep=0.5", r"unknown argument"),
    ("tokenlearner:version=2", r"version=2: must be one of \('1', '1.1'\)"),
    ("tokenlearner:version=1,bottleneck=32", r"bottleneck=32: v1.1 only"),
    ("tokenlearner:pool=mean", r"pool='mean': v1 only"),
    ("tokenlearner:version=1,pool=max", r"pool='max': must be one of \('sum', 'mean'\)"),
])
def test_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    tiny_vit(reduce=spec).plan((56, 56))


def test_direct_call_errors():
  tokens, signals = tokens_and_signals(batch=2, n=9, d=8, protected=1)
  module = TokenLearner(Config(num_tokens=9))
  with pytest.raises(ValueError, match=r"tokens=9: must be in \[1, 8\]"):
    module.init(jax.random.key(0), tokens, signals)
  with pytest.raises(ValueError, match="training keep policy"):
    TokenLearner(Config(num_tokens=3)).init(jax.random.key(0), tokens.replace(policy=jnp.ones((2, 9))), signals)

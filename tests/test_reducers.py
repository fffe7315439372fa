"""Every registered reducer: the contract (jit once, batch > 1, odd N, finite, declared count), plus
loop-based NumPy references for ToMe's matching and EViT's fusion."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import apply_step, assert_close, tokens_and_signals
from tokcomp import reducers, schedules
from tokcomp.ops.merge import bipartite_soft_matching
from tokcomp.reducers import keep
from tokcomp.tokens import Tokens


def example_step(name, depth=4):
  steps, _ = schedules.resolve(reducers.build_schedule(reducers.get(name).example, depth), 37, 1)
  steps = [s for s in steps if s is not None]
  assert steps, f"{name}: example {reducers.get(name).example!r} reduces nothing"
  return steps[0]


def example_tokens(name, seed, batch=3):
  tokens, signals = tokens_and_signals(batch=batch, n=37, protected=1, seed=seed)
  return tokens.replace(grid=(6, 6)), signals  # CLS + a 6 x 6 patch grid, as fresh from the embedding


@pytest.mark.parametrize("name", reducers.names())
def test_reducer_contract(name):
  step = example_step(name)
  method = reducers.get(name)
  def reduce(tokens, signals):
    return apply_step(step, tokens, signals)

  fn = jax.jit(chex.assert_max_traces(reduce, n=1))
  expected = method.out_count(step.config, 37, 1)
  outs = []
  for seed in (0, 1):  # same shapes, new data: must not retrace
    tokens, signals = example_tokens(name, seed)
    out = fn(tokens, signals)
    assert out.x.shape == (3, expected, 16)
    assert out.index.shape == (3, 37)
    assert np.isfinite(np.asarray(out.x)).all()
    assert (np.asarray(out.index) < expected).all()
    # The prefix stays first, untouched by any reducer.
    assert_close(out.x[:, 0], tokens.x[:, 0])
    np.testing.assert_array_equal(np.asarray(out.index)[:, 0], 0)
    # Sizes still account for every original token that a slot holds.
    held = np.asarray(out.index >= 0).sum(1)
    np.testing.assert_allclose(np.asarray(jnp.where(out.mask, out.size, 0)).sum(1), held)
    outs.append(out)
  assert not np.allclose(outs[0].x, outs[1].x)
  chex.clear_trace_counter()


@pytest.mark.parametrize("name", reducers.names())
def test_reducer_rows_are_independent(name):
  """Batch > 1 means each example is reduced on its own: row b of a batch == the batch of row b alone."""
  step = example_step(name)
  tokens, signals = example_tokens(name, 0)
  out = apply_step(step, tokens, signals)
  for b in range(tokens.batch):
    sl = lambda t: jax.tree_util.tree_map(lambda a: a[b:b + 1], t)
    one = apply_step(step, sl(tokens), sl(signals))
    if name in ("random", "tome_random"):  # the draw is per batch position: compare the shape only
      assert one.x.shape[1] == out.x.shape[1]
      continue
    assert_close(one.x[0], out.x[b], err_msg=f"{name} row {b}")
    np.testing.assert_array_equal(one.index[0], out.index[b])


def np_bipartite(metric, r, protected):
  """Loop-based ToMe matching; returns the new slot of every old slot."""
  n = metric.shape[0]
  m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
  best, partner = [], []
  for i in a_pos:
    s = [-np.inf if (i < protected or j < protected) else float(m[i] @ m[j]) for j in b_pos]
    best.append(max(s))
    partner.append(b_pos[int(np.argmax(s))])
  order = sorted(range(len(a_pos)), key=lambda t: -best[t])
  merged = {a_pos[t] for t in order[:r]}
  if protected:
    unm = [p for p in a_pos if p not in merged]
  else:
    unm = [a_pos[t] for t in order[r:]]
  new = [p for p in range(protected)] + [p for p in unm if p >= protected] + [p for p in b_pos if p >= protected]
  slot = {p: i for i, p in enumerate(new)}
  return np.array([slot[partner[a_pos.index(p)]] if p in merged else slot[p] for p in range(n)])


@pytest.mark.parametrize("n,r,protected", [(37, 5, 1), (50, 12, 1), (51, 7, 2), (20, 6, 0), (41, 20, 1)])
def test_bipartite_matches_loop_reference(n, r, protected):
  rng = np.random.default_rng(n + r)
  metric = rng.normal(size=(3, n, 8)).astype(np.float32)
  dest = bipartite_soft_matching(jnp.asarray(metric), jnp.ones((3, n), bool), r, protected)
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(dest[b]), np_bipartite(metric[b], r, protected))


def test_tome_merge_is_size_weighted_mean():
  tokens, signals = tokens_and_signals(batch=2, n=21, protected=1, seed=3)
  tokens = tokens.replace(size=jnp.asarray(np.random.default_rng(0).integers(1, 5, (2, 21)), jnp.float32))
  step = reducers.build_schedule("tome:r=6", 1)[0]
  out = reducers.apply(step, tokens, signals)
  x, s, idx = map(np.asarray, (tokens.x, tokens.size, out.index))
  for b in range(2):
    for slot in range(out.n):
      members = np.flatnonzero(idx[b] == slot)
      want = (s[b, members, None] * x[b, members]).sum(0) / s[b, members].sum()
      assert_close(out.x[b, slot], want, rtol=1e-5, atol=1e-5)
      assert_close(out.size[b, slot], s[b, members].sum())


def test_evit_fused_token_is_attention_weighted_sum():
  tokens, signals = tokens_and_signals(batch=2, n=37, protected=1, seed=4)
  step = reducers.build_schedule("evit:keep=0.5,layers=0", 1)[0]
  out = reducers.apply(step, tokens, signals)
  k = keep.kept_count(step.config, 37, 1)
  assert out.n == 1 + k + 1
  score = np.asarray(signals.cls_attn).mean(1)
  x = np.asarray(tokens.x)
  for b in range(2):
    kept = np.argsort(-score[b, 1:], kind="stable")[:k] + 1
    dropped = np.setdiff1d(np.arange(1, 37), kept)
    assert_close(out.x[b, 1:1 + k], x[b, np.sort(kept)])
    assert_close(out.x[b, -1], (score[b, dropped, None] * x[b, dropped]).sum(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.index)[b, dropped], k + 1)  # dropped patches live in the fused slot


def test_masked_slots_are_never_kept_over_valid_ones():
  tokens, signals = tokens_and_signals(batch=2, n=21, protected=1, seed=5)
  mask = np.ones((2, 21), bool)
  mask[:, 15:] = False
  tokens = tokens.replace(mask=jnp.asarray(mask))
  step = reducers.build_schedule("topk:keep=0.5,layers=0", 1)[0]
  out = reducers.apply(step, tokens, signals)
  assert np.asarray(out.mask).all()
  assert (np.asarray(out.index)[:, 15:] == -1).all()


@pytest.mark.parametrize("spec,match", [
    ("tome:r=-1", "r at layer 0"),
    ("tome", "argument r is required"),
    ("tome:r=4,foo=1", "unknown argument"),
    ("tome:r=(4, 3.0)", "inflection"),
    ("evit:keep=1.3", r"keep=1.3: must be a rate in \(0, 1\]"),
    ("evit:keep=0", "must be a rate"),
    ("evit:keep=0.7,layers=3-12", r"in \[0, 4\)|in \[0, 12\)"),
    ("topk:keep=0.5,layers=1-1", "repeated"),
    ("avgpool:stride=0", "stride"),
    ("nosuch:r=1", "unknown reducer"),
    ("tome:r=2+evit:keep=0.5,layers=1", "gets both"),
])
def test_bad_specs_fail_with_clear_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)


def test_direct_call_with_impossible_count_fails():
  tokens, signals = tokens_and_signals(batch=2, n=11, protected=1)
  from tokcomp.reducers.tome import ToMeConfig, reduce
  with pytest.raises(ValueError, match=r"ToMe r=6: must be in \[0, 5\]"):
    reduce(tokens, signals, config=ToMeConfig(r=6))


def test_spec_parsing_forms():
  assert [s.config.r if s else 0 for s in reducers.build_schedule("tome:r=8-8-6", 4)] == [8, 8, 6, 0]
  assert [s.config.r if s else 0 for s in reducers.build_schedule("tome:r=[8, 8, 6]", 4)] == [8, 8, 6, 0]
  assert [s.config.r for s in reducers.build_schedule("tome:r=4,inflect=-0.5", 4)] == [6, 4, 3, 2]
  steps = reducers.build_schedule("evit:keep=0.7,layers=1-3,fuse=False", 4)
  assert [s is not None for s in steps] == [False, True, False, True] and not steps[1].config.fuse
  assert reducers.build_schedule(None, 3) == (None, None, None)
  assert reducers.build_schedule("dense", 3) == (None, None, None)


def test_topk_matches_loop_reference():
  # keep = ceil(0.4 * 36) = 15 patches by head-mean CLS attention, then prefix + kept in ascending slot order
  tokens, signals = tokens_and_signals(batch=3, n=37, seed=11)
  out = reducers.apply(reducers.build_schedule("topk:keep=0.4,layers=0", 1)[0], tokens, signals)
  x, score = np.asarray(tokens.x), np.asarray(signals.cls_attn).mean(1)
  for b in range(3):
    kept = sorted(sorted(range(1, 37), key=lambda n: -score[b, n])[:15])
    ref = np.concatenate([x[b, :1], x[b, kept]])
    assert_close(out.x[b], ref)
    index = np.full(37, -1)
    index[[0] + kept] = np.arange(16)
    np.testing.assert_array_equal(np.asarray(out.index)[b], index)


def test_avgpool_matches_loop_reference():
  # a 6x6 grid + CLS pooled with stride 4: windows 4x4, 4x2, 2x4, 2x2 (ceil(6/4) = 2 per side), raster order
  x = jax.random.normal(jax.random.key(3), (2, 37, 8))
  tokens = Tokens.create(x, 1, grid=(6, 6))
  out = reducers.apply(reducers.build_schedule("avgpool:stride=4,layers=0", 1)[0], tokens, None)
  assert out.grid == (2, 2) and out.x.shape == (2, 5, 8)
  grid = np.asarray(x)[:, 1:].reshape(2, 6, 6, 8)
  ref = [grid[:, i:i + 4, j:j + 4].reshape(2, -1, 8).mean(1) for i in (0, 4) for j in (0, 4)]
  assert_close(out.x[:, 0], np.asarray(x)[:, 0])
  assert_close(out.x[:, 1:], np.stack(ref, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.size)[0], [1, 16, 8, 8, 4])

"""ATS (tokcomp/reducers/ats.py, tokcomp/ops/sample.py): parity with the official code, a loop-based NumPy
reference of the significance and the inverse-transform sampling rule, count/mask invariants, and errors.

Goldens: tests/goldens/ats_*.npz from tools/goldens/make_ats.py (adaptivetokensampling/ATS @ 9271257, fp32).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load, model_from_state, nhwc, run_with_blocks
from helpers import assert_close, tiny_vit, tokens_and_signals
from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops import sample
from tokcomp.reducers import ats

its = jax.jit(sample.inverse_transform_sample, static_argnums=2)
apply = jax.jit(reducers.apply, static_argnums=0)

# golden -> our spec (three spellings of the reference's setting: K = N at the listed blocks)
CASES = {
    "ats_cls50": "ats:keep=1.0,layers=1-2-3",
    "ats_cls37": "ats:tokens=37,layers=0-1-2-3",
    "ats_cls26": "ats",  # default placement 3..depth-1 = block 3 at depth 4
}



@pytest.mark.parametrize("name", list(CASES))
def test_ats_matches_reference(name):
  config, state, g = load(name)
  assert g["min_margin"] > 1e-4
  model, params = model_from_state(state, num_heads=config["num_heads"], reduce=CASES[name])
  steps, counts = model.plan((config["img_size"],) * 2)
  assert [i for i, s in enumerate(steps) if s is not None] == config["ats_blocks"]
  assert all(c.n_mlp == config["tokens_in"] for c in counts)  # K = N: static length, mask only
  logits, aux, blocks = run_with_blocks(model, params, nhwc(g["input"]))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for i, t in enumerate(blocks):
    ref_x, ref_ids, ref_valid = g[f"block_out/{i}"], g[f"token_ids/{i}"], g[f"policy/{i}"]
    index, mask, x = np.asarray(t.index), np.asarray(t.mask), np.asarray(t.x)
    np.testing.assert_array_equal(mask.sum(1), ref_valid.sum(1), err_msg=f"block {i} valid counts")
    np.testing.assert_array_equal(np.asarray(ats.effective_count(t)), ref_valid.sum(1))
    for b in range(x.shape[0]):
      alive = np.flatnonzero(index[b] >= 0)  # original token ids we hold
      ref_alive = np.sort(ref_ids[b][ref_ids[b] >= 0])
      np.testing.assert_array_equal(alive, ref_alive, err_msg=f"block {i} sample {b}: sampled tokens")
      assert mask[b, index[b, alive]].all()
      ref_pos = {int(tid): p for p, tid in enumerate(ref_ids[b]) if tid >= 0}
      assert_close(x[b, index[b, alive]], ref_x[b, [ref_pos[int(a)] for a in alive]], rtol=1e-5, atol=1e-5,
                   err_msg=f"block {i} sample {b}")


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_reproduces_reference_picks(name):
  """Our sampling op on the reference's own significance gives the reference's picked slots."""
  config, _, g = load(name)
  for i in config["ats_blocks"]:
    picked = its(jnp.asarray(g[f"significance/{i}"]), jnp.asarray(g[f"valid_in/{i}"]),
                                             int(g[f"num_samples/{i}"]))
    np.testing.assert_array_equal(np.asarray(picked), g[f"picked/{i}"], err_msg=f"block {i}")


# --- loop references --------------------------------------------------------------------------------------

def np_inverse_transform_sample(score, valid, num_samples):
  """The rule, one example, in plain loops (float64): normalise, sort ascending (stable), cumulative sum,
  min-max normalise, S evenly spaced points from the smallest positive CDF value to 1, nearest CDF value
  (first on a tie), unique."""
  m = len(score)
  s = [float(score[j]) if valid[j] else 0.0 for j in range(m)]
  total = sum(s)
  p = [v / total for v in s]
  order = sorted(range(m), key=lambda j: p[j])  # Python's sort is stable
  cdf, acc = [], 0.0
  for j in order:
    acc += p[j]
    cdf.append(acc)
  lo, hi = min(cdf), max(cdf)
  cdf = [(c - lo) / (hi - lo) for c in cdf]
  start = min(c for c in cdf if c > 0)
  ys = [1.0] if num_samples == 1 else [start + i * (1 - start) / (num_samples - 1) for i in range(num_samples)]
  picked = set()
  for y in ys:
    best = min(range(m), key=lambda j: (abs(y - cdf[j]), j))
    picked.add(order[best])
  return np.array([j in picked and bool(valid[j]) for j in range(m)])


@pytest.mark.parametrize("m,num_samples,invalid,seed", [
    (36, 36, 0, 0), (36, 36, 9, 1), (49, 20, 5, 2), (25, 7, 0, 3), (30, 45, 4, 4), (12, 1, 3, 5)])
def test_sampling_matches_loop_reference(m, num_samples, invalid, seed):
  rng = np.random.default_rng(seed)
  score = rng.gamma(0.7, size=(3, m)).astype(np.float32)
  valid = np.ones((3, m), bool)
  for b in range(3):
    valid[b, rng.choice(m, invalid, replace=False)] = False
  picked = np.asarray(its(jnp.asarray(score), jnp.asarray(valid), num_samples))
  for b in range(3):
    want = np_inverse_transform_sample(score[b], valid[b], num_samples)
    np.testing.assert_array_equal(picked[b], want, err_msg=f"row {b}")
    assert picked[b].sum() <= min(num_samples, valid[b].sum())
    assert not (picked[b] & ~valid[b]).any()


def test_sampling_rule_details():
  # All valid: the least significant token sits at CDF 0 and is never picked (the reference's min-max CDF).
  score = jnp.asarray([[0.05, 0.3, 0.1, 0.2, 0.35]])
  picked = np.asarray(its(score, jnp.ones((1, 5), bool), 5))
  assert not picked[0, 0] and picked[0, 4]
  # With an invalid slot the CDF starts at 0 there, and the least significant valid token can be picked.
  valid = jnp.asarray([[True, True, True, True, True, False]])
  score6 = jnp.concatenate([score, jnp.asarray([[0.9]])], axis=1)
  picked = np.asarray(its(score6, valid, 5))
  assert picked[0, 0] and not picked[0, 5]
  # One sample point: the most significant token.
  picked = np.asarray(its(score, jnp.ones((1, 5), bool), 1))
  np.testing.assert_array_equal(picked[0], [False, False, False, False, True])
  # A peaked distribution keeps few tokens. By hand: c' = [0, .002, .005, .009, 1] in ascending order
  # (slots 0, 1, 3, 4, 2); points .002, .25, .5, .75, 1 pick slots 1, 4, 4 (.5 is nearer .009 than 1), 2, 2.
  peaked = jnp.asarray([[0.001, 0.002, 0.97, 0.003, 0.004]])
  np.testing.assert_array_equal(np.asarray(its(peaked, jnp.ones((1, 5), bool), 5))[0],
                                [False, True, True, False, True])
  # No positive score: finite, only valid slots.
  zero = its(jnp.zeros((1, 5)), valid[:, :5] & False, 3)
  assert not np.asarray(zero).any()


def test_significance_matches_loop():
  tokens, signals = tokens_and_signals(batch=2, n=11, heads=3, seed=7)
  value_norm = np.asarray(signals.value_norm)
  cls_attn = np.asarray(signals.cls_attn)
  mask = np.ones((2, 11), bool)
  mask[1, 7:] = False
  got = np.asarray(jax.jit(ats.significance)(signals.cls_attn, signals.value_norm, jnp.asarray(mask)))
  for b in range(2):
    for j in range(11):
      want = sum(cls_attn[b, h, j] for h in range(3)) * np.sqrt(sum(value_norm[b, h, j] ** 2 for h in range(3)))
      np.testing.assert_allclose(got[b, j], want if mask[b, j] else 0.0, rtol=1e-6)


# --- reducer invariants -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,protected,samples", [
    ("ats:keep=1.0,layers=0", 1, 36), ("ats:keep=0.5,layers=0", 1, 18), ("ats:tokens=20,layers=0", 2, 18)])
def test_reduce_counts_and_mask(spec, protected, samples):
  tokens, signals = tokens_and_signals(batch=3, n=37, heads=2, protected=protected, seed=11)
  step = reducers.build_schedule(spec, 1)[0]
  out = apply(step, tokens, signals)
  assert out.n == protected + samples == reducers.get("ats").out_count(step.config, 37, protected)
  mask, index = np.asarray(out.mask), np.asarray(out.index)
  assert mask[:, :protected].all()
  np.testing.assert_array_equal(index[:, :protected], np.arange(protected)[None].repeat(3, 0))
  score = np.asarray(ats.significance(signals.cls_attn, signals.value_norm, tokens.mask))
  for b in range(3):
    want = np_inverse_transform_sample(score[b, protected:], np.ones(37 - protected, bool), samples)
    alive = np.flatnonzero(index[b] >= 0)
    np.testing.assert_array_equal(alive, np.concatenate([np.arange(protected), np.flatnonzero(want) + protected]))
    valid_slots = np.flatnonzero(mask[b])
    np.testing.assert_array_equal(valid_slots, np.arange(len(alive)))  # valid first, then invalid
    assert_close(out.x[b, :len(alive)], tokens.x[b, alive])  # ascending slot order, rows untouched
  assert (np.asarray(ats.effective_count(out)) < out.n).any()  # adaptive: some slots go unused


def test_invalid_slots_stay_invalid():
  tokens, signals = tokens_and_signals(batch=2, n=21, heads=2, seed=12)
  mask = np.ones((2, 21), bool)
  mask[:, 12:] = False
  tokens = tokens.replace(mask=jnp.asarray(mask))
  out = apply(reducers.build_schedule("ats:keep=1.0,layers=0", 1)[0], tokens, signals)
  assert (np.asarray(out.index)[:, 12:] == -1).all()
  assert np.asarray(out.mask).sum(1).max() <= 12


def test_effective_flops_below_static():
  model = tiny_vit(reduce="ats:keep=1.0,layers=1-2-3")
  rng = np.random.default_rng(3)  # init, then perturb (NumPy noise: cheaper than helpers.random_params)
  params = jax.jit(model.clone(reduce=None).init)(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  params = jax.tree_util.tree_map(lambda l: np.asarray(l) + 0.2 * rng.normal(size=l.shape).astype(np.float32), params)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  counts = ats.effective_layer_counts(model, params, images)
  assert counts.shape == (2, 4, 2) and (counts[:, 0] == 17).all() and (counts[:, 1, 0] == 17).all()
  np.testing.assert_array_equal(counts[:, 1:, 0], counts[:, :-1, 1])
  assert (counts[:, 1:, 1] < 17).any() and (np.diff(counts[:, 1:, 1], axis=1) <= 0).all()
  eff = ats.flops_at_counts(model, counts, (32, 32))
  static = model.flops((32, 32))
  assert static == model.clone(reduce=None).flops((32, 32))  # K = N: no static saving
  assert (eff < static).all()
  np.testing.assert_allclose(ats.flops_at_counts(model, np.full((1, 4, 2), 17), (32, 32)), static)
  assert model.clone(reduce="ats:keep=0.5,layers=1").flops((32, 32)) < static  # K < N: static saving


# --- errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("ats:keep=1.5", r"keep=1.5: must be a rate in \(0, 1\]"),
    ("ats:keep=0", "must be a rate"),
    ("ats:keep=0.5,tokens=20", "not both"),
    ("ats:tokens=1", "tokens=1: must be an int token count >= 2"),
    ("ats:tokens=2.5", "must be an int"),
    ("ats:tokens=[20, 10],layers=1", "one per block"),
    ("ats:keep=0.5,layers=1-9", r"in \[0, 4\)"),
    ("ats:k=3", "unknown argument"),
])
def test_bad_config_raises(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)


def test_default_layers_need_depth():
  with pytest.raises(ValueError, match="depth=3; pass layers"):
    reducers.build_schedule("ats", 3)
  assert [s is not None for s in reducers.build_schedule("ats", 12)] == [False] * 3 + [True] * 9


def test_token_count_out_of_range_raises_at_plan():
  with pytest.raises(ValueError, match=r"tokens=60: must be in \[2, 50\]"):
    tiny_vit(reduce="ats:tokens=60,layers=1").plan((56, 56))
  with pytest.raises(ValueError, match=r"tokens=40: must be in \[2, 30\]"):
    tiny_vit(reduce="ats:tokens=[30, 40],layers=1-2").plan((56, 56))


def test_missing_signals_and_cls_raise():
  tokens, signals = tokens_and_signals(batch=2, n=9, seed=1)
  step = reducers.build_schedule("ats:keep=0.5,layers=0", 1)[0]
  with pytest.raises(ValueError, match="value_norm"):
    reducers.apply(step, tokens, Signals(cls_attn=signals.cls_attn))
  with pytest.raises(ValueError, match="CLS token"):
    reducers.apply(step, tokens.replace(num_protected=0), signals)

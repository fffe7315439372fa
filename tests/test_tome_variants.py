"""ToMe's k-th and random bipartite splits (parity with facebookresearch/ToMe's ops) and the blocked argmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load
from helpers import assert_close, tokens_and_signals
from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops.merge import bipartite_soft_matching, kth_bipartite_matching, random_bipartite_matching
from tokcomp.reducers import tome_kth, tome_random
from tokcomp.tokens import Tokens


def golden_tokens(g):
  tokens = Tokens.create(jnp.asarray(g["x"]), 0)
  return tokens.replace(size=jnp.asarray(g["size"])), Signals(keys_mean=jnp.asarray(g["metric"]))


@pytest.mark.parametrize("name", ["tome_kth_k3_n45", "tome_kth_k2_n38"])
def test_kth_matches_reference(name):
  config, _, g = load(name)
  tokens, signals = golden_tokens(g)
  out = tome_kth.reduce(tokens, signals, config=tome_kth.KthConfig(config["k"]))
  assert out.n == tome_kth.out_count(tome_kth.KthConfig(config["k"]), config["n"], 0) == g["out_x"].shape[1]
  assert_close(out.x, g["out_x"], rtol=1e-5, atol=1e-5)  # same order: B by position
  assert_close(out.size, g["out_size"])
  np.testing.assert_array_equal(np.asarray(out.source()), g["source"])


@pytest.mark.parametrize("name", ["tome_random_r11_n37", "tome_random_r20_n49"])
def test_random_matches_reference(name):
  config, _, g = load(name)
  tokens, signals = golden_tokens(g)
  dest = random_bipartite_matching(signals.keys_mean, tokens.mask, jnp.asarray(g["src"], jnp.int32), 0)
  out = tokens.reassign(dest, config["n"] - config["r"])
  ours, ref = np.asarray(out.source()), g["source"]
  for b in range(ours.shape[0]):  # the reference keeps B in its draw order: match rows by what they hold
    perm = [int(np.flatnonzero((ref[b] == row).all(1))[0]) for row in ours[b]]
    assert sorted(perm) == list(range(len(perm)))
    assert_close(out.x[b], g["out_x"][b][perm], rtol=1e-5, atol=1e-5)
    assert_close(out.size[b], g["out_size"][b][perm])


def random_inputs(b=3, n=41, c=8, seed=0, masked=5):
  k1, k2 = jax.random.split(jax.random.key(seed))
  metric = jax.random.normal(k1, (b, n, c))
  mask = jnp.ones((b, n), bool).at[1, -masked:].set(False)  # one example has invalid slots
  return metric, mask


@pytest.mark.parametrize("block", [1, 3, 7, 20])
def test_blocked_argmax_is_bit_identical(block):
  metric, mask = random_inputs()
  full = bipartite_soft_matching(metric, mask, 12, 1)
  np.testing.assert_array_equal(bipartite_soft_matching(metric, mask, 12, 1, block=block), full)
  np.testing.assert_array_equal(kth_bipartite_matching(metric, mask, 3, 1, block=block)[0],
                                kth_bipartite_matching(metric, mask, 3, 1)[0])
  src = jnp.asarray(np.stack([np.arange(1, 41, 4)] * 3), jnp.int32)
  np.testing.assert_array_equal(random_bipartite_matching(metric, mask, src, 1, block=block),
                                random_bipartite_matching(metric, mask, src, 1))


def test_blocked_argmax_never_holds_the_full_similarity_matrix():
  """At N = 4096 the (N/2)^2 fp32 matrix is 16 MiB; blocked by 128 rows, XLA's temporaries stay far below."""
  metric = jax.ShapeDtypeStruct((1, 4096, 64), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 4096), jnp.bool_)
  def temp_bytes(block):
    fn = jax.jit(lambda m, k: bipartite_soft_matching(m, k, 1024, 1, block=block))
    return fn.lower(metric, mask).compile().memory_analysis().temp_size_in_bytes
  full, blocked = temp_bytes(None), temp_bytes(128)
  assert full >= 2048 * 2048 * 4
  assert blocked < 2048 * 2048 * 4 / 4, (full, blocked)


def test_kth_ragged_tail_joins_the_destinations():
  metric, mask = random_inputs(n=1 + 17, masked=0)  # CLS + 17: groups of 3 leave a tail of 2
  dest, count = kth_bipartite_matching(metric, mask, 3, 1)
  assert count == 1 + 5 + 2
  dest = np.asarray(dest)
  np.testing.assert_array_equal(dest[:, 0], 0)
  np.testing.assert_array_equal(dest[:, [3, 6, 9, 12, 15, 16, 17]], np.broadcast_to(np.arange(1, 8), (3, 7)))
  a_slots = [1, 2, 4, 5, 7, 8, 10, 11, 13, 14]
  assert np.isin(dest[:, a_slots], np.arange(1, 8)).all()  # every a merges into a destination


def test_random_split_draws_valid_reducible_slots_per_example():
  tokens, _ = tokens_and_signals(batch=4, n=37, protected=1)
  tokens = tokens.replace(mask=tokens.mask.at[2, 30:].set(False))
  src = np.asarray(tome_random.draw_sources(tokens, 10, seed=0))
  assert src.shape == (4, 10) and (src >= 1).all()
  assert all(len(set(row)) == 10 for row in src)
  assert (src[2] < 30).all()  # invalid slots are never drawn while valid ones remain
  assert len({tuple(row) for row in src}) == 4  # a different draw for every example
  np.testing.assert_array_equal(src, tome_random.draw_sources(tokens, 10, seed=0))
  assert not np.array_equal(src, tome_random.draw_sources(tokens, 10, seed=1))


def test_prefix_is_never_merged_even_when_r_exceeds_the_valid_slots():
  metric, _ = random_inputs(b=2, n=21)
  mask = jnp.ones((2, 21), bool).at[:, 5:].set(False)  # only 4 valid reducible slots, r = 10
  dest = np.asarray(bipartite_soft_matching(metric, mask, 10, 1))
  assert (dest[:, 0] == 0).all() and (np.delete(dest, 0, axis=1) != 0).all()


@pytest.mark.parametrize("spec, match", [
    ("tome_kth:k=1", "k=1"), ("tome_kth:layers=1", "k=None"), ("tome:r=4,block=0", "block=0"),
    ("tome_random:r=4,block=-2", "block=-2"), ("tome_random:seed=1", "argument r is required"),
    ("tome_kth:k=2,r=3", "unknown argument")])
def test_bad_variant_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)

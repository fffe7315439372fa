"""DivPrune: parity with vbdi/divprune @ 799e2d9 (and ModelTC/llmc @ 05eedff, which agrees) on the same patch
features, run batched here; the greedy max-min primitive against a NumPy loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load
from tokcomp import vlm
from tokcomp.ops import diversity


@pytest.mark.parametrize("name", ["divprune_g7", "divprune_llava"])
def test_divprune_parity(name):
  config, _, g = load(name)
  assert g["min_margin"] > 1e-4
  signals = vlm.VisualSignals(x=g["x"], num_prefix=1, grid=tuple(config["grid"]))
  method, cfg = vlm.get(f"divprune:keep={config['keep']}")
  out = jax.jit(lambda s: method.apply(s, config=cfg))(signals)
  kept = g["kept"]
  assert out.x.shape == (3, kept.shape[1], g["x"].shape[-1])
  np.testing.assert_allclose(np.asarray(out.x), np.take_along_axis(g["x"][:, 1:], kept[..., None], axis=1),
                             rtol=0, atol=0)
  index = np.asarray(out.index)
  assert (index[:, 0] == -1).all()  # the CLS prefix is dropped
  for b in range(3):
    np.testing.assert_array_equal(np.flatnonzero(index[b] >= 0), kept[b] + 1)


def numpy_max_min(d, k, first, valid):
  picks, nearest = [first], d[first].copy()
  for _ in range(k - 1):
    s = np.where(valid, nearest, -np.inf)
    s[picks] = -np.inf
    j = int(np.argmax(s))
    picks.append(j)
    nearest = np.minimum(nearest, d[j])
  return picks


def test_greedy_max_min_matches_numpy_loop():
  rng = np.random.default_rng(0)
  f = rng.standard_normal((3, 20, 5)).astype(np.float32)
  valid = rng.random((3, 20)) > 0.2
  first = np.array([0, 5, 19])
  dist = np.asarray(diversity.cosine_distance(jnp.asarray(f)))
  got = jax.jit(lambda d, fi, v: diversity.greedy_max_min(d, 8, fi, v))(dist, first, valid)
  for b in range(3):
    assert np.asarray(got)[b].tolist() == numpy_max_min(dist[b], 8, first[b], valid[b])
  # Without a mask every pick is distinct even past the point where distances run out.
  all_picks = np.asarray(diversity.greedy_max_min(jnp.asarray(dist), 20, jnp.asarray(first)))
  assert all(len(set(p.tolist())) == 20 for p in all_picks)


def test_nearest_other_skips_self():
  f = jnp.asarray(np.array([[[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]]], np.float32))
  d = np.asarray(diversity.cosine_distance(f))[0]
  np.testing.assert_allclose(np.asarray(diversity.nearest_other(diversity.cosine_distance(f)))[0],
                             [d[0, 1], d[0, 1], d[1, 2]], rtol=1e-6)


def test_greedy_max_min_bad_k():
  with pytest.raises(ValueError, match="k=0"):
    diversity.greedy_max_min(jnp.zeros((1, 4, 4)), 0, jnp.zeros((1,), jnp.int32))

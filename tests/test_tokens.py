"""Token state moves against loop-based NumPy references."""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from helpers import assert_close
from tokcomp.tokens import Tokens


def _np_reassign(x, size, mask, index, dest, m, weight, normalize):
  b, n, d = x.shape
  xo, so, wo, co = np.zeros((b, m, d)), np.zeros((b, m)), np.zeros((b, m)), np.zeros((b, m), int)
  for bi in range(b):
    for i in range(n):
      t = dest[bi, i]
      if t < 0 or not mask[bi, i]:
        continue
      xo[bi, t] += weight[bi, i] * x[bi, i]
      wo[bi, t] += weight[bi, i]
      so[bi, t] += size[bi, i]
      co[bi, t] += 1
  if normalize:
    xo = xo / np.where(wo > 0, wo, 1)[..., None]
  idx = np.array([[dest[bi, p] if p >= 0 else -1 for p in index[bi]] for bi in range(b)])
  return xo, so, co > 0, idx


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 20), m=st.integers(1, 8), normalize=st.booleans())
def test_reassign_matches_loop(seed, n, m, normalize):
  rng = np.random.default_rng(seed)
  b, d = 3, 4
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  t = Tokens.create(jnp.asarray(x), 0)
  t = t.replace(size=jnp.asarray(rng.integers(1, 4, (b, n)).astype(np.float32)),
                mask=jnp.asarray(rng.random((b, n)) > 0.2))
  dest = rng.integers(-1, m, (b, n))
  weight = rng.random((b, n)).astype(np.float32)
  out = t.reassign(jnp.asarray(dest), m, weight=jnp.asarray(weight), normalize=normalize)
  ref = _np_reassign(x, np.asarray(t.size), np.asarray(t.mask), np.asarray(t.index), dest, m, weight, normalize)
  assert_close(out.x, ref[0], rtol=1e-5, atol=1e-5)
  assert_close(out.size, ref[1])
  np.testing.assert_array_equal(out.mask, ref[2])
  np.testing.assert_array_equal(out.index, ref[3])


def test_gather_composes_index_and_unmerge_roundtrip():
  x = jnp.arange(2 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 1)
  t = Tokens.create(x, 1)
  keep = jnp.array([[0, 2, 5], [0, 4, 1]])
  g = t.gather(keep)
  np.testing.assert_array_equal(g.index, [[0, -1, 1, -1, -1, 2], [0, 2, -1, -1, 1, -1]])
  g2 = g.gather(jnp.array([[0, 2], [0, 1]]))
  np.testing.assert_array_equal(g2.index, [[0, -1, -1, -1, -1, 1], [0, -1, -1, -1, 1, -1]])
  # unmerge puts every kept token back where it came from
  un = np.asarray(g2.unmerge(fill=-1.0))[..., 0]
  np.testing.assert_array_equal(un, [[0, -1, -1, -1, -1, 5], [6, -1, -1, -1, 10, -1]])
  src = np.asarray(g2.source())
  assert src.shape == (2, 2, 6) and src.sum() == 4


def test_compact_is_stable_masking_plus_sort():
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1)
  t = Tokens.create(x, 1)
  valid = jnp.array([[False, False, True, False, True, True, False, True]])
  c = t.compact(valid, capacity=5)
  np.testing.assert_array_equal(np.asarray(c.x)[0, :, 0], [0, 2, 4, 5, 7])  # CLS kept, order kept
  np.testing.assert_array_equal(c.mask, [[True] * 5])
  c3 = t.compact(valid, capacity=3)  # capacity cut: 5 and 7 dropped
  np.testing.assert_array_equal(c3.index, [[0, -1, 1, -1, 2, -1, -1, -1]])
  c7 = t.compact(valid, capacity=7)  # spare capacity comes out masked
  np.testing.assert_array_equal(c7.mask, [[True] * 5 + [False] * 2])
  assert (np.asarray(c7.index) < 5).all()
  with pytest.raises(ValueError, match="capacity"):
    t.compact(valid, capacity=9)


def test_create_validates():
  with pytest.raises(ValueError, match="num_protected"):
    Tokens.create(jnp.zeros((1, 4, 2)), 5)
  with pytest.raises(ValueError, match="grid"):
    Tokens.create(jnp.zeros((1, 5, 2)), 1, grid=(2, 3))


def test_unmerge_grid_shape():
  t = Tokens.create(jnp.ones((2, 1 + 12, 3)), 1, grid=(3, 4))
  assert t.unmerge_grid(grid=(3, 4)).shape == (2, 3, 4, 3)

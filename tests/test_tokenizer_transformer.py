"""The tokenizers' transformer block and prefix masks: pair masks act like removing keys, traced lengths clip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokcomp.tokenizers.transformer import Transformer, prefix_mask


def test_pair_mask_equals_running_on_the_visible_prefix():
  # a causal pair mask: the output at position i depends only on positions <= i
  tr = Transformer(2, 2, 32, ln_eps=1e-5)
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  params = tr.init(jax.random.key(1), x)
  causal = jnp.tril(jnp.ones((1, 6, 6), bool))
  full = tr.apply(params, x, pair_mask=causal)
  for i in range(1, 7):  # positions < i are unchanged when everything after them is cut off
    prefix = tr.apply(params, x[:, :i], pair_mask=causal[:, :i, :i])
    np.testing.assert_allclose(np.asarray(full[:, :i]), np.asarray(prefix), rtol=1e-5, atol=1e-5)
  one = Transformer(1, 2, 32, ln_eps=1e-5)  # one block: the last position sees exactly the unmasked prefix
  p1 = one.init(jax.random.key(1), x)
  causal_out = one.apply(p1, x, pair_mask=causal)
  for i in range(1, 7):
    np.testing.assert_allclose(np.asarray(causal_out[:, i - 1]), np.asarray(one.apply(p1, x[:, :i])[:, -1]),
                               rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(causal_out), np.asarray(one.apply(p1, x)), atol=1e-3)


def test_key_mask_makes_masked_tokens_invisible():
  tr = Transformer(1, 2, 32)
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  params = tr.init(jax.random.key(1), x)
  mask = prefix_mask(jnp.array([2, 5, 3]), 5, 3)
  a = tr.apply(params, x, mask)
  b = tr.apply(params, x.at[:, 3:].set(7.0), mask)
  np.testing.assert_allclose(np.asarray(a[0, :2]), np.asarray(b[0, :2]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(a[2, :3]), np.asarray(b[2, :3]), rtol=1e-6)
  assert not np.allclose(np.asarray(a[1]), np.asarray(b[1]))  # row 1 keeps all 5: it sees the change


def test_prefix_mask_checks_python_ints_and_clips_traced_lengths():
  np.testing.assert_array_equal(np.asarray(prefix_mask(2, 4, 2)), [[1, 1, 0, 0]] * 2)
  np.testing.assert_array_equal(np.asarray(prefix_mask(jnp.array(9), 4, 1)), [[1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(prefix_mask(jnp.array(0), 4, 1)), [[1, 0, 0, 0]])
  with pytest.raises(ValueError, match="length=5: must be in 1..4"):
    prefix_mask(5, 4, 2)
  with pytest.raises(ValueError, match="length shape"):
    prefix_mask(jnp.array([1, 2, 3]), 4, 2)
  with pytest.raises(ValueError, match="depth"):
    Transformer(0, 2, 8)

"""VQ and FSQ against loop-free NumPy statements of their equations, plus their invariants and errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokcomp.tokenizers import quantizers as Q


def np_vq(z, codebook, beta, l2, valid):
  if l2:
    z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    codebook = codebook / np.maximum(np.linalg.norm(codebook, axis=-1, keepdims=True), 1e-12)
  d = ((z[..., None, :] - codebook) ** 2).sum(-1)  # the direct squared distance, not the expanded form
  ids = d.argmin(-1)
  q = codebook[ids]
  per_token = ((q - z) ** 2).mean(-1)
  mse = (per_token * valid).sum() / valid.sum()
  counts = np.bincount(ids[valid > 0].ravel(), minlength=codebook.shape[0]).astype(np.float64)
  p = counts / counts.sum()
  perplexity = np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())
  return ids, q, (1 + beta) * mse, perplexity, (counts > 0).mean(), d


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_vq_matches_numpy(l2, masked):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 7, 5)).astype(np.float32)
  valid = (np.arange(7)[None] < np.array([[7], [3], [5]])).astype(np.float32) if masked else np.ones((3, 7), np.float32)
  vq = Q.VectorQuantizer(16, 5, commitment_cost=0.25, use_l2_norm=l2)
  params = vq.init(jax.random.key(0), z)
  codebook = rng.normal(size=(16, 5)).astype(np.float32)
  params = {"params": {"codebook": jnp.asarray(codebook)}}
  z_q, aux = vq.apply(params, jnp.asarray(z), jnp.asarray(valid > 0) if masked else None)
  ids, q, loss, perplexity, usage, d = np_vq(z, codebook, 0.25, l2, valid)
  # the selection is only checkable where the nearest code is clearly nearest
  gap = np.sort(d, -1)[..., 1] - np.sort(d, -1)[..., 0]
  assert gap.min() > 1e-4
  np.testing.assert_array_equal(np.asarray(aux["ids"]), ids)
  np.testing.assert_allclose(np.asarray(z_q), q, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(aux["loss"]), loss, rtol=1e-5)
  np.testing.assert_allclose(float(aux["perplexity"]), perplexity, rtol=1e-5)
  np.testing.assert_allclose(float(aux["usage"]), usage, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(vq.apply(params, aux["ids"], method=vq.lookup)), q, rtol=1e-5, atol=1e-6)


def test_vq_straight_through_and_loss_gradients():
  vq = Q.VectorQuantizer(8, 4)
  z = jax.random.normal(jax.random.key(1), (2, 3, 4))
  params = vq.init(jax.random.key(0), z)
  g = jax.grad(lambda z: jnp.sum(vq.apply(params, z)[0] * 3.0))(z)
  np.testing.assert_allclose(np.asarray(g), 3.0)  # identity backward through the codes
  # the codebook learns only from the codebook term; z only from the commitment term (and the straight-through)
  gp = jax.grad(lambda p: vq.apply(p, z)[1]["loss"])(params)["params"]["codebook"]
  assert float(jnp.abs(gp).sum()) > 0


def test_vq_bf16_latents_use_fp32_distances():
  vq = Q.VectorQuantizer(32, 8, use_l2_norm=True)
  z = jax.random.normal(jax.random.key(2), (4, 6, 8))
  params = vq.init(jax.random.key(0), z)
  zq32, a32 = vq.apply(params, z.astype(jnp.bfloat16).astype(jnp.float32))
  zq16, a16 = vq.apply(params, z.astype(jnp.bfloat16))
  assert zq16.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a16["ids"]), np.asarray(a32["ids"]))


def test_vq_mask_excludes_tail_from_losses():
  vq = Q.VectorQuantizer(8, 4)
  z = jax.random.normal(jax.random.key(3), (2, 5, 4))
  params = vq.init(jax.random.key(0), z)
  mask = jnp.arange(5)[None].repeat(2, 0) < 3
  _, a = vq.apply(params, z, mask)
  _, b = vq.apply(params, z.at[:, 3:].set(100.0), mask)  # the masked tail can be anything
  np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(a["perplexity"]), float(b["perplexity"]), rtol=1e-6)
  _, c = vq.apply(params, z[:, :3])
  np.testing.assert_allclose(float(a["loss"]), float(c["loss"]), rtol=1e-6)


def test_fsq_levels_ids_and_lookup_roundtrip():
  levels = (3, 4, 5)
  fsq = Q.FSQ(levels)
  assert fsq.codebook_size == 60 and fsq.token_size == 3
  z = jax.random.normal(jax.random.key(4), (2000, 3)) * 4
  z_q, aux = fsq.apply({}, z)
  for i, l in enumerate(levels):  # exactly L_i values per channel, evenly spaced in [-1, 1]
    values = np.unique(np.asarray(z_q[:, i]))
    assert len(values) == l
    np.testing.assert_allclose(values, (np.arange(l) - l // 2) / (l // 2), atol=1e-6)
  ids = np.asarray(aux["ids"])
  assert ids.min() >= 0 and ids.max() < 60
  half = np.array([l // 2 for l in levels])
  digits = np.round(np.asarray(z_q) * half + half).astype(int)
  np.testing.assert_array_equal(ids, digits[:, 0] + 3 * digits[:, 1] + 12 * digits[:, 2])
  np.testing.assert_allclose(np.asarray(fsq.apply({}, aux["ids"], method=fsq.lookup)), np.asarray(z_q), atol=1e-6)
  every = fsq.apply({}, jnp.arange(60), method=fsq.lookup)  # every code is distinct and maps back to its id
  assert len({tuple(r) for r in np.asarray(every).round(4)}) == 60


def test_fsq_matches_the_bound_formula_and_passes_gradients():
  fsq = Q.FSQ((8, 5))
  z = jnp.linspace(-3, 3, 40).reshape(20, 2)
  levels, eps = np.array([8.0, 5.0]), 1e-3
  half_l = (levels - 1) * (1 + eps) / 2
  offset = np.where(levels % 2 == 0, 0.5, 0.0)
  expect = np.round(np.tanh(np.asarray(z) + np.arctanh(offset / half_l)) * half_l - offset) / np.array([4.0, 2.0])
  np.testing.assert_allclose(np.asarray(fsq.apply({}, z)[0]), expect, atol=1e-6)
  g = jax.grad(lambda z: jnp.sum(fsq.apply({}, z)[0]))(z)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).min()) > 0


def test_quantizers_jit_once():
  vq = Q.VectorQuantizer(8, 4)
  params = vq.init(jax.random.key(0), jnp.zeros((2, 3, 4)))
  f = chex.assert_max_traces(lambda z, m: vq.apply(params, z, m), n=1)
  f = jax.jit(f)
  for s in range(3):
    f(jax.random.normal(jax.random.key(s), (2, 3, 4)), jnp.arange(3)[None].repeat(2, 0) < s + 1)


@pytest.mark.parametrize("build, match", [
    (lambda: Q.VectorQuantizer(1, 4), "codebook_size"),
    (lambda: Q.VectorQuantizer(8, 0), "token_size"),
    (lambda: Q.VectorQuantizer(8, 4, commitment_cost=-1.0), "commitment_cost"),
    (lambda: Q.FSQ((8, 1)), "levels"),
    (lambda: Q.FSQ(()), "levels"),
])
def test_bad_config(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_wrong_latent_width():
  with pytest.raises(ValueError, match="token_size"):
    Q.VectorQuantizer(8, 4).init(jax.random.key(0), jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match="len\\(levels\\)"):
    Q.FSQ((8, 5)).apply({}, jnp.zeros((2, 3)))

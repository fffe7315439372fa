"""One-D-Piece: parity with turingmotors/One-D-Piece at a prefix length, and Tail Token Drop in training.

Golden: tests/goldens/one_d_piece_legacy.npz (tools/goldens/make_titok.py, reference @ 473665d, eval mode) with
the weights of tests/goldens/titok_legacy.npz: decode at the full length, decode and decode_tokens at 5 of 8.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import count_compiles
from test_titok import TINY, close, golden, jitted, write_hub_dir
from tokcomp.checkpoints import titok as titok_ckpt
from tokcomp.tokenizers import one_d_piece

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(**kw):
  model = one_d_piece.OneDPiece(**{**TINY, **kw})
  images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  return model, jax.jit(model.init)(jax.random.key(0), images), images


def test_parity_at_a_prefix_length_through_the_loader(tmp_path):
  config, state, _ = golden("titok_legacy")
  g = dict(np.load(os.path.join(HERE, "goldens", "one_d_piece_legacy.npz"), allow_pickle=False))
  assert json.loads(str(g["config"]))["weights"] == "titok_legacy.npz"
  config = {**config, "model": {**config["model"], "type": "one_d_piece"}}
  model, params = titok_ckpt.load(write_hub_dir(tmp_path / "hub", config, state), num_heads=3)
  assert isinstance(model, one_d_piece.OneDPiece) and model.is_legacy
  z_q, aux = jitted(model, "encode")(params, jnp.asarray(g["images"]))
  np.testing.assert_array_equal(np.asarray(aux["ids"]), g["ids"])
  decode = jax.jit(lambda p, z, n: model.apply(p, z, length=n, method=model.decode))
  close(decode(params, z_q, jnp.int32(8)), g["decoded_full"], msg="full length")
  prefix = decode(params, z_q, jnp.int32(int(g["length"])))
  close(prefix, g["decoded_l5"], msg="length 5")
  assert not np.allclose(prefix, g["decoded_full"], atol=1e-3)
  from_ids = jax.jit(lambda p, i: model.apply(p, i, length=5, method=model.decode_tokens))(params, g["ids"])
  close(from_ids, g["decoded_tokens_l5"], msg="decode_tokens at length 5")


def draw(model, params, key, batch=4, length=None):
  """The kept mask [B, K] that a training call with rngs={"token_drop": key} draws."""
  return jax.jit(lambda p, k: model.apply(p, length, batch, True, method=model.kept_mask,
                                          rngs={"token_drop": k}))(params, key)


def test_training_decodes_from_a_random_prefix_one_per_batch():
  model, params, images = tiny()
  train_call = jax.jit(lambda p, x, k: model.apply(p, x, train=True, rngs={"token_drop": k}))
  decode = jax.jit(lambda p, z, n: model.apply(p, z, length=n, method=model.decode))
  z_q, _ = jitted(model, "encode")(params, images)
  draw_mask = jax.jit(lambda p, k: model.apply(p, None, 4, True, method=model.kept_mask, rngs={"token_drop": k}))
  seen = set()
  for seed in range(4):
    key = jax.random.key(seed)
    kept = np.asarray(draw_mask(params, key))
    n = int(kept[0].sum())
    assert (kept.sum(-1) == n).all() and (kept[:, :n]).all(), "one prefix length for the whole batch"
    out = train_call(params, images, key)
    assert float(out["metrics"]["kept_length"]) == n
    close(out["recon"], decode(params, z_q, jnp.int32(n)), msg=f"seed {seed}")
    seen.add(n)
  assert len(seen) > 1, "different keys draw different lengths"
  keys = jax.random.split(jax.random.key(0), 400)
  lengths = np.asarray(jax.jit(jax.vmap(lambda k: model.apply(params, None, 4, True, method=model.kept_mask,
                                                             rngs={"token_drop": k})[0].sum()))(keys))
  assert lengths.min() == 1 and lengths.max() == 8 and len(set(lengths)) == 8, "n ~ U{1..K}"


def test_per_sample_drop_and_length_cap():
  model, params, images = tiny(drop_per_sample=True)
  key = jax.random.key(5)
  kept = np.asarray(draw(model, params, key))
  n = kept.sum(-1)
  assert len(set(n.tolist())) > 1 and (n >= 1).all()
  for i in range(4):
    assert kept[i, :n[i]].all() and not kept[i, n[i]:].any()
  out = jax.jit(lambda p, x, k: model.apply(p, x, train=True, rngs={"token_drop": k}))(params, images, key)
  z_q, _ = jitted(model, "encode")(params, images)
  decode = jax.jit(lambda p, z, m: model.apply(p, z, length=m, method=model.decode))
  close(out["recon"], decode(params, z_q, jnp.asarray(n, jnp.int32)))
  capped = np.asarray(draw(model, params, key, length=2)).sum(-1)  # training with a length: min(n, length)
  np.testing.assert_array_equal(capped, np.minimum(n, 2))


def test_eval_is_deterministic_and_needs_no_rng():
  model, params, images = tiny()
  a = jitted(model, "reconstruct")(params, images)
  b = jax.jit(lambda p, x: model.apply(p, x, length=8, method=model.reconstruct))(params, images)
  close(a, b)
  out = jitted(model)(params, images)  # train=False: no "token_drop" stream is needed
  assert float(out["metrics"]["kept_length"]) == 8.0


def test_train_step_compiles_once_across_keys_and_gradients_are_finite():
  model, params, images = tiny()

  def loss(p, x, k):
    out = model.apply(p, x, train=True, rngs={"token_drop": k})
    return jnp.mean(jnp.abs(out["recon"] - x)) + out["losses"]["quantizer"]

  step, traces = count_compiles(jax.value_and_grad(loss))
  for seed in range(3):
    value, grads = step(params, images, jax.random.key(seed))
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
  assert traces() == 1


def test_bad_length_raises():
  model, params, images = tiny()
  z_q, _ = jitted(model, "encode")(params, images)
  with pytest.raises(ValueError, match="length=9: must be in 1..8"):
    model.apply(params, z_q, length=9, train=True, method=model.decode, rngs={"token_drop": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"length shape \(3,\)"):
    draw(model, params, jax.random.key(0), length=jnp.array([1, 2, 3]))

"""ToDRE stage 2 (tokcomp/vlm/todre_prune.py) in the Llama decoder's prefill: a float64 NumPy reference of the rule on
the FastV golden's tiny GQA Llama (its hidden states entering layer 2 come from the reference transformers run), batch
3 with right padding against batch-1 runs, the KV cache after the prune (keep=0 drops every visual token), one
compile, bad specs.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load
from helpers import count_compiles
from test_llm import numpy_decoder
from tokcomp import vlm
from tokcomp.checkpoints import hf_llama
from tokcomp.models import llm

SPAN, S, L = (5, 49), 61, 2


@functools.lru_cache(maxsize=None)
def fixture():
  _, state, g = load("fastv_k2_keep20")
  return state, json.loads(str(g["hf_config"])), g


@functools.lru_cache(maxsize=None)
def model_for(spec):
  state, hf, _ = fixture()
  return hf_llama.convert(state, hf, reduce=spec)


@functools.partial(jax.jit, static_argnames=("model",))
def run(model, params, embeds, mask):
  return llm.prefill(model, params, embeds, llm.default_positions(mask), mask, image_span=SPAN, max_new_tokens=2)


def numpy_text_attn(state, hf, hidden, layer, text_from):
  """hidden [S, D] entering `layer` (positions 0..S-1) -> mean over heads and the text queries text_from.. of that
  layer's own softmax rows [S], float64."""
  p = {k: np.asarray(v, np.float64) for k, v in state.items()}
  h, kvh, d = hf["num_attention_heads"], hf["num_key_value_heads"], hf["hidden_size"] // hf["num_attention_heads"]
  x = np.asarray(hidden, np.float64)
  pre = f"model.layers.{layer}."
  y = p[pre + "input_layernorm.weight"] * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + hf["rms_norm_eps"])
  inv = 1.0 / hf.get("rope_theta", 10000.0) ** (np.arange(0, d, 2) / d)
  ang = np.arange(len(x))[:, None] * inv[None, :]
  cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
  rot = lambda t: t * cos + np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1) * sin
  q = rot((y @ p[pre + "self_attn.q_proj.weight"].T).reshape(len(x), h, d))
  k = np.repeat(rot((y @ p[pre + "self_attn.k_proj.weight"].T).reshape(len(x), kvh, d)), h // kvh, axis=1)
  s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
  s = np.where(np.tril(np.ones((len(x), len(x)), bool))[None], s, -np.inf)[:, text_from:]
  a = np.exp(s - s.max(-1, keepdims=True))
  return (a / a.sum(-1, keepdims=True)).mean((0, 1))


@pytest.mark.parametrize("spec, kept", [("todre_prune:layer=2,keep=20", 20), ("todre_prune:layer=2,keep=0.3", 15)])
def test_matches_numpy_reference(spec, kept):
  state, hf, g = fixture()
  model, params = model_for(spec)
  _, _, aux = run(model, params, jnp.asarray(g["embeds"]), jnp.ones((3, S), bool))
  method, config = vlm.get(spec)
  assert method.out_count(config, 49) == kept and aux["keep"][L].shape == (3, 12 + kept)
  choices = set()
  for i in range(3):
    score = numpy_text_attn(state, hf, g["hidden_k"][i], L, sum(SPAN))  # reference hidden states entering layer 2
    np.testing.assert_allclose(np.asarray(aux["signals"][L].text_attn)[i].mean(0), score, rtol=1e-5, atol=1e-6)
    img = score[5:54]
    gap = np.sort(img)[::-1]
    assert (gap[kept - 1] - gap[kept]) / gap[kept - 1] > 1e-4  # a clear cut (fp32 error ~1e-6)
    keep = np.concatenate([np.arange(5), 5 + np.sort(np.argsort(-img, kind="stable")[:kept]), np.arange(54, 61)])
    np.testing.assert_array_equal(np.asarray(aux["keep"][L])[i], keep)
    np.testing.assert_array_equal(np.asarray(aux["positions"])[i], keep)  # original RoPE positions
    hidden, _ = numpy_decoder(state, hf, g["embeds"][i].astype(np.float64), np.arange(S), keep={L: keep})
    np.testing.assert_allclose(np.asarray(aux["hidden"])[i], hidden, rtol=1e-5, atol=1e-5)
    choices.add(tuple(keep))
  assert len(choices) == 3


def test_batch3_with_right_padding_equals_batch1():
  _, _, g = fixture()
  model, params = model_for("todre_prune:layer=2,keep=0.3")
  text = (7, 3, 5)
  mask = jnp.arange(S)[None, :] < (54 + jnp.asarray(text))[:, None]
  logits, _, aux = run(model, params, jnp.asarray(g["embeds"]), mask)
  for i, t in enumerate(text):
    l1, _, a1 = run(model, params, jnp.asarray(g["embeds"][i:i + 1, :54 + t]), jnp.ones((1, 54 + t), bool))
    n = 20 + t
    np.testing.assert_array_equal(np.asarray(aux["keep"][L])[i, :n], np.asarray(a1["keep"][L])[0])
    np.testing.assert_allclose(np.asarray(aux["hidden"])[i, :n], np.asarray(a1["hidden"])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[i], np.asarray(l1)[0], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("spec, kept", [("todre_prune:layer=2,keep=0.5", 24), ("todre_prune:layer=3,keep=0", 0)])
def test_kv_cache_after_the_prune_and_one_compile(spec, kept):
  _, _, g = fixture()
  model, params = model_for(spec)
  layer = vlm.get(spec)[1].layer
  f, n = count_compiles(lambda p, e, m: model.apply(p, e, llm.default_positions(m), m, SPAN, 2,
                                                    method=llm.Llama.prefill))
  for i in range(2):
    logits, cache, aux = f(params, jnp.asarray(g["embeds"]) * (1 + i), jnp.ones((3, S), bool))
  assert n() == 1
  lengths = [S] * layer + [12 + kept] * (4 - layer)
  assert [int(i) for i in cache.index] == lengths
  assert cache.capacity == tuple(x + 2 for x in lengths)
  assert [np.asarray(m).sum(1).tolist() for m in cache.mask] == [[x] * 3 for x in lengths]
  np.testing.assert_array_equal(np.asarray(cache.position), [S] * 3)
  if kept == 0:  # no visual token from layer 3 on
    np.testing.assert_array_equal(np.asarray(aux["keep"][3]), np.tile(np.r_[0:5, 54:61], (3, 1)))
  step = jax.jit(lambda p, c, t: llm.decode_step(model, p, c, token=t))
  out, cache = step(params, cache, jnp.argmax(logits, -1))
  assert [int(i) for i in cache.index] == [x + 1 for x in lengths] and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("spec, field", [
    ("todre_prune:keep=3", "layer=None"), ("todre_prune:layer=-1,keep=3", "layer=-1"),
    ("todre_prune:layer=2", "keep=None"), ("todre_prune:layer=2,keep=1.5", "keep=1.5"),
    ("todre_prune:layer=2,keep=-2", "keep=-2"), ("todre_prune:layer=2,keep=3,k=1", "k"),
    ("todre_prune:layer=2.0,keep=3", "layer=2.0")])
def test_bad_specs(spec, field):
  with pytest.raises(ValueError, match=field):
    vlm.get(spec)


def test_bad_use():
  state, hf, g = fixture()
  e = jnp.asarray(g["embeds"][:1])
  model, params = hf_llama.convert(state, hf, reduce="todre_prune:layer=2,keep=50")
  with pytest.raises(ValueError, match="keep=50.*49"):
    llm.prefill(model, params, e, image_span=SPAN)
  model, params = hf_llama.convert(state, hf, reduce="todre_prune:layer=2,keep=5")
  with pytest.raises(ValueError, match="no text after the image"):
    llm.prefill(model, params, e[:, :54], image_span=SPAN)
  method, config = vlm.get("todre_prune:layer=2,keep=5")
  with pytest.raises(ValueError, match="text_attn"):
    method.apply(vlm.PrefillSignals(hidden=e, positions=jnp.zeros((1, S), jnp.int32), image_span=SPAN), config=config)

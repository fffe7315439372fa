"""FastV (tokcomp/vlm/fastv.py) in the Llama decoder's prefill: parity with pkunlp-icler/FastV @ d1659729
(tests/goldens/fastv_*.npz, tools/goldens/make_fastv.py), batching, the KV cache after the prune, decoding after it.
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

SPAN = (5, 49)
CASES = {"fastv_k2_keep20": "fastv:k=2,keep=20", "fastv_k1_r05": "fastv:k=1,ratio=0.5"}


@functools.lru_cache(maxsize=None)
def golden(case):
  cfg, state, g = load(case)
  hf = json.loads(str(g["hf_config"]))
  model, params = hf_llama.convert(state, hf, reduce=CASES[case])
  return cfg, state, hf, g, model, params


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def run(model, params, embeds, mask, max_new_tokens=0):
  return llm.prefill(model, params, embeds, llm.default_positions(mask), mask, image_span=SPAN,
                     max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("model",))
def step(model, params, cache, token):
  return llm.decode_step(model, params, cache, token=token)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_batch1(case):
  cfg, _, _, g, model, params = golden(case)
  k = cfg["agg_layer"]
  assert g["min_margin"] > 1e-3
  for i in range(3):
    _, _, aux = run(model, params, jnp.asarray(g["embeds"][i:i + 1]), jnp.ones((1, 61), bool))
    sig = aux["signals"][k]
    np.testing.assert_allclose(np.asarray(sig.last_attn)[0], g["attn_row"][i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sig.hidden)[0], g["hidden_k"][i], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["keep"][k])[0], g["keep"][i])
    np.testing.assert_array_equal(np.asarray(aux["positions"])[0], g["keep"][i])  # original RoPE positions
    np.testing.assert_allclose(np.asarray(aux["hidden"])[0], g["hidden"][i], rtol=1e-5, atol=1e-5)
    # the mask-mode reference agrees on the kept slots
    np.testing.assert_allclose(np.asarray(aux["hidden"])[0], g["hidden_mask_mode"][i][g["keep"][i]],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batch3_equals_batch1(case):
  cfg, _, _, g, model, params = golden(case)
  logits, _, aux = run(model, params, jnp.asarray(g["embeds"]), jnp.ones((3, 61), bool))
  assert aux["keep"][cfg["agg_layer"]].shape == (3, 61 - 49 + cfg["rank"])
  np.testing.assert_array_equal(np.asarray(aux["keep"][cfg["agg_layer"]]), g["keep"])
  np.testing.assert_allclose(np.asarray(aux["hidden"]), g["hidden"], rtol=1e-5, atol=1e-5)
  assert len(set(map(tuple, g["keep"].tolist()))) == 3  # samples really choose differently
  assert np.isfinite(np.asarray(logits)).all()


def test_batch3_with_right_padding_equals_batch1():
  cfg, _, _, g, model, params = golden("fastv_k2_keep20")
  text = (7, 3, 5)
  mask = jnp.arange(61)[None, :] < (54 + jnp.asarray(text))[:, None]
  logits, cache, aux = run(model, params, jnp.asarray(g["embeds"]), mask, max_new_tokens=2)
  nxt = jnp.argmax(logits, -1)
  lb, _ = step(model, params, cache, nxt)
  for i, t in enumerate(text):
    l1, c1, a1 = run(model, params, jnp.asarray(g["embeds"][i:i + 1, :54 + t]), jnp.ones((1, 54 + t), bool),
                     max_new_tokens=2)
    n = 25 + t
    np.testing.assert_array_equal(np.asarray(aux["keep"][2])[i, :n], np.asarray(a1["keep"][2])[0])
    np.testing.assert_allclose(np.asarray(aux["hidden"])[i, :n], np.asarray(a1["hidden"])[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[i], np.asarray(l1)[0], rtol=1e-5, atol=1e-5)
    s1, _ = step(model, params, c1, nxt[i:i + 1])
    np.testing.assert_allclose(np.asarray(lb)[i], np.asarray(s1)[0], rtol=1e-5, atol=1e-5)
  # the short samples' last real query ranked the image: their choices differ from the unpadded golden
  assert not np.array_equal(np.asarray(aux["keep"][2])[1], g["keep"][1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kv_cache_length_and_decoding_after_the_prune(case):
  cfg, state, hf, g, model, params = golden(case)
  k, rank, new = cfg["agg_layer"], cfg["rank"], 3
  s, s_pruned = 61, 61 - 49 + rank
  logits, cache, aux = run(model, params, jnp.asarray(g["embeds"]), jnp.ones((3, s), bool), max_new_tokens=new)
  lengths = [int(i) for i in cache.index]
  assert lengths == [s] * k + [s_pruned] * (4 - k)
  assert cache.capacity == tuple(n + new for n in lengths)
  assert [np.asarray(m).sum(1).tolist() for m in cache.mask] == [[n] * 3 for n in lengths]
  np.testing.assert_array_equal(np.asarray(cache.position), [s] * 3)
  # Greedy decoding continues from the pruned cache; the reference recomputes the whole extended sequence with the
  # same kept set at layer K (new tokens kept, at positions 61, 62, ...).
  emb, head = np.asarray(state["model.embed_tokens.weight"]), np.asarray(state["lm_head.weight"], np.float64)
  tokens, got = [], [np.asarray(logits)]
  for t in range(new):
    tok = jnp.argmax(logits, -1)
    tokens.append(np.asarray(tok))
    logits, cache = step(model, params, cache, tok)
    got.append(np.asarray(logits))
  assert [int(i) for i in cache.index] == [n + new for n in lengths]
  for i in range(3):
    toks = np.stack(tokens, 1)[i]
    for t in range(new + 1):
      x = np.concatenate([g["embeds"][i], emb[toks[:t]]])
      keep = np.concatenate([g["keep"][i], s + np.arange(t)])
      hidden, _ = numpy_decoder(state, hf, x, np.arange(s + t), keep={k: keep})
      np.testing.assert_allclose(got[t][i], hidden[-1] @ head.T, rtol=1e-5, atol=2e-5,
                                 err_msg=f"sample {i}, step {t}")


def test_one_compile_per_budget():
  _, state, hf, g, _, _ = golden("fastv_k2_keep20")
  for spec, kept in (("fastv:k=2,keep=20", 20), ("fastv:k=2,keep=0.5", 24), ("fastv:k=3,ratio=0.75", 12)):
    model, params = hf_llama.convert(state, hf, reduce=spec)
    f, n = count_compiles(lambda p, e, m: model.apply(p, e, llm.default_positions(m), m, SPAN, 1,
                                                      method=llm.Llama.prefill))
    for i in range(3):
      _, cache, aux = f(params, jnp.asarray(g["embeds"]) * (1 + i), jnp.ones((3, 61), bool))
    assert n() == 1
    method, config = vlm.get(spec)
    assert method.out_count(config, 49) == kept
    assert aux["keep"][config.k].shape == (3, 12 + kept) and int(cache.index[-1]) == 12 + kept


@pytest.mark.parametrize("spec, field", [
    ("fastv:k=0,keep=10", "k=0"), ("fastv:k=2", "exactly one"), ("fastv:k=2,keep=3,ratio=0.5", "exactly one"),
    ("fastv:k=2,ratio=1.0", "ratio=1.0"), ("fastv:k=2,keep=-1", "keep=-1"), ("fastv:k=2,keep=1.5", "keep=1.5"),
    ("fastv:k=2,keep=5,foo=1", "foo"), ("fastv:k=2.0,keep=5", "k=2.0")])
def test_bad_specs(spec, field):
  with pytest.raises(ValueError, match=field):
    vlm.get(spec)


def test_bad_use_in_the_decoder():
  _, state, hf, g, _, _ = golden("fastv_k2_keep20")
  e, m = jnp.asarray(g["embeds"][:1]), jnp.ones((1, 61), bool)
  model, params = hf_llama.convert(state, hf, reduce="fastv:k=2,keep=50")
  with pytest.raises(ValueError, match="keep=50.*image_len=49"):
    llm.prefill(model, params, e, image_span=SPAN)
  model, params = hf_llama.convert(state, hf, reduce="fastv:k=2,keep=20")
  with pytest.raises(ValueError, match="image_span"):
    llm.prefill(model, params, e)
  model, params = hf_llama.convert(state, hf, reduce="fastv:k=4,keep=20")
  with pytest.raises(ValueError, match=r"layers \(4,\)"):
    llm.prefill(model, params, e, image_span=SPAN)
  method, config = vlm.get("fastv:k=2,keep=20")
  with pytest.raises(ValueError, match="last_attn"):
    method.apply(vlm.PrefillSignals(hidden=e, positions=llm.default_positions(m), image_span=SPAN), config=config)

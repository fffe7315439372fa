"""PyramidDrop (tokcomp/vlm/pyramiddrop.py) in the Llama decoder's prefill: parity with Cooperx521/PyramidDrop @
6444f30 (tests/goldens/pyramiddrop_tiny.npz, tools/goldens/make_pyramiddrop.py), batching, the KV cache after the
stages, one compile, the count rules, a float64 NumPy loop (GQA model, count=current) and bad specs.
"""
import functools
import json
import math

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

SPAN, S = (5, 49), 61
CASES = {"r05": "pyramiddrop:layers=1-2-3,ratio=0.5", "list": "pyramiddrop:layers=1-3,ratios=0.7-0.3"}


@functools.lru_cache(maxsize=None)
def golden():
  cfg, state, g = load("pyramiddrop_tiny")
  return cfg, state, json.loads(str(g["hf_config"])), g


@functools.lru_cache(maxsize=None)
def model_for(spec, fixture="pyramiddrop_tiny"):
  _, state, g = load(fixture)
  return hf_llama.convert(state, json.loads(str(g["hf_config"])), reduce=spec)


@functools.partial(jax.jit, static_argnames=("model",))
def run(model, params, embeds, mask):
  return llm.prefill(model, params, embeds, llm.default_positions(mask), mask, image_span=SPAN, max_new_tokens=2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_batch1_and_batch3(case):
  cfg, _, _, g = golden()
  assert g["min_margin"] > 1e-3
  layers = cfg["cases"][case]["layers"]
  model, params = model_for(CASES[case])
  outs = [run(model, params, jnp.asarray(g["embeds"][i:i + 1]), jnp.ones((1, S), bool)) for i in range(3)]
  _, _, aux3 = run(model, params, jnp.asarray(g["embeds"]), jnp.ones((3, S), bool))
  for st, l in enumerate(layers):
    for i, (_, _, aux) in enumerate(outs):
      sig = aux["signals"][l]
      np.testing.assert_allclose(np.asarray(sig.layer_attn)[0], g[f"{case}/rows_{st}"][i], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(sig.hidden)[0], g[f"{case}/hidden_in_{st}"][i], rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(np.asarray(aux["keep"][l])[0], g[f"{case}/keep_{st}"][i])
    np.testing.assert_array_equal(np.asarray(aux3["keep"][l]), g[f"{case}/keep_{st}"])  # batch 3 == batch 1
  # the reference as it is (renumbered positions) makes the same first choice
  np.testing.assert_array_equal(g[f"{case}/keep_0"], g[f"{case}/renumbered_keep_0"])
  for i, (logits, _, aux) in enumerate(outs):
    np.testing.assert_array_equal(np.asarray(aux["positions"])[0], g[f"{case}/keep_{len(layers) - 1}"][i])
    np.testing.assert_allclose(np.asarray(aux["hidden"])[0], g[f"{case}/hidden"][i], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aux3["hidden"]), g[f"{case}/hidden"], rtol=1e-5, atol=1e-5)
  assert len({tuple(k) for k in g[f"{case}/keep_{len(layers) - 1}"].tolist()}) == 3  # samples choose differently


def test_kv_cache_lengths_one_compile_and_decoding():
  _, _, _, g = golden()
  model, params = model_for(CASES["r05"])
  f, n = count_compiles(lambda p, e, m: model.apply(p, e, llm.default_positions(m), m, SPAN, 2,
                                                    method=llm.Llama.prefill))
  for i in range(2):
    logits, cache, aux = f(params, jnp.asarray(g["embeds"]) * (1 + i), jnp.ones((3, S), bool))
  assert n() == 1
  method, config = vlm.get(CASES["r05"])
  assert config.counts(49) == [24, 12, 6] and method.out_count(config, 49) == 6
  lengths = [S, 12 + 24, 12 + 12, 12 + 6]  # layer 0 full, then one stage per layer
  assert [int(i) for i in cache.index] == lengths
  assert cache.capacity == tuple(x + 2 for x in lengths)
  assert [np.asarray(m).sum(1).tolist() for m in cache.mask] == [[x] * 3 for x in lengths]
  assert aux["hidden"].shape == (3, 18, 64)
  step = jax.jit(lambda p, c, t: llm.decode_step(model, p, c, token=t))
  nxt, cache2 = step(params, cache, jnp.argmax(logits, -1))
  assert [int(i) for i in cache2.index] == [x + 1 for x in lengths]
  assert np.isfinite(np.asarray(nxt)).all()


def test_count_rules():
  counts = lambda spec, n: vlm.get(spec)[1].counts(n)
  assert counts("pyramiddrop:layers=8-16-24,ratio=0.5", 576) == [288, 144, 72]
  assert counts("pyramiddrop:layers=1-2-3,ratio=0.5", 49) == [24, 12, 6]  # int(49 * 0.5 ** i)
  assert counts("pyramiddrop:layers=1-2-3,ratio=0.5,count=current", 49) == [25, 13, 7]  # ceil(λ n)
  assert counts("pyramiddrop:layers=1-3,ratios=0.7-0.3", 49) == [34, 14]
  assert counts("pyramiddrop:layers=(2, 3),ratio=0.3", 49) == [14, 4]  # int(49 * 0.09) = 4


def numpy_pyramiddrop(state, hf, embeds, layers, ratio, start=5, image=49):
  """One example, count=current: before layer l rank by layer l's OWN last-query row on its (unpruned) input."""
  keep_rel, origin, n = {}, np.arange(len(embeds)), image
  for l in layers:
    _, rows = numpy_decoder(state, hf, embeds, np.arange(len(embeds)), keep=dict(keep_rel))
    score = rows[l].mean(0)[start:start + n]  # layer l ran on the sequence before its prune
    k = math.ceil(ratio * n)
    top = start + np.sort(np.argsort(-score, kind="stable")[:k])
    rel = np.concatenate([np.arange(start), top, np.arange(start + n, len(origin))])
    keep_rel[l], origin, n = rel, origin[rel], k
  hidden, _ = numpy_decoder(state, hf, embeds, np.arange(len(embeds)), keep=keep_rel)
  return origin, hidden


def test_current_rule_matches_numpy_loop_on_a_gqa_model():
  _, state, g = load("fastv_k2_keep20")  # 2 kv heads for 4 heads
  hf = json.loads(str(g["hf_config"]))
  spec = "pyramiddrop:layers=1-3,ratio=0.3,count=current"
  model, params = model_for(spec, "fastv_k2_keep20")
  _, _, aux = run(model, params, jnp.asarray(g["embeds"]), jnp.ones((3, S), bool))
  for i in range(3):
    origin, hidden = numpy_pyramiddrop(state, hf, g["embeds"][i].astype(np.float64), (1, 3), 0.3)
    np.testing.assert_array_equal(np.asarray(aux["keep"][3])[i], origin)
    np.testing.assert_allclose(np.asarray(aux["hidden"])[i], hidden, rtol=1e-5, atol=1e-5)
  assert aux["keep"][3].shape == (3, 12 + 5)  # ceil(0.3 * 49) = 15, ceil(0.3 * 15) = 5


@pytest.mark.parametrize("spec, field", [
    ("pyramiddrop:layers=2-1", "layers"), ("pyramiddrop:layers=0-2", "layers"), ("pyramiddrop:ratio=0", "ratio"),
    ("pyramiddrop:ratio=1.5", "ratio"), ("pyramiddrop:layers=a-b", "layers"), ("pyramiddrop:lam=0.5", "lam"),
    ("pyramiddrop:layers=1-2,ratios=0.5", "ratios"), ("pyramiddrop:layers=1-2,ratios=0.3-0.5", "ratios"),
    ("pyramiddrop:layers=1-2,ratio=0.5,ratios=0.5-0.2", "not both"), ("pyramiddrop:count=floor", "count"),
    ("pyramiddrop:layers=1-2,ratios=0.5-x", "ratios")])
def test_bad_specs(spec, field):
  with pytest.raises(ValueError, match=field):
    vlm.get(spec)


def test_missing_signals():
  method, config = vlm.get("pyramiddrop:layers=1-2,ratio=0.5")
  x = jnp.zeros((1, S, 8))
  sig = vlm.PrefillSignals(hidden=x, positions=jnp.zeros((1, S), jnp.int32), image_span=SPAN, layer=1)
  with pytest.raises(ValueError, match="layer_attn"):
    method.apply(sig, config=config)
  with pytest.raises(ValueError, match="image_len0"):
    method.apply(sig.replace(layer_attn=jnp.ones((1, 2, S))), config=config)
  with pytest.raises(ValueError, match="schedule"):  # 49 tokens at the second stage: not 24
    method.apply(sig.replace(layer_attn=jnp.ones((1, 2, S)), layer=2, image_len0=49), config=config)

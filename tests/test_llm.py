"""Llama decoder (tokcomp/models/llm.py) and its HF loader (tokcomp/checkpoints/hf_llama.py).

Golden: tests/goldens/llama_tiny.npz from HF transformers 4.46.3 LlamaForCausalLM (tools/goldens/make_llama.py).
`numpy_decoder` below is a loop-level NumPy reference of the same equations on the HF state dict; test_fastv.py
reuses it for the prune-then-decode checks.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load
from helpers import count_compiles
from tokcomp.checkpoints import hf_llama
from tokcomp.models import llm


@functools.lru_cache(maxsize=None)
def golden():
  _, state, arrays = load("llama_tiny")
  hf_config = json.loads(str(arrays["hf_config"]))
  model, params = hf_llama.convert(state, hf_config)
  return model, params, state, hf_config, arrays


def numpy_decoder(state, hf, embeds, positions, keep=None):
  """One example, no padding: embeds [S, D], positions [S] -> (final-normed hidden [S', D], last-row attention per
  layer {l: [H, S_l]}). keep {layer: slot indices into the sequence entering that layer}: the hidden states and
  positions are gathered before that layer (FastV's inplace prune with a given kept set). float64 throughout."""
  p = {k: np.asarray(v, np.float64) for k, v in state.items()}
  h, kvh, eps = hf["num_attention_heads"], hf["num_key_value_heads"], hf["rms_norm_eps"]
  d = hf["hidden_size"] // h
  x, pos = np.asarray(embeds, np.float64), np.asarray(positions)
  keep = keep or {}

  def norm(v, w):
    return w * v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)

  def rot(t, ps):  # t [S, heads, d]
    inv = 1.0 / hf.get("rope_theta", 10000.0) ** (np.arange(0, d, 2) / d)
    ang = ps[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    return t * cos + np.concatenate([-t[..., d // 2:], t[..., :d // 2]], -1) * sin

  rows = {}
  for l in range(hf["num_hidden_layers"]):
    if l in keep:
      x, pos = x[keep[l]], pos[keep[l]]
    pre = f"model.layers.{l}."
    y = norm(x, p[pre + "input_layernorm.weight"])
    q = rot((y @ p[pre + "self_attn.q_proj.weight"].T).reshape(len(x), h, d), pos)
    k = rot((y @ p[pre + "self_attn.k_proj.weight"].T).reshape(len(x), kvh, d), pos)
    v = (y @ p[pre + "self_attn.v_proj.weight"].T).reshape(len(x), kvh, d)
    k, v = np.repeat(k, h // kvh, axis=1), np.repeat(v, h // kvh, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    s = np.where(np.tril(np.ones((len(x), len(x)), bool))[None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    rows[l] = a[:, -1]
    o = np.einsum("hqk,khd->qhd", a, v).reshape(len(x), h * d)
    x = x + o @ p[pre + "self_attn.o_proj.weight"].T
    y = norm(x, p[pre + "post_attention_layernorm.weight"])
    g = y @ p[pre + "mlp.gate_proj.weight"].T
    x = x + ((g / (1 + np.exp(-g))) * (y @ p[pre + "mlp.up_proj.weight"].T)) @ p[pre + "mlp.down_proj.weight"].T
  return norm(x, p["model.norm.weight"]), rows


@functools.partial(jax.jit, static_argnames=("model", "image_span", "max_new_tokens"))
def jprefill(model, params, embeds, positions=None, mask=None, image_span=None, max_new_tokens=0):
  return llm.prefill(model, params, embeds, positions, mask, image_span=image_span, max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("model",))
def jdecode(model, params, cache, token):
  return llm.decode_step(model, params, cache, token=token)


def test_loader_reads_the_config():
  model, params, _, hf, _ = golden()
  c = model.config
  assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.num_layers, c.vocab_size) == (64, 4, 2, 3, 128)
  assert c.rope_theta == 10000.0 and c.rms_norm_eps == 1e-6 and not c.tie_word_embeddings
  assert params["params"]["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (64, 32)


def test_logits_match_hf_with_noncontiguous_positions():
  model, params, _, _, g = golden()
  ids, positions = jnp.asarray(g["ids"]), jnp.asarray(g["positions"])
  assert np.any(np.diff(g["positions"][0]) > 1)  # the fixture really has gaps

  @jax.jit
  def f(params, ids, positions):
    e = model.apply(params, ids, method=llm.Llama.embed)
    return model.apply(params, e, positions, jnp.ones(ids.shape, bool))[0]

  logits = f(params, ids, positions)
  np.testing.assert_allclose(np.asarray(logits), g["logits"], rtol=1e-5, atol=1e-5)
  # Contiguous positions give different logits: the test sees the positions.
  other = f(params, ids, llm.default_positions(ids))
  assert np.abs(np.asarray(other) - g["logits"]).max() > 1e-2


def test_numpy_reference_matches_hf():
  model, params, state, hf, g = golden()
  e = np.asarray(state["model.embed_tokens.weight"])[g["ids"][0]]
  hidden, _ = numpy_decoder(state, hf, e, g["positions"][0])
  logits = hidden @ np.asarray(state["lm_head.weight"], np.float64).T
  np.testing.assert_allclose(logits, g["logits"][0], rtol=1e-5, atol=1e-5)


def test_greedy_generation_matches_hf():
  model, params, _, _, g = golden()
  ids = jnp.asarray(g["gen_ids"])
  mask = jnp.ones(ids.shape, bool)
  e = model.apply(params, ids, method=llm.Llama.embed)
  tokens = llm.greedy_generate(model, params, e, llm.default_positions(mask), mask, steps=g["gen_tokens"].shape[1])
  np.testing.assert_array_equal(np.asarray(tokens), g["gen_tokens"])
  # Per-step logits of the cached path against HF's scores.
  logits, cache, _ = jprefill(model, params, e, max_new_tokens=6)
  steps = [logits]
  for t in range(g["gen_tokens"].shape[1] - 1):
    logits, cache = jdecode(model, params, cache, jnp.asarray(g["gen_tokens"][:, t]))
    steps.append(logits)
  np.testing.assert_allclose(np.stack(steps, 1), g["gen_logits"], rtol=1e-5, atol=1e-5)


def _tiny(tie=False, layers=2, seed=0):
  model = llm.Llama(llm.LlamaConfig(num_layers=layers, tie_word_embeddings=tie))
  params = llm.init_params(model, jax.random.key(seed))
  params = jax.tree.map(lambda a: a * 3.0 if a.ndim == 2 else a, params)  # sharper attention than the default init
  return model, params


@pytest.mark.parametrize("tie", [False, True])
def test_cached_decode_equals_recompute_with_gaps(tie):
  model, params = _tiny(tie)
  b, s, steps = 2, 9, 4
  ids = jax.random.randint(jax.random.key(1), (b, s), 0, 128)
  positions = jnp.asarray([[0, 1, 2, 6, 7, 8, 9, 10, 11], [2, 3, 4, 5, 6, 7, 8, 9, 10]])
  mask = jnp.ones((b, s), bool)
  e = model.apply(params, ids, method=llm.Llama.embed)
  tokens = llm.greedy_generate(model, params, e, positions, mask, steps=steps)
  full = model.apply(params, jnp.concatenate([ids, tokens], 1), method=llm.Llama.embed)
  full_pos = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(steps)], 1)
  logits, _ = model.apply(params, full, full_pos, jnp.ones(full_pos.shape, bool))
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[:, s - 1:-1], -1)), np.asarray(tokens))
  # and the cached logits themselves
  lg, cache, _ = jprefill(model, params, e, positions, mask, max_new_tokens=steps)
  got = [lg]
  for t in range(steps - 1):
    lg, cache = jdecode(model, params, cache, tokens[:, t])
    got.append(lg)
  np.testing.assert_allclose(np.stack(got, 1), np.asarray(logits[:, s - 1:-1]), rtol=1e-5, atol=1e-5)
  assert [int(i) for i in cache.index] == [s + steps - 1] * model.config.num_layers
  np.testing.assert_array_equal(np.asarray(cache.position), np.asarray(positions[:, -1] + steps))


def test_batch3_with_right_padding_equals_batch1():
  model, params = _tiny(layers=2, seed=2)
  lengths, s, steps = (9, 5, 7), 9, 3
  ids = jax.random.randint(jax.random.key(3), (3, s), 0, 128)
  mask = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
  e = model.apply(params, ids, method=llm.Llama.embed)
  pos = llm.default_positions(mask)
  gen = functools.partial(llm.greedy_generate, model, params, steps=steps)
  batch_tokens = gen(e, pos, mask)
  batch_logits, cache, _ = jprefill(model, params, e, pos, mask, max_new_tokens=steps)
  for i, n in enumerate(lengths):
    one = e[i:i + 1, :n]
    one_mask, one_pos = jnp.ones((1, n), bool), pos[i:i + 1, :n]
    np.testing.assert_array_equal(np.asarray(gen(one, one_pos, one_mask))[0], np.asarray(batch_tokens)[i])
    lg, c1, _ = jprefill(model, params, one, one_pos, one_mask, max_new_tokens=steps)
    np.testing.assert_allclose(np.asarray(lg)[0], np.asarray(batch_logits)[i], rtol=1e-5, atol=1e-5)
  # one decode step of the batch against each single example
  lb, _ = jdecode(model, params, cache, batch_tokens[:, 0])
  for i, n in enumerate(lengths):
    _, c1, _ = jprefill(model, params, e[i:i + 1, :n], pos[i:i + 1, :n], jnp.ones((1, n), bool),
                           max_new_tokens=steps)
    l1, _ = jdecode(model, params, c1, batch_tokens[i:i + 1, 0])
    # logits reach ~5 here: 1e-5 of that scale absorbs the reduction-order noise of a different cache layout
    np.testing.assert_allclose(np.asarray(l1)[0], np.asarray(lb)[i], rtol=1e-5, atol=5e-5)


def test_one_compile_for_prefill_and_decode():
  model, params = _tiny()
  pf, n_pf = count_compiles(lambda p, e, pos, m: model.apply(p, e, pos, m, None, 4, method=llm.Llama.prefill))
  ds, n_ds = count_compiles(lambda p, c, t: model.apply(p, c, t, method=llm.Llama.decode_step))
  for seed in range(3):
    ids = jax.random.randint(jax.random.key(seed), (2, 8), 0, 128)
    mask = jnp.arange(8)[None, :] < jnp.asarray([8, 5 + seed])[:, None]
    e = model.apply(params, ids, method=llm.Llama.embed)
    logits, cache, _ = pf(params, e, llm.default_positions(mask), mask)
    for _ in range(3):
      logits, cache = ds(params, cache, jnp.argmax(logits, -1))
      assert np.isfinite(np.asarray(logits)).all()
  assert (n_pf(), n_ds()) == (1, 1)


def test_loader_from_a_directory(tmp_path):
  from safetensors.numpy import save_file
  _, params, state, hf, _ = golden()
  save_file({k: np.asarray(v) for k, v in state.items()}, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(hf))
  model, loaded = hf_llama.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_llama.load(tmp_path / "nope")


def test_loader_errors():
  _, _, state, hf, _ = golden()
  with pytest.raises(ValueError, match="model.layers.0.self_attn.q_norm"):
    hf_llama.convert({**state, "model.layers.0.self_attn.q_norm.weight": np.ones(16)}, hf)
  with pytest.raises(ValueError, match="missing.*lm_head"):
    hf_llama.convert({k: v for k, v in state.items() if k != "lm_head.weight"}, hf)
  with pytest.raises(ValueError, match="rope_scaling"):
    hf_llama.convert(state, {**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  with pytest.raises(ValueError, match="shape"):
    hf_llama.convert(state, {**hf, "num_key_value_heads": 4})
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    llm.LlamaConfig(num_heads=4, num_kv_heads=3)
  # a tied checkpoint: no lm_head, logits through the embedding
  tied, params = hf_llama.convert({k: v for k, v in state.items() if k != "lm_head.weight"},
                                  {**hf, "tie_word_embeddings": True})
  assert "lm_head" not in params["params"]


def test_bad_decoder_calls():
  model, params = _tiny()
  e = jnp.zeros((1, 4, 64))
  with pytest.raises(ValueError, match="positions"):
    model.apply(params, e, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match="exactly one"):
    llm.prefill(model, params, e, tokens=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="steps"):
    llm.greedy_generate(model, params, e, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), steps=0)

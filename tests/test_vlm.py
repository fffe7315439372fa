"""The LLaVA-style VLM test bed (tokcomp/models/vlm.py): tower -> pre-LLM reducer -> projector -> Llama.

Tiny random model: CLIP tower width 32, 3 layers (select_layer -2 runs 2), 24 px / patch 4 -> 6x6 = 36 patches + CLS;
Llama hidden 32, 2 layers, 4 heads / 2 KV heads, vocab 64. Sequence: 3 system ids, the image tokens, <= 5 user ids.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from tokcomp import vlm
from tokcomp.models import llm as llm_lib
from tokcomp.models.vlm import VLM, CLIPVisionTower, Projector

HW = (24, 24)
N_PATCHES = 36  # the 6x6 grid the reducers' examples are written for
TOWER = CLIPVisionTower(patch_size=(4, 4), width=32, depth=3, mlp_dim=64, num_heads=2, select_layer=-2)
LLM_CONFIG = llm_lib.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2)
def _model(visual=None, prefill=None, select_feature="patch"):
  return VLM(TOWER, llm_lib.Llama(LLM_CONFIG, reduce=prefill), visual=visual, select_feature=select_feature)


def _params(model=None):
  """The VLM's parameters do not depend on its reducer specs: one random set (perturbed, so attention rows and
  logits are far from uniform) serves every model here."""
  return _shared_params()


@functools.lru_cache(maxsize=None)
def _shared_params(seed=0, std=0.3):
  params = jax.jit(lambda k: _model().init(k, HW))(jax.random.key(seed))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [l + std * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _inputs(b=3, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed + 100))
  images = jax.random.normal(k1, (b, *HW, 3))
  system = jnp.array([1, 2, 3], jnp.int32)
  user = jax.random.randint(k2, (b, 5), 4, 64)
  lengths = jnp.array([5, 3, 4, 2, 5][:b])
  user_mask = jnp.arange(5)[None, :] < lengths[:, None]
  return images, system, jnp.where(user_mask, user, 0), user_mask


CASES = [(None, None), ("visionzip:dominant=9,contextual=6", None), (None, "fastv:k=1,keep=7"),
         ("divprune:keep=12", "fastv:k=1,keep=5")]


@pytest.mark.parametrize("visual,prefill", CASES)
def test_batch3_equals_three_batch1_runs_and_compiles_once(visual, prefill):
  model = _model(visual, prefill)
  params = _params(model)
  images, system, user, user_mask = map(np.asarray, _inputs())  # NumPy: slicing them below compiles nothing
  with helpers.backend_compiles() as compiles:
    out = np.asarray(model.generate(params, images, system, user, user_mask, steps=4))
    assert out.shape == (3, 4) and out.dtype == np.int32
    assert compiles() == 1
    for i in range(3):
      one = model.generate(params, images[i:i + 1], system, user[i:i + 1], user_mask[i:i + 1], steps=4)
      np.testing.assert_array_equal(one, out[i:i + 1])
    assert compiles() == 2  # B=3 and B=1
    model.generate(params, images * 2.0, system, user[::-1], user_mask, steps=4)  # new data: no new compile
    _model(visual, prefill).generate(params, images, system, user, user_mask, steps=4)  # an equal VLM: none either
    assert compiles() == 2


def test_batched_prefill_logits_and_unpadded_prompts():
  model = _model("visionzip:dominant=9,contextual=6", "fastv:k=1,keep=7")
  params = _params(model)
  images, system, user, user_mask = _inputs()
  out = model.generate(params, images, system, user, user_mask, steps=4)
  prefill_fn = jax.jit(lambda p, i, s, u, m: model.prefill(p, i, s, u, m, max_new_tokens=3)[0])
  logits = prefill_fn(params, images, system, user, user_mask)
  assert np.isfinite(np.asarray(logits)).all()
  for i in range(3):
    # fp32 noise of batch-size-dependent matmul blocking: ~1e-5 on logits of size ~4.
    np.testing.assert_allclose(prefill_fn(params, images[i:i + 1], system, user[i:i + 1], user_mask[i:i + 1]),
                               logits[i:i + 1], rtol=1e-5, atol=5e-5)
  # Without the right padding at all (example 1's 3-token user prompt alone): the same greedy tokens.
  trimmed = model.generate(params, images[1:2], system, user[1:2, :3], None, steps=4)
  np.testing.assert_array_equal(trimmed, out[1:2])


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


def _projector_np(p, x):
  x = np.asarray(x, np.float64)
  h = _gelu(x @ np.asarray(p["Dense_0"]["kernel"], np.float64) + np.asarray(p["Dense_0"]["bias"], np.float64))
  return h @ np.asarray(p["Dense_1"]["kernel"], np.float64) + np.asarray(p["Dense_1"]["bias"], np.float64)


@pytest.mark.parametrize("visual,select_feature", [(None, "patch"), (None, "cls_patch"),
                                                   ("visionzip:dominant=9,contextual=6", "patch")])
def test_image_span_holds_the_projected_reducer_output(visual, select_feature):
  model = _model(visual, select_feature=select_feature)
  params = _params(model)
  images, system, user, user_mask = _inputs()
  spans = []

  def run(p, *a):
    out = model.inputs(p, *a)
    spans.append(out.pop("image_span"))  # static: recorded at trace time
    return out

  inp = jax.jit(run)(params, images, system, user, user_mask)
  (start, m), = spans
  assert start == 3 and m == model.num_image_tokens(HW)
  method, cfg = model.visual_method()
  signals = TOWER.apply({"params": params["vision_tower"]}, images, signals=("cls_attn", "keys"))
  if method is None:
    x = signals.x[:, 1:] if select_feature == "patch" else signals.x
    assert m == (N_PATCHES if select_feature == "patch" else N_PATCHES + 1)
  else:
    x = method.apply(signals, config=cfg).x
    assert m == method.out_count(cfg, N_PATCHES) == 15
  np.testing.assert_allclose(inp["embeds"][:, start:start + m], _projector_np(params["projector"], x),
                             rtol=1e-5, atol=5e-5)  # values up to ~20
  embed = np.asarray(params["language_model"]["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(inp["embeds"][:, :3], np.broadcast_to(embed[[1, 2, 3]], (3, 3, 32)))
  np.testing.assert_array_equal(inp["embeds"][:, 3 + m:], embed[np.asarray(user)])
  np.testing.assert_array_equal(inp["mask"][:, 3 + m:], user_mask)
  np.testing.assert_array_equal(inp["positions"], np.broadcast_to(np.arange(3 + m + 5), (3, 3 + m + 5)))


def test_every_registered_visual_reducer_fills_its_out_count():
  """Every pre-LLM method's example: the image tokens entering the LLM number its out_count (shapes only). Methods
  that need an AnyRes thumbnail are refused by name (this test bed has a single view)."""
  images, system, user, user_mask = _inputs()
  names = vlm.names("visual")
  assert {"visionzip", "divprune"} <= set(names)
  for name in names:
    method = vlm._REGISTRY[name]
    spec = method.example
    if "thumbnail" in method.needs:
      with pytest.raises(ValueError, match="thumbnail"):
        _model(spec)
      continue
    model = _model(spec)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), HW))
    out = jax.eval_shape(lambda p: {k: v for k, v in model.inputs(p, images, system, user, user_mask).items()
                                    if k not in ("image_span", "tokens")}, params)
    count = method.out_count(vlm.get(spec)[1], N_PATCHES)
    assert model.num_image_tokens(HW) == count, spec
    assert out["embeds"].shape == (3, 3 + count + 5, 32), spec


def test_in_llm_prune_shrinks_the_cache():
  model = _model("visionzip:dominant=9,contextual=6", "fastv:k=1,keep=4")
  params = _params(model)
  images, system, user, user_mask = _inputs()
  _, cache, aux = jax.jit(lambda p, *a: model.prefill(p, *a, max_new_tokens=3))(params, images, system, user,
                                                                                user_mask)
  s = 3 + 15 + 5
  assert cache.capacity == (s + 3, 3 + 4 + 5 + 3)
  kept = np.asarray(aux["keep"][1])
  assert kept.shape == (3, 12)
  assert (kept[:, :3] == np.arange(3)).all() and (kept[:, 7:] == np.arange(18, 23)).all()
  assert ((kept[:, 3:7] >= 3) & (kept[:, 3:7] < 18)).all() and (np.diff(kept, axis=1) > 0).all()


def test_bad_specs_raise():
  with pytest.raises(ValueError, match="unknown VLM reducer 'nosuch'"):
    _model("nosuch:k=1")
  with pytest.raises(ValueError, match="'prefill' reducer; the pre-LLM"):
    _model("fastv:k=2,keep=3")
  with pytest.raises(ValueError, match="'visual' reducer; the decoder"):
    _model(None, "visionzip:dominant=9,contextual=6")
  with pytest.raises(ValueError, match="select_feature"):
    _model(None, select_feature="cls")
  with pytest.raises(ValueError, match="select_feature"):
    _model("divprune:keep=12", select_feature="cls_patch")
  images, system, user, user_mask = _inputs(b=1)
  model = _model("divprune:keep=50")  # more than the 36 patches
  params = _params(_model())
  with pytest.raises(ValueError, match="keep"):
    model.generate(params, images, system, user, user_mask, steps=2)
  with pytest.raises(ValueError, match="steps"):
    _model().generate(params, images, system, user, user_mask, steps=0)
  with pytest.raises(ValueError, match="user_ids"):
    _model().generate(params, images, system, jnp.zeros((2, 5), jnp.int32), None, steps=2)
  with pytest.raises(ValueError, match="select_layer"):
    dataclasses.replace(_model(), tower=TOWER.clone(select_layer=5)).generate(params, images, system, user,
                                                                                user_mask, steps=2)

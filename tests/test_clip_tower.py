"""The CLIP vision tower (models/vlm.py) and its HF loader (checkpoints/hf_clip.py) against HF transformers.

Golden: tests/goldens/clip_tiny/ (CLIPVisionModel.save_pretrained, fp16) + clip_tiny.npz (HF 4.46.3 outputs),
made by tools/goldens/make_clip.py. 3 layers, hidden 64, 4 heads, 56 px / patch 8 -> 49 patches + CLS.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tokcomp.checkpoints import hf_clip
from tokcomp.models.vlm import CLIPVisionTower

HERE = os.path.dirname(__file__)
CKPT = os.path.join(HERE, "goldens", "clip_tiny")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def golden():
  g = np.load(os.path.join(HERE, "goldens", "clip_tiny.npz"), allow_pickle=False)
  return {k: g[k] for k in g.files}


def _images(g):
  return jnp.asarray(g["pixel_values"].transpose(0, 2, 3, 1))  # NCHW -> NHWC


def _run(tower, params, images, signals):
  return jax.jit(lambda p, x: tower.apply(p, x, signals=signals))(params, images)


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_tower_matches_hf(golden, select_layer):
  tower, params = hf_clip.load(CKPT, select_layer=select_layer)
  n = tower.num_layers
  assert n == {-2: 2, -1: 3, 1: 1}[select_layer]
  # Only the layers that run have parameters.
  assert sorted(k for k in params["params"] if k.startswith("encoderblock_")) == [
      f"encoderblock_{i}" for i in range(n)]
  s = _run(tower, params, _images(golden), ("cls_attn", "keys", "attn"))
  assert s.num_prefix == 1 and s.grid == (7, 7)
  np.testing.assert_allclose(s.x, golden["hidden_states"][select_layer], **TOL)
  # CLS row of every layer run: HF attentions[l][:, :, 0, :] -> ours [B, L, H, N].
  ref_rows = golden["attentions"][:n, :, :, 0].transpose(1, 0, 2, 3)
  assert s.cls_attn.shape == (2, n, 4, 50) and s.cls_attn.dtype == jnp.float32
  np.testing.assert_allclose(s.cls_attn, ref_rows, **TOL)
  np.testing.assert_allclose(s.attn, golden["attentions"][n - 1], **TOL)
  np.testing.assert_allclose(s.keys, golden["keys"][n - 1], **TOL)


def test_signals_are_optional(golden):
  tower, params = hf_clip.load(CKPT)
  images = _images(golden)
  s = _run(tower, params, images, ())
  assert s.cls_attn is None and s.keys is None and s.attn is None
  np.testing.assert_allclose(s.x, golden["hidden_states"][-2], **TOL)
  s = _run(tower, params, images, ("keys",))
  assert s.cls_attn is None and s.attn is None
  np.testing.assert_allclose(s.keys, golden["keys"][1], **TOL)
  default = jax.jit(tower.apply)(params, images)  # default: the cheap ones, no full attention
  assert default.attn is None and default.cls_attn.shape == (2, 2, 4, 50) and default.keys.shape == (2, 50, 16)
  with pytest.raises(ValueError, match="signals"):
    tower.apply(params, images, signals=("attention",))


def test_batch_rows_are_independent(golden):
  tower, params = hf_clip.load(CKPT)
  images = jnp.concatenate([_images(golden), _images(golden)[:1] * 0.5], axis=0)  # B = 3
  full = _run(tower, params, images, ("cls_attn", "keys", "attn"))
  for i in range(3):
    one = _run(tower, params, images[i:i + 1], ("cls_attn", "keys", "attn"))
    for name in ("x", "cls_attn", "keys", "attn"):
      np.testing.assert_allclose(getattr(full, name)[i:i + 1], getattr(one, name), rtol=1e-5, atol=1e-6,
                                 err_msg=name)


def test_loader_single_file_clipmodel_layout_and_errors(golden, tmp_path):
  """A CLIPModel-style file (text tower keys, nested vision_config) loads the same; bad inputs are named."""
  arrays = {k: v.astype(np.float32) for k, v in load_file(os.path.join(CKPT, "model.safetensors")).items()}
  with open(os.path.join(CKPT, "config.json")) as f:
    vcfg = json.load(f)
  extra = {"text_model.embeddings.token_embedding.weight": np.zeros((10, 8), np.float32),
           "visual_projection.weight": np.zeros((8, 64), np.float32), "logit_scale": np.zeros((), np.float32)}
  path = tmp_path / "model.safetensors"
  save_file({**arrays, **extra}, str(path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vcfg}))
  tower, params = hf_clip.load(str(path))
  s = _run(tower, params, _images(golden), ())
  np.testing.assert_allclose(s.x, golden["hidden_states"][-2], **TOL)

  with pytest.raises(ValueError, match="select_layer"):
    hf_clip.convert(arrays, vcfg, select_layer=0)
  with pytest.raises(ValueError, match="select_layer"):
    hf_clip.convert(arrays, vcfg, select_layer=-4)
  with pytest.raises(ValueError, match="hidden_act"):
    hf_clip.convert(arrays, {**vcfg, "hidden_act": "relu"})
  with pytest.raises(ValueError, match="num_hidden_layers"):
    hf_clip.convert(arrays, {**vcfg, "num_hidden_layers": 4})
  with pytest.raises(ValueError, match="vision_model.encoder.layers.0.mlp.fc1.weight"):
    hf_clip.convert({**arrays, "vision_model.encoder.layers.0.mlp.fc1.weight": np.zeros((128, 32), np.float32)},
                    vcfg)
  with pytest.raises(ValueError, match="does not know.*layers.0.self_attn.q_norm"):
    hf_clip.convert({**arrays, "vision_model.encoder.layers.0.self_attn.q_norm.weight": np.zeros(16, np.float32)},
                    vcfg)
  with pytest.raises(ValueError, match="pos_embedding"):
    tower.apply(params, jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match="patch_size"):
    tower.apply(params, jnp.zeros((1, 50, 50, 3)))


def test_resampled_position_embedding(golden):
  """image_size= resamples the patch grid; at the checkpoint's own size it is the identity."""
  tower, params = hf_clip.load(CKPT, image_size=56)
  np.testing.assert_allclose(_run(tower, params, _images(golden), ()).x, golden["hidden_states"][-2], **TOL)
  tower, params = hf_clip.load(CKPT, image_size=64)
  assert params["params"]["pos_embedding"].shape == (1, 65, 64)
  s = _run(tower, params, jnp.zeros((2, 64, 64, 3)), ("cls_attn",))
  assert s.grid == (8, 8) and s.cls_attn.shape == (2, 2, 4, 65) and np.isfinite(s.x).all()


def test_random_init_shapes():
  tower = CLIPVisionTower(patch_size=(7, 7), width=32, depth=3, mlp_dim=64, num_heads=2, select_layer=-2)
  params = jax.jit(tower.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
  assert "encoderblock_2" not in params["params"] and "encoderblock_1" in params["params"]
  s = tower.apply(params, jax.random.normal(jax.random.key(1), (2, 28, 28, 3)))
  assert s.x.shape == (2, 17, 32) and s.cls_attn.shape == (2, 2, 2, 17) and s.keys.shape == (2, 17, 16)
  np.testing.assert_allclose(s.cls_attn.sum(-1), 1.0, rtol=1e-5)

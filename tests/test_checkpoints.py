"""tokcomp.checkpoints against timm 1.0.31 on identical weights (fixtures: tools/make_checkpoint_fixtures.py).

Every fixture is a tiny ViT (img 32, patch 8, width 64, 2 heads, depth 2, MLP 128, 5 classes) whose
`<name>.io.npz` holds timm's own input, logits and `forward_features` output; see tools/goldens/README.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close
from tokcomp import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "checkpoints")
TIMM = ["timm_vit_cls", "timm_vit_gap", "timm_deit_distilled", "timm_vit_reg4"]
BIG_VISION = ["bigvision_vit_cls", "bigvision_vit_gap"]
CASES = [(n, ext) for n in TIMM for ext in (".safetensors", ".npz")] + [(n, ".npz") for n in BIG_VISION]


def fixture(name: str):
  """(config dict, NHWC images, timm logits, timm forward_features) of one fixture."""
  with np.load(os.path.join(FIXTURES, name + ".io.npz"), allow_pickle=False) as g:
    config = json.loads(str(g["config"]))
    images = np.ascontiguousarray(g["input"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    return config, images, g["logits"], g["features"]


def path(name: str, ext: str = ".npz") -> str:
  return os.path.join(FIXTURES, name + ext)


def heads(config) -> int:
  return config["constructor_kwargs"]["num_heads"]


def timm_state(name: str = "timm_vit_cls") -> dict[str, np.ndarray]:
  with np.load(path(name), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def forward(model, params, images):
  return jax.jit(model.apply)(params, jnp.asarray(images))


# --- numerical parity with timm ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,ext", CASES, ids=[n + e for n, e in CASES])
def test_load_matches_timm(name, ext):
  config, images, ref_logits, ref_features = fixture(name)
  model, params = checkpoints.load(path(name, ext), num_heads=heads(config))
  logits, aux = forward(model, params, images)
  assert logits.shape == ref_logits.shape
  assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, err_msg=f"{name}{ext} logits")
  features = aux["tokens"].x
  assert features.shape == ref_features.shape, "token sequence length or order differs from timm"
  assert_close(features, ref_features, rtol=1e-5, atol=1e-5, err_msg=f"{name}{ext} forward_features")


@pytest.mark.parametrize("name,ext", CASES, ids=[n + e for n, e in CASES])
def test_inferred_config(name, ext):
  config, _, _, _ = fixture(name)
  kw = config["constructor_kwargs"]
  model, _ = checkpoints.load(path(name, ext), num_heads=heads(config))
  assert model.class_token == config["has_cls_token"]
  assert model.distilled == config["has_dist_token"]
  assert model.num_registers == config["num_reg_tokens"]
  assert model.num_prefix == config["num_prefix_tokens"]
  assert model.pool == ("token" if config["global_pool"] == "token" else "gap")
  assert model.posemb_prefix == config["pos_embed_covers_prefix"]
  assert model.fc_norm == config["fc_norm_is_layernorm"]
  assert (model.width, model.depth, model.mlp_dim, model.num_heads, model.num_classes) == (
      kw["embed_dim"], kw["depth"], config["mlp_hidden"], kw["num_heads"], kw["num_classes"])
  assert tuple(model.patch_size) == (kw["patch_size"],) * 2


def test_formats_give_identical_params():
  for name in TIMM:
    _, a = checkpoints.load(path(name, ".safetensors"), num_heads=2)
    _, b = checkpoints.load(path(name, ".npz"), num_heads=2)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_big_vision_reads_heads_from_kernels():
  """big_vision kernels are [D, H, d]: no num_heads needed even at a non-standard width."""
  config, images, ref_logits, _ = fixture("bigvision_vit_cls")
  model, params = checkpoints.load(path("bigvision_vit_cls"))
  assert model.num_heads == heads(config)
  assert_close(forward(model, params, images)[0], ref_logits, rtol=1e-5, atol=1e-5)


def test_load_from_mapping():
  config, images, ref_logits, _ = fixture("timm_vit_cls")
  model, params = checkpoints.load(timm_state("timm_vit_cls"), num_heads=2)
  assert_close(forward(model, params, images)[0], ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TIMM + BIG_VISION)
def test_load_with_reducer(name):
  config, images, ref_logits, _ = fixture(name)
  model, params = checkpoints.load(path(name), num_heads=heads(config), reduce="tome:r=2")
  assert model.reduce == "tome:r=2"
  logits, aux = forward(model, params, images)
  assert logits.shape == ref_logits.shape
  assert np.all(np.isfinite(np.asarray(logits)))
  n0 = config["seq_len"]
  assert aux["tokens"].n == n0 - 2 * model.depth, "ToMe r=2 must remove 2 tokens per block"
  dense, _ = forward(model.clone(reduce=None), params, images)
  assert_close(dense, ref_logits, rtol=1e-5, atol=1e-5, err_msg="dense logits with the same params")


@pytest.mark.parametrize("name", TIMM + BIG_VISION)
def test_image_size_resamples_posemb(name):
  config, _, _, _ = fixture(name)
  model, params = checkpoints.load(path(name), num_heads=heads(config))
  model48, params48 = checkpoints.load(path(name), num_heads=heads(config), image_size=48)
  prefix = model.num_prefix if model.posemb_prefix else 0
  pos, pos48 = params["params"]["pos_embedding"], params48["params"]["pos_embedding"]
  assert pos.shape == (1, prefix + 16, 64)
  assert pos48.shape == (1, prefix + 36, 64)  # 48 / 8 = 6x6 patches
  np.testing.assert_array_equal(pos48[:, :prefix], pos[:, :prefix])  # the prefix part is not resampled
  # Every other parameter is untouched.
  strip = lambda p: {k: v for k, v in p["params"].items() if k != "pos_embedding"}
  jax.tree.map(np.testing.assert_array_equal, strip(params48), strip(params))

  images = jax.random.normal(jax.random.key(0), (2, 48, 48, 3))
  logits, aux = forward(model48, params48, images)
  assert logits.shape == (2, 5)
  assert np.all(np.isfinite(np.asarray(logits)))
  assert aux["tokens"].n == model.num_prefix + 36

  # Asking for the checkpoint's own size is a no-op.
  _, same = checkpoints.load(path(name), num_heads=heads(config), image_size=32)
  np.testing.assert_array_equal(same["params"]["pos_embedding"], pos)


def test_resample_posemb_keeps_a_linear_ramp():
  """Bilinear resampling of a field that is linear along the rows stays linear (up to the edges)."""
  grid = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 4, 1), np.float32)  # value = row
  posemb = np.concatenate([np.full((1, 1, 1), 7.0, np.float32), grid.reshape(1, 16, 1)], axis=1)
  out = checkpoints.resample_posemb(posemb, (4, 4), (8, 8), num_prefix=1)
  assert out.shape == (1, 65, 1)
  assert out[0, 0, 0] == 7.0
  rows = out[0, 1:, 0].reshape(8, 8)
  assert np.allclose(rows, rows[:, :1])  # constant along the columns
  assert np.all(np.diff(rows[:, 0]) >= 0) and rows[0, 0] == 0 and rows[-1, 0] == 3


# --- clear errors --------------------------------------------------------------------------------------------


def test_pickle_formats_are_refused(tmp_path):
  p = tmp_path / "vit.pth"
  p.write_bytes(b"\x80\x04not really a pickle")
  with pytest.raises(ValueError, match=r"must be \.safetensors or \.npz \(no pickle"):
    checkpoints.load(p, num_heads=2)


def test_missing_file():
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.load(os.path.join(FIXTURES, "no_such_checkpoint.safetensors"), num_heads=2)


def test_unrecognised_keys():
  arrays = {"model.encoder.weight": np.zeros((4, 4), np.float32), "model.encoder.bias": np.zeros(4, np.float32)}
  with pytest.raises(ValueError, match=r"unrecognised checkpoint.*first keys: model\.encoder\.bias"):
    checkpoints.load(arrays, num_heads=2)


def test_layer_scale_is_refused():
  state = timm_state()
  state["blocks.0.ls1.gamma"] = np.ones(64, np.float32)
  with pytest.raises(ValueError, match=r"LayerScale.*blocks\.0\.ls1\.gamma.*does not implement"):
    checkpoints.load(state, num_heads=2)


def test_unknown_extra_key():
  state = timm_state()
  state["blocks.1.attn.extra_scale"] = np.ones(64, np.float32)
  with pytest.raises(ValueError, match=r"keys tokcomp does not know how to load.*blocks\.1\.attn\.extra_scale"):
    checkpoints.load(state, num_heads=2)


def test_unknown_extra_key_big_vision():
  with np.load(path("bigvision_vit_cls"), allow_pickle=False) as f:
    state = {k: f[k] for k in f.files}
  state["Transformer/encoderblock_0/Adapter_0/kernel"] = np.ones((64, 64), np.float32)
  with pytest.raises(ValueError, match=r"unexpected: \['Transformer/encoderblock_0/Adapter_0/kernel'\]"):
    checkpoints.load(state)


# (timm key, bad shape, the key the message must name, the shape it must show: converted layout for
# plain Linear weights, which are transposed before the check)
WRONG_SHAPES = [
    ("head.bias", (3,), "head/bias", (3,)),
    ("blocks.1.norm1.weight", (62,), "Transformer/encoderblock_1/LayerNorm_0/scale", (62,)),
    ("blocks.1.mlp.fc1.weight", (120, 64), "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel", (64, 120)),
    ("pos_embed", (1, 17, 62), "pos_embedding", (1, 17, 62)),
    ("cls_token", (1, 2, 64), "cls", (1, 2, 64)),
    ("blocks.1.attn.qkv.weight", (190, 64), "blocks.1.attn.qkv.weight", (190, 64)),
    ("blocks.0.attn.qkv.bias", (190,), "blocks.0.attn.qkv.bias", (190,)),
    ("blocks.1.attn.proj.weight", (64, 62), "blocks.1.attn.proj.weight", (64, 62)),
]


@pytest.mark.parametrize("key,shape,named,shown", WRONG_SHAPES, ids=[w[0] for w in WRONG_SHAPES])
def test_wrong_shape_names_the_key(key, shape, named, shown):
  state = timm_state()
  state[key] = np.zeros(shape, np.float32)
  with pytest.raises(ValueError, match="checkpoint does not fit the model") as e:
    checkpoints.load(state, num_heads=2)
  assert f"shape {named}: checkpoint {shown} vs model " in str(e.value), str(e.value)


def test_wrong_shape_big_vision_names_the_key():
  with np.load(path("bigvision_vit_gap"), allow_pickle=False) as f:
    state = {k: f[k] for k in f.files}
  key = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"
  state[key] = np.zeros(63, np.float32)
  with pytest.raises(ValueError, match=r"shape Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias: "
                                       r"checkpoint \(63,\) vs model \(64,\)"):
    checkpoints.load(state)


def test_nonstandard_width_needs_num_heads():
  with pytest.raises(ValueError, match=r"width 64 is not a standard ViT size.*pass num_heads="):
    checkpoints.load(path("timm_vit_cls", ".safetensors"))


def test_num_heads_must_divide_width():
  with pytest.raises(ValueError, match=r"num_heads=3 must divide the checkpoint width 64"):
    checkpoints.load(path("timm_vit_cls", ".safetensors"), num_heads=3)


def test_num_heads_must_match_big_vision_kernels():
  with pytest.raises(ValueError, match=r"num_heads=4, but the checkpoint's attention kernels have 2 heads"):
    checkpoints.load(path("bigvision_vit_cls"), num_heads=4)


@pytest.mark.parametrize("name", ["timm_vit_cls", "bigvision_vit_cls"])
def test_image_size_not_a_multiple_of_the_patch(name):
  with pytest.raises(ValueError, match=r"image size 30x30: must be a positive multiple of ViT\.patch_size"):
    checkpoints.load(path(name), num_heads=2, image_size=30)


@pytest.mark.parametrize("name", ["timm_vit_cls", "timm_vit_reg4"])
def test_apply_at_another_size_than_the_posemb(name):
  model, params = checkpoints.load(path(name), num_heads=2)
  images = jnp.zeros((1, 48, 48, 3))
  with pytest.raises(ValueError, match=r"pos_embedding has \d+ positions but a 48x48 image needs \d+: "
                                       r"resample it"):
    forward(model, params, images)


# --- no torch ------------------------------------------------------------------------------------------------

NO_TORCH = r"""
import importlib.abc, sys

attempts = []

class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      attempts.append(name)
      raise ImportError("torch is blocked in this test")
    return None

sys.meta_path.insert(0, Block())
from tokcomp import checkpoints
d = sys.argv[1]
for f, h in [("timm_vit_cls.safetensors", 2), ("timm_deit_distilled.npz", 2), ("bigvision_vit_gap.npz", None)]:
  model, params = checkpoints.load(d + "/" + f, num_heads=h)
assert not attempts, f"tried to import {attempts}"
assert "torch" not in sys.modules
print("no-torch-ok")
"""


def test_loading_never_imports_torch():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  r = subprocess.run([sys.executable, "-c", NO_TORCH, FIXTURES], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "no-torch-ok" in r.stdout

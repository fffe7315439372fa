"""LPIPS-VGG (tokcomp/tokenizers/lpips.py) and its converter (tokcomp/checkpoints/lpips.py): parity with the `lpips`
package (tests/goldens/lpips_vgg.npz, tools/goldens/make_lpips.py), invariants, errors, and the train.py option.

The golden's VGG16 weights are not committed (58 MB): `random_vgg16` regenerates them from the seed with the same
NumPy recipe as the golden script, and the fixture's per-array checksums prove it did. The lin weights in the
fixture are the package's real ones (weights/v0.1/vgg.pth, lpips 0.1.4). The invariance tests use a narrow VGG
(same 13-conv layout, widths 8-32) to stay fast.
"""
from __future__ import annotations

import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokcomp.checkpoints import lpips as convert
from tokcomp.tokenizers import losses
from tokcomp.tokenizers import lpips as L

GOLDEN = os.path.join(os.path.dirname(__file__), "goldens", "lpips_vgg.npz")
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
NARROW = (8, 16, 16, 32, 32)


def random_vgg16(seed: int, widths=L.VGG16_WIDTHS) -> dict[str, np.ndarray]:
  """torchvision vgg16 `features.N.{weight,bias}` from a seed: the recipe of tools/goldens/make_lpips.py."""
  rng = np.random.default_rng(seed)
  stages = [s for s, n in enumerate(L.VGG16_CONVS) for _ in range(n)]
  out, cin = {}, 3
  for index, stage in zip(CONV_INDICES, stages):
    cout = widths[stage]
    out[f"features.{index}.weight"] = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) * np.float32(
        np.sqrt(2.0 / (9 * cin)))
    out[f"features.{index}.bias"] = rng.standard_normal((cout,), dtype=np.float32) * np.float32(0.05)
    cin = cout
  return out


def random_lin(seed: int, widths) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {f"lin{l}.model.1.weight": rng.uniform(0.0, 1.0, (1, w, 1, 1)).astype(np.float32)
          for l, w in enumerate(widths)}


@functools.cache
def golden():
  g = np.load(GOLDEN, allow_pickle=False)
  return json.loads(str(g["config"])), {k: g[k] for k in g.files if k != "config"}


@functools.cache
def golden_arrays():
  config, g = golden()
  return random_vgg16(config["seed"], tuple(config["widths"])), {k[len("lin/"):]: v for k, v in g.items()
                                                                 if k.startswith("lin/")}


@functools.cache
def narrow_params(seed: int = 0):
  return convert.load(random_vgg16(seed, NARROW), random_lin(seed, NARROW))


def images(shape, seed):
  return jax.random.uniform(jax.random.key(seed), shape, jnp.float32)


# --- parity -----------------------------------------------------------------------------------------------------

def test_regenerated_weights_are_the_goldens():
  _, g = golden()
  vgg, _ = golden_arrays()
  assert len(vgg) == 26
  for key, value in vgg.items():
    check = g["check/" + key[len("features."):]]
    assert value.astype(np.float64).sum() == pytest.approx(check[0], rel=1e-12, abs=1e-9), key
    np.testing.assert_array_equal(value.ravel()[:3].astype(np.float64), check[1:], err_msg=key)


@functools.cache
def distances_and_layers():
  """Our distance and per-layer terms (the lin heads' spatial means), in one jit."""
  def run(params, x, y):
    layers = []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
        layers.append(jnp.mean(out, axis=(1, 2, 3)))
      return out
    with nn.intercept_methods(record):
      d = L.lpips(params, x, y, precision=jax.lax.Precision.HIGHEST)
    return d, jnp.stack(layers)
  return jax.jit(run)


@pytest.mark.parametrize("case", ["rgb64", "rgb32", "rgb48x72", "gray40x56"])
def test_parity_with_lpips_package(case):
  config, g = golden()
  params = convert.load(*golden_arrays())
  x, y = (g[f"{case}/{k}"].astype(np.float32) / np.float32(255) for k in "xy")
  assert x.shape == tuple(config["cases"][case])
  d, per_layer = distances_and_layers()(params, x, y)
  np.testing.assert_allclose(per_layer, g[f"{case}/per_layer"], rtol=1e-5, atol=0, err_msg=f"{case} per layer")
  np.testing.assert_allclose(d, g[f"{case}/d"], rtol=1e-5, atol=0, err_msg=case)
  # the cases differ (small noise < large noise < an unrelated image): a fixture that cannot tell them apart fails
  assert np.all(np.diff(g[f"{case}/d"]) > 0) and g[f"{case}/d"][0] > 1e-4


# --- invariants ---------------------------------------------------------------------------------------------------

def test_jit_once_batch_rows_and_identity():
  params = narrow_params()
  f = jax.jit(chex.assert_max_traces(L.lpips, n=1))
  x, y = images((3, 32, 40, 3), 0), images((3, 32, 40, 3), 1)
  d = f(params, x, y)
  f(params, y, x)  # another input of the same shape: no retrace
  assert d.shape == (3,) and d.dtype == jnp.float32 and bool(jnp.all(d > 0))
  rows = jnp.concatenate([jax.jit(L.lpips)(params, x[i:i + 1], y[i:i + 1]) for i in range(3)])
  np.testing.assert_allclose(d, rows, rtol=1e-6)
  np.testing.assert_allclose(f(params, y, x), d, rtol=1e-6)  # symmetric
  assert np.all(np.asarray(f(params, x, x)) == 0.0)
  # grayscale = the same image repeated to RGB
  gray = images((2, 32, 32, 1), 2)
  np.testing.assert_allclose(jax.jit(L.lpips)(params, gray, gray[::-1]),
                             jax.jit(L.lpips)(params, jnp.repeat(gray, 3, -1), jnp.repeat(gray[::-1], 3, -1)),
                             rtol=1e-6)


def test_unit_normalize_matches_package_and_has_finite_gradient_at_zero():
  f = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(L.unit_normalize(f), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  g = jax.grad(lambda v: jnp.sum(jnp.square(L.unit_normalize(v) - 0.3)))(f)
  assert bool(jnp.all(jnp.isfinite(g)))
  naive = jax.grad(lambda v: jnp.sum(jnp.square(v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-10) - 0.3)))(f)
  assert not bool(jnp.all(jnp.isfinite(naive))), "the zero row must be a case where a plain norm's gradient is NaN"


def test_gradient_is_finite_and_nonzero_with_dead_feature_positions():
  arrays = random_vgg16(1, NARROW)
  for index in (24, 26, 28):  # stage 5 biases far negative: relu5_3 is exactly zero everywhere
    arrays[f"features.{index}.bias"] = np.full_like(arrays[f"features.{index}.bias"], -100.0)
  params = convert.load(arrays, random_lin(1, NARROW))
  x, y = images((2, 32, 32, 3), 3), images((2, 32, 32, 3), 4)
  taps = L.VGG16Features(NARROW).apply({"params": params["params"]["vgg"]}, x)
  assert float(jnp.abs(taps[4]).max()) == 0.0 and float(jnp.abs(taps[3]).max()) > 0
  grad = jax.jit(jax.grad(lambda a: jnp.sum(L.lpips(params, a, y))))
  for at in (x, y):  # also at recon == target, where every difference is 0
    g = grad(at)
    assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(grad(x)).sum()) > 0


# --- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_shape, y_shape, match", [
    ((1, 31, 64, 3), (1, 31, 64, 3), r"31x64; H and W must be >= 32"),
    ((1, 64, 16, 3), (1, 64, 16, 3), r"must be >= 32"),
    ((1, 32, 32, 2), (1, 32, 32, 2), r"C = 1 or 3"),
    ((32, 32, 3), (32, 32, 3), r"NHWC"),
    ((1, 32, 32, 3), (2, 32, 32, 3), r"differ in shape"),
])
def test_bad_inputs(x_shape, y_shape, match):
  with pytest.raises(ValueError, match=match):
    L.lpips(narrow_params(), jnp.zeros(x_shape), jnp.zeros(y_shape))


def test_converter_key_forms_and_errors(tmp_path):
  vgg, lin = random_vgg16(0, NARROW), random_lin(0, NARROW)
  ref = narrow_params()
  same = lambda p: jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), p, ref))
  # bare `vgg16().features.state_dict()` keys; an LPIPS module's state dict in one file (net.sliceK.N, lins.k
  # duplicates, scaling buffers); classifier keys of a whole vgg16 state dict are ignored
  assert same(convert.load({k[len("features."):]: v for k, v in vgg.items()}, lin))
  slice_of = lambda i: 1 + sum(i >= b for b in (4, 9, 16, 23))
  module = {f"net.slice{slice_of(int(k.split('.')[1]))}.{k[len('features.'):]}": v for k, v in vgg.items()}
  module.update(lin, **{f"lins.{l}.model.1.weight": lin[f"lin{l}.model.1.weight"] for l in range(5)},
                **{"scaling_layer.shift": np.array(L.SHIFT, np.float32).reshape(1, 3, 1, 1),
                   "scaling_layer.scale": np.array(L.SCALE, np.float32).reshape(1, 3, 1, 1)})
  assert same(convert.load(module))
  assert same(convert.load({**vgg, "classifier.0.weight": np.zeros((4, 4), np.float32)}, lin))
  # files: safetensors and npz
  from safetensors.numpy import save_file
  save_file(vgg, str(tmp_path / "vgg.safetensors"))
  np.savez(tmp_path / "lin.npz", **lin)
  assert same(convert.load(tmp_path / "vgg.safetensors", tmp_path / "lin.npz"))

  with pytest.raises(ValueError, match=r"missing \['lin0.model.1.weight'.*weights/v0.1/vgg.pth"):
    convert.load(vgg)
  with pytest.raises(ValueError, match=r"torch pickle.*safetensors"):
    convert.load(str(tmp_path / "vgg16.pth"), tmp_path / "lin.npz")
  with pytest.raises(ValueError, match="lin2.model.1.weight has negative"):
    convert.load(vgg, {**lin, "lin2.model.1.weight": -lin["lin2.model.1.weight"]})
  with pytest.raises(ValueError, match="no VGG16 conv weights"):
    convert.load({"conv.weight": np.zeros(3)}, lin)
  with pytest.raises(ValueError, match=r"indices \[0, 2, 5"):
    convert.load({k: v for k, v in vgg.items() if not k.startswith("features.28.")}, lin)
  with pytest.raises(ValueError, match="vgg16_bn"):
    convert.load({**vgg, **{f"features.1.{k}": np.zeros(8, np.float32) for k in ("weight", "bias", "running_mean")}},
                 lin)
  with pytest.raises(ValueError, match=r"(?s)do not fit.*lin1/kernel: checkpoint \(17, 1\) vs model \(16, 1\)"):
    convert.load(vgg, {**lin, "lin1.model.1.weight": np.ones((1, 17, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="scaling_layer.shift"):
    convert.load({**module, "scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)})


# --- training -------------------------------------------------------------------------------------------------------

def test_lpips_loss_resize_and_perceptual_loss_dispatch():
  params = narrow_params()
  loss = L.LPIPSLoss(params, resize=32)
  recon, target = images((2, 28, 28, 1), 5), images((2, 28, 28, 1), 6)
  value, g = jax.jit(jax.value_and_grad(lambda r: losses.perceptual_loss(loss, r, target)))(recon)
  up = lambda v: jax.image.resize(v, (2, 32, 32, 1), "bilinear")
  np.testing.assert_allclose(value, jnp.mean(jax.jit(L.lpips)(params, up(recon), up(target))), rtol=1e-6)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError, match="28x28; H and W must be >= 32"):
    L.LPIPSLoss(params)(recon, target)
  with pytest.raises(ValueError, match="resize=16"):
    L.LPIPSLoss(params, resize=16)


def test_train_config_with_lpips_vgg(tmp_path):
  import train
  from configs import fmnist_tokenizer
  from safetensors.numpy import save_file
  # regenerated weights as files (the narrow VGG: the full width costs ~10 s more here; the golden covers it)
  vgg, lin = random_vgg16(0, NARROW), random_lin(0, NARROW)
  save_file(vgg, str(tmp_path / "vgg16_features.safetensors"))
  np.savez(tmp_path / "lpips_vgg_lin.npz", **lin)
  arg = (f"tokenizer=one_d_piece,runlocal,lpips_vgg={tmp_path / 'vgg16_features.safetensors'},"
         f"lpips_lin={tmp_path / 'lpips_vgg_lin.npz'},lpips_resize=32")
  c = fmnist_tokenizer.get_config(arg)
  assert c.perceptual.kind == "lpips_vgg" and c.perceptual.resize == 32
  c.batch, c.eval_batch, c.eval_limit, c.log_every = 8, 16, 16, 1
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(c, str(workdir))
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert summary["steps"] == 2 and len(rows) == 2
  assert all(np.isfinite(r["loss_perceptual"]) and r["loss_perceptual"] > 0 for r in rows), rows

  with pytest.raises(ValueError, match=r"lin_weights=.*weights/v0.1/vgg.pth"):
    train.perceptual_features(dict(kind="lpips_vgg"))
  with pytest.raises(ValueError, match=r"missing \['lin0.model.1.weight'"):
    train.perceptual_features(dict(kind="lpips_vgg", weights=str(tmp_path / "vgg16_features.safetensors")))
  with pytest.raises(ValueError, match="kind='vgg'"):
    train.perceptual_features(dict(kind="vgg", weights="x"))
  with pytest.raises(ValueError, match="pick one"):
    fmnist_tokenizer.get_config("perceptual_vit=W,lpips_vgg=V")
  with pytest.raises(ValueError, match="decoder=pixel"):  # it would be silently skipped: no pixels in training
    fmnist_tokenizer.get_config("tokenizer=flextok,lpips_vgg=V")


def test_vit_kind_loads_a_workdir_trained_at_28px(dense_run):
  """The default kind is unchanged; `image_size` (set by configs/fmnist_tokenizer.py) lets a Fashion-MNIST ViT
  workdir (28 px, a 7x7 grid at patch 4) load: the fallback guess of 8 patches per side does not fit it."""
  import train
  from configs import fmnist_vit
  spec = dict(weights=dense_run, model=fmnist_vit.get_config("runlocal").model.to_dict(), blocks=(0, 1))
  features = train.perceptual_features({**spec, "image_size": 28})
  assert isinstance(features, losses.ViTFeatures) and features.blocks == (0, 1)
  with pytest.raises(ValueError, match="pos_embedding"):
    train.perceptual_features(spec)

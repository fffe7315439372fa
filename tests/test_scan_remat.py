"""ViT(scan=True) and ViT(remat=...): same function as the per-block model, fewer traced blocks, clear errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokcomp.models import vit
from tokcomp.reducers import ats
from tokcomp import vis

KW = dict(num_classes=10, patch_size=(4, 4), width=32, depth=6, mlp_dim=64, num_heads=2)
SPECS = [None, "tome:r=4", "evit:keep=0.7,layers=1-3", "gtp:num_prop=4", "mctf:r=4", "ats:keep=0.7,layers=2",
         "diffrate:prune=50-40-40-30-25-20,merge=50-40-35-25-20-15"]


@pytest.fixture(scope="module")
def setup():
  images = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  params = vit.ViT(**KW).init(jax.random.key(0), images)["params"]
  return images, params


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("spec", SPECS)
def test_scan_equals_per_block(setup, spec):
  images, params = setup
  def forward(model, p):
    return jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(p, images)

  per_block = forward(vit.ViT(**KW, reduce=spec), params)
  scanned = forward(vit.ViT(**KW, reduce=spec, scan=True), vit.stack_blocks(params))
  np.testing.assert_allclose(scanned, per_block, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec,remat", [(None, "full"), ("tome:r=4", "full"),
                                        ("evit:keep=0.7,layers=1-3", "dots_saveable")])
def test_remat_and_scan_gradients_equal_plain(setup, spec, remat):
  images, params = setup
  labels = jnp.arange(3) % 10

  def loss(p, model):
    logits = model.apply({"params": p}, images)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  plain = vit.ViT(**KW, reduce=spec)
  g = grad(params, plain)
  g_remat = grad(params, plain.clone(remat=remat))
  g_scan = grad(vit.stack_blocks(params), plain.clone(scan=True, remat=remat))
  assert _max_diff(g, g_remat) < 1e-6
  assert _max_diff(vit.stack_blocks(g), g_scan) < 1e-6
  assert max(float(jnp.max(jnp.abs(l))) for l in jax.tree_util.tree_leaves(g)) > 0  # the check is not vacuous


def _dot_count(model, params, images) -> int:
  return jax.jit(lambda p, x: model.apply({"params": p}, x)[0]).lower(params, images).as_text().count("dot_general")


def test_scan_traces_one_block_per_run(setup):
  """A dense scan model's program does not grow with depth; the per-block one grows by a block per layer."""
  images, _ = setup
  counts = {}
  for depth in (3, 6):
    for scan in (False, True):
      model = vit.ViT(**{**KW, "depth": depth}, scan=scan)
      p = model.init(jax.random.key(0), images)["params"]
      counts[depth, scan] = _dot_count(model, p, images)
  assert counts[3, True] == counts[6, True]
  assert counts[6, False] > counts[3, False] > counts[3, True]
  # EViT at blocks 1 and 3 of 6: runs {0}, {1}, {2}, {3}, {4, 5} -> one traced block fewer than per block
  spec, one_block = "evit:keep=0.7,layers=1-3", (counts[6, False] - counts[3, False]) // 3
  model = vit.ViT(**KW, reduce=spec)
  p = model.init(jax.random.key(0), images)["params"]
  scanned = _dot_count(model.clone(scan=True), vit.stack_blocks(p), images)
  assert _dot_count(model, p, images) - scanned == one_block


def test_scan_init_stacks_independent_blocks(setup):
  images, _ = setup
  params = vit.ViT(**KW, scan=True).init(jax.random.key(0), images)["params"]
  kernel = params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.shape == (KW["depth"], KW["width"], KW["mlp_dim"])
  assert not np.allclose(kernel[0], kernel[1])  # each block drew its own initialisation


def test_scan_compiles_once(setup):
  images, params = setup
  model = vit.ViT(**KW, reduce="evit:keep=0.7,layers=1-3", scan=True, remat="full")
  fn = jax.jit(chex.assert_max_traces(lambda p, x: model.apply({"params": p}, x)[0], n=1))
  stacked = vit.stack_blocks(params)
  fn(stacked, images)
  fn(stacked, images + 1.0)


def test_layout_conversions(setup):
  images, params = setup
  stacked = vit.stack_blocks(params)
  assert "encoderblock_0" not in stacked["Transformer"] and "encoder_norm" in stacked["Transformer"]
  assert _max_diff(vit.unstack_blocks(stacked), params) == 0
  assert vit.match_block_layout(params, stacked)["Transformer"].keys() == stacked["Transformer"].keys()
  assert vit.match_block_layout(stacked, params)["Transformer"].keys() == params["Transformer"].keys()
  assert vit.match_block_layout(params, params) is params


def test_analysis_tools_accept_scan_models(setup):
  images, params = setup
  spec = "ats:keep=0.7,layers=2"
  plain = vit.ViT(**KW, reduce=spec)
  counts = ats.effective_layer_counts(plain, {"params": params}, images)
  counts_scan = ats.effective_layer_counts(plain.clone(scan=True), {"params": vit.stack_blocks(params)}, images)
  np.testing.assert_array_equal(counts_scan, counts)
  stages = vis.stage_tokens(plain.clone(scan=True), {"params": vit.stack_blocks(params)}, images)
  assert [i for i, _ in stages] == [2]


def test_errors(setup):
  images, params = setup
  with pytest.raises(ValueError, match="ViT.remat='most'.*must be one of"):
    vit.ViT(**KW, remat="most").init(jax.random.key(0), images)
  with pytest.raises(ValueError, match=r"scan=True runs training-free reducers only.*dynamicvit"):
    vit.ViT(**KW, reduce="dynamicvit:keep=0.7,layers=1", scan=True).init(jax.random.key(0), images)
  learned = vit.ViT(**KW, reduce="dynamicvit:keep=0.7,layers=1").init(jax.random.key(0), images)["params"]
  with pytest.raises(ValueError, match="encoderblock_1 differs in structure"):
    vit.stack_blocks(learned)
  with pytest.raises(ValueError, match="not in the scan layout"):
    vit.unstack_blocks(params)

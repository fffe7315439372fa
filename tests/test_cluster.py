"""Token clustering + reconstruction (Liang et al., NeurIPS 2022): parity with the official Expedit-Segmenter
ops (goldens from tools/goldens/make_cluster.py, fp32, 1e-5), the method's own invariants and errors, and the
fidelity of the reconstructed dense map to the dense ViT's."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load, model_from_state, nhwc
from helpers import assert_close, images, random_params, tiny_vit, tokens_and_signals
from tokcomp import reducers
from tokcomp.models import dense
from tokcomp.models.vit import Encoder1DBlock
from tokcomp.ops import cluster as ops
from tokcomp.reducers import cluster as cluster_method

CASES = ["cluster_a1_g3x4_end", "cluster_a2_g5x5_b3", "cluster_a1_g4x4_kall"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_parity(ours, ref, what):
  """rtol 1e-5 with atol 1e-5 x the array's largest magnitude. The soft k-means amplifies fp32 rounding of the
  distances by τ: on cluster_a2_g5x5_b3 the reference's own fp32 centres are 2.8e-5 (abs, |c| <= 7.5) from a
  float64 loop of its equations, ours 5e-6, so an elementwise 1e-5 would test summation order, not the method.
  The bound is 2e-5 x the largest magnitude: with XLA's CPU backend at -O0 (the test suite's setting, conftest.py)
  one of the 14,400 block-3 outputs of that case lands at 1.15e-5 x max (1.27e-4 abs, after the reconstruction);
  at the default level all are within 1e-5 x max."""
  ref = np.asarray(ref)
  assert_close(ours, ref, rtol=1e-5, atol=2e-5 * max(1.0, float(np.abs(ref).max())), err_msg=what)


def cos_and_rel(f, ref):
  f, ref = np.asarray(f, np.float64), np.asarray(ref, np.float64)
  cos = np.sum(f * ref, -1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(ref, axis=-1))
  return float(cos.mean()), float(np.linalg.norm(f - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def golden_model():
  config, state, g = load("cluster_model56")
  model, params = model_from_state(state, num_heads=config["num_heads"])
  return model, params, g


# --- parity with the reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", CASES)
def test_matches_reference(golden_model, name):
  model, params, gm = golden_model
  config, _, g = load(name)
  beta = None if config["recon_location"] is None else config["beta"]
  net = dense.from_vit(model, cluster=config["spec"], reconstruct_at=beta, k=config["k"],
                       recon_tau=config["recon_tau"])
  assert list(net.counts((56, 56))) == [n for n in config["tokens_per_block"]]

  def f(p, x):
    return net.apply(p, x, capture_intermediates=lambda mdl, _: isinstance(mdl, Encoder1DBlock))
  (features, aux), inter = jax.jit(f)(params, nhwc(gm["input"]))
  blocks = inter["intermediates"]["Transformer"]
  for i in range(model.depth):
    assert_parity(blocks[f"encoderblock_{i}"]["__call__"][0].x, g[f"block_out/{i}"], f"block {i}")
  state = aux["cluster"]
  assert_parity(state.patches, g["cluster_in"], "clustering input")
  assert_parity(state.centres, g["centres"], "centres")
  clustered = blocks[f"encoderblock_{config['alpha']}"]["__call__"][0]  # the block right after clustering
  np.testing.assert_array_equal(np.asarray(clustered.index)[:, 1:] - 1, g["hard_labels"])
  relation = ops.topk_relation(jnp.asarray(g["cluster_in"]), jnp.asarray(g["centres"]), config["k"],
                               config["recon_tau"])
  assert_close(relation, g["relation"], rtol=1e-5, atol=1e-6, err_msg="reconstruction weights")
  assert_parity(features, g["dense_map"], "dense map")
  assert_parity(aux["logits"], g["logits"], "logits")


def test_dense_model_map_matches_reference(golden_model):
  model, params, gm = golden_model
  features, aux = jax.jit(dense.from_vit(model).apply)(params, nhwc(gm["input"]))
  assert_close(features, gm["dense_map"], rtol=1e-5, atol=1e-5)
  assert_close(aux["logits"], gm["logits"], rtol=1e-5, atol=1e-5)


# --- invariants ----------------------------------------------------------------------------------------------

def test_adaptive_pool_matrix_matches_loop_bins():
  p = ops.adaptive_pool_matrix((7, 5), (3, 4))
  for i in range(3):
    for j in range(4):
      rows = range(int(np.floor(i * 7 / 3)), int(np.ceil((i + 1) * 7 / 3)))
      cols = range(int(np.floor(j * 5 / 4)), int(np.ceil((j + 1) * 5 / 4)))
      want = np.zeros((7, 5))
      for r in rows:
        for c in cols:
          want[r, c] = 1.0 / (len(rows) * len(cols))
      np.testing.assert_allclose(p[i * 4 + j].reshape(7, 5), want, rtol=1e-6)


def test_locality_window_in_cells():
  mask = ops.locality_mask((6, 6), (3, 3), 1)  # window 1: only the own cell
  np.testing.assert_array_equal(mask.argmax(1), ops.initial_cells((6, 6), (3, 3)))
  assert (mask.sum(1) == 1).all()
  mask3 = ops.locality_mask((6, 6), (3, 3), 3)
  assert mask3[0].sum() == 4 and mask3[14].sum() == 9  # corner cell: 2x2 neighbours; centre cell: 3x3


def np_soft_kmeans(x, grid_in, grid_out, tau, lam, iters):
  """Loop reference of the clustering equations for one example: x [N, D] -> centres [M, D], hard [N]."""
  (h, w), (oh, ow) = grid_in, grid_out
  x = x.astype(np.float64)
  cells = [(r * oh // h, c * ow // w) for r in range(h) for c in range(w)]
  c = []
  for i in range(oh):
    for j in range(ow):
      r0, r1 = i * h // oh, -(-(i + 1) * h // oh)
      c0, c1 = j * w // ow, -(-(j + 1) * w // ow)
      c.append(x.reshape(h, w, -1)[r0:r1, c0:c1].mean((0, 1)))
  c = np.array(c)
  for _ in range(iters):
    a = np.zeros((h * w, oh * ow))
    for n in range(h * w):
      for m in range(oh * ow):
        if abs(cells[n][0] - m // ow) <= lam // 2 and abs(cells[n][1] - m % ow) <= lam // 2:
          a[n, m] = np.exp(-tau * np.sum((x[n] - c[m]) ** 2))
      a[n] /= a[n].sum()
    c = np.array([(a[:, m, None] * x).sum(0) / a[:, m].sum() for m in range(oh * ow)])
  hard = np.array([np.argmin([np.sum((x[n] - c[m]) ** 2) for m in range(oh * ow)]) for n in range(h * w)])
  return c, hard


def test_clustering_matches_loop_reference():
  tokens, _ = tokens_and_signals(batch=3, n=37, d=8, seed=7)
  tokens = tokens.replace(grid=(6, 6))
  config = cluster_method.ClusterConfig(grid=(3, 4), iters=3, tau=0.1, lam=3)
  out, state = jax.jit(cluster_method.cluster_tokens, static_argnums=1)(tokens, config)
  for b in range(3):
    c, hard = np_soft_kmeans(np.asarray(tokens.x[b, 1:]), (6, 6), (3, 4), 0.1, 3, 3)
    assert_close(out.x[b, 1:], c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.index)[b, 1:] - 1, hard)
    np.testing.assert_allclose(np.asarray(out.size)[b, 1:], np.bincount(hard, minlength=12))
  assert out.grid == (3, 4) and np.asarray(out.mask).all()
  np.testing.assert_allclose(np.asarray(state.mass).sum(1), 36, rtol=1e-5)  # soft mass: every patch once


def test_topk_relation_matches_loop_reference():
  rng = np.random.default_rng(0)
  x, c = rng.normal(size=(3, 20, 6)).astype(np.float32), rng.normal(size=(3, 7, 6)).astype(np.float32)
  r = np.asarray(ops.topk_relation(jnp.asarray(x), jnp.asarray(c), 3, 0.5))
  for b in range(3):
    for n in range(20):
      s = np.exp(-0.5 * ((x[b, n, None].astype(np.float64) - c[b]) ** 2).sum(-1))
      s[s < np.sort(s)[-3]] = 0
      np.testing.assert_allclose(r[b, n], s / np.linalg.norm(s), rtol=1e-5, atol=1e-7)
  assert ((r > 0).sum(-1) == 3).all()
  r1 = np.asarray(ops.topk_relation(jnp.asarray(x), jnp.asarray(c), 3, 0.5, norm="l1"))
  np.testing.assert_allclose(r1, r / r.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_far_tokens_do_not_underflow():
  """exp(-tau d) underflows for a token far from every centre; the shifted weights stay a unit row."""
  x = jnp.full((1, 2, 4), 100.0).at[0, 1].set(-100.0)
  c = jnp.zeros((1, 3, 4)).at[0, 1].set(1.0)
  r = np.asarray(ops.topk_relation(x, c, 2, 1.0))
  assert np.isfinite(r).all()
  np.testing.assert_allclose(np.linalg.norm(r, axis=-1), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  model = tiny_vit()
  params = random_params(model)
  x = images()
  want, _ = jax.jit(dense.from_vit(model).apply)(params, x)
  return model, params, x, want


def test_full_resolution_window_one_is_identity(tiny):
  """h' x w' = h x w with λ = 1: each patch is its own cluster, and k = 1 reconstruction returns it: the dense model."""
  model, params, x, want = tiny
  got, aux = jax.jit(dense.from_vit(model, cluster="cluster:grid=7x7,layer=2,lam=1", k=1).apply)(params, x)
  assert_close(got, want, rtol=1e-5, atol=1e-5)
  assert_close(aux["cluster"].centres, aux["cluster"].patches, rtol=1e-6, atol=1e-6)


def test_hard_unmerge_is_piecewise_constant():
  tokens, _ = tokens_and_signals(batch=2, n=37, d=8, seed=3)
  step = reducers.build_schedule("cluster:grid=2x3,layer=0,tau=0.1,lam=3", 1)[0]
  assert step.slot == "pre"
  out = jax.jit(lambda t: reducers.apply(step, t, None))(tokens.replace(grid=(6, 6)))
  grid = np.asarray(out.unmerge_grid(grid=(6, 6)))
  idx = np.asarray(out.index)[:, 1:].reshape(2, 6, 6)
  for b in range(2):
    for r in range(6):
      for c in range(6):
        assert_close(grid[b, r, c], out.x[b, idx[b, r, c]])


def test_vit_with_cluster_reducer_counts():
  model = tiny_vit(reduce="cluster:grid=3x3,layer=1")
  _, counts = model.plan((56, 56))
  assert [c.n_attn for c in counts] == [50, 10, 10, 10]
  logits, aux = jax.jit(model.apply)(random_params(model), images())
  assert aux["tokens"].n == 10 and np.isfinite(np.asarray(logits)).all()


# --- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("cluster:layer=1", "argument grid is required"),
    ("cluster:grid=3x3", "argument layer is required"),
    ("cluster:grid=3by3,layer=1", "grid='3by3'"),
    ("cluster:grid=0x3,layer=1", "grid=3: must be HxW"),  # the spec parser reads 0x3 as hex 3
    ("cluster:grid=3x0,layer=1", "grid width=0"),
    ("cluster:grid=3x3,layer=1,lam=4", "lam=4: must be odd"),
    ("cluster:grid=3x3,layer=1,tau=0", "tau=0"),
    ("cluster:grid=3x3,layer=1,tau=-1.0", "tau=-1.0"),
    ("cluster:grid=3x3,layer=1,iters=0", "iters=0"),
    ("cluster:grid=3x3,layer=4", r"in \[0, 4\)"),
    ("cluster:grid=3x3,layer=1-2", "one block index"),
    ("cluster:grid=3x3,layer=1,k=3", "unknown argument"),
])
def test_bad_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)


def test_trace_time_errors():
  with pytest.raises(ValueError, match="cluster grid=8x8: 64 clusters for 49 patches"):
    tiny_vit(reduce="cluster:grid=8x8,layer=1").plan((56, 56))
  tokens, _ = tokens_and_signals(batch=1, n=37, d=8)
  config = cluster_method.ClusterConfig(grid=(7, 2))
  with pytest.raises(ValueError, match="cluster grid 7x2: must be between 1x1 and the patch grid 6x6"):
    cluster_method.cluster_tokens(tokens.replace(grid=(6, 6)), config)
  with pytest.raises(ValueError, match="full patch grid"):
    cluster_method.cluster_tokens(tokens, config)  # grid None: after another reduction
  with pytest.raises(ValueError, match="gets both"):
    reducers.build_schedule("cluster:grid=3x3,layer=1+avgpool:stride=2,layers=1", 4)


@pytest.mark.parametrize("fields,match", [
    (dict(cluster="cluster:grid=3x3,layer=2", reconstruct_at=1), r"reconstruct_at=1: must be an int in \[α=2"),
    (dict(cluster="cluster:grid=3x3,layer=2", reconstruct_at=5), "reconstruct_at=5"),
    (dict(cluster="cluster:grid=3x3,layer=2", k=10), r"k=10: must be an int in \[1, 9\]"),
    (dict(cluster="cluster:grid=3x3,layer=2", recon_tau=0.0), "recon_tau=0.0"),
    (dict(cluster="cluster:grid=3x3,layer=2", recon_norm="l3"), "recon_norm='l3'"),
    (dict(cluster="tome:r=4"), "must be a cluster spec"),
    (dict(cluster="cluster:grid=3x3,layer=2", reduce="tome:r=2"), "DenseViT.reduce"),
])
def test_dense_vit_errors(fields, match):
  with pytest.raises(ValueError, match=match):
    dense.from_vit(tiny_vit(), **fields).stages()


# --- fidelity of the reconstructed map to the dense model's -------------------------------------------------

def test_fidelity_tiny_random_model(tiny):
  """Random weights: the reconstructed map must track the dense map, and better with more clusters.
  Measured (seed 0, 56 px, 7x7 patches, layer 2 of 4, τ 0.05, λ 3, k 4; mean cos, relative error):
  4x4 clusters 0.733 / 0.73, 6x6 0.875 / 0.51."""
  model, params, x, want = tiny
  scores = {}
  for g in (4, 6):
    net = dense.from_vit(model, cluster=f"cluster:grid={g}x{g},layer=2,tau=0.05,lam=3", k=4, recon_tau=0.05)
    got, _ = jax.jit(net.apply)(params, x)
    scores[g] = cos_and_rel(got, want)
  print("tiny random-weight fidelity (mean cos, rel err):", scores)
  assert scores[4][0] > 0.65 and scores[6][0] > 0.8, scores
  assert scores[6][0] > scores[4][0] and scores[6][1] < scores[4][1], scores


def test_fidelity_trained_fmnist():
  """The committed Fashion-MNIST ViT (28 px, patch 2: 14x14 patches, depth 6, 85.6% test accuracy), first 32 test
  images; 7x7 clusters after block 2 (τ 0.1, λ 3), reconstruction after the final norm (k 4, τ_r 0.1), 0.54x
  the dense FLOPs. Measured (mean cos, relative error): l2 (the reference) 0.954 / 0.71, l1 0.954 / 0.30, the hard
  piecewise-constant map 0.951 / 0.31, 10x10 clusters (l1) 0.979 / 0.21."""
  from configs.fmnist_vit import get_config
  from tokcomp import data, evaluation
  path = os.path.join(ROOT, "benchmarks", "fmnist_vit")
  if not os.path.isdir(os.path.join(path, "ckpt")):
    pytest.skip("no committed checkpoint")
  params, _ = evaluation.restore_params(path)
  model = tiny_vit(**get_config().model)
  source = data.get_source("embedded:fashion_mnist", "test")
  x = next(iter(data.eval_batches(source, batch=32, mean=(0.5,), std=(0.5,), limit=32)))["image"]
  want, _ = jax.jit(dense.from_vit(model).apply)(params, x)
  spec = "cluster:grid={g}x{g},layer=2,tau=0.1,lam=3"
  got = {}
  for g, norm in ((7, "l2"), (7, "l1"), (10, "l1")):
    net = dense.from_vit(model, cluster=spec.format(g=g), k=4, recon_tau=0.1, recon_norm=norm)
    f, aux = jax.jit(net.apply)(params, x)
    got[g, norm] = cos_and_rel(f, want)
    if (g, norm) == (7, "l1"):
      got["hard"] = cos_and_rel(aux["low_tokens"].unmerge_grid(grid=(14, 14)), want)
  print("fmnist fidelity (mean cos, rel err):", got)
  assert got[7, "l2"][0] > 0.94 and got[7, "l1"][1] < 0.35, got
  assert got[7, "l1"][0] > got["hard"][0], got          # the soft top-k beats the hard assignment
  assert got[7, "l1"][1] < got[7, "l2"][1], got          # l2 weights inflate the features
  assert got[10, "l1"][0] > got[7, "l1"][0] + 0.01, got  # more clusters, closer to the dense map

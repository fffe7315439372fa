"""Pre-LLM reducers without a runnable public reference (ToDRE stage 1, FoPru, HiRED, Fourier-VLM, LLaVolta/M3,
GlobalCom²): loop-based NumPy versions of the equations in each module's docstring, on the same signals,
compared with the batched JAX reducers (kept sets exactly, features to 1e-5)."""
import math

import jax
import numpy as np
import pytest

from tokcomp import vlm
from vlm_visual_util import signals


def run(spec, s):
  method, config = vlm.get(spec)
  out = jax.jit(lambda s: method.apply(s, config=config))(s)
  return jax.tree_util.tree_map(np.asarray, out)


def kept_patches(out, b, p=1, view=None):
  """Patch indices (0-based, prefix excluded) of the original tokens that survive, in output order."""
  index = out.index[b]
  slots = np.flatnonzero(index >= 0)
  order = np.argsort(index[slots], kind="stable")
  return slots[order] - p


def stable_top(score, k):
  return sorted(np.argsort(-score, kind="stable")[:k].tolist())


# --- ToDRE stage 1 ---------------------------------------------------------------------------------------

def numpy_k_center(f, k, first):
  f = f / np.linalg.norm(f, axis=-1, keepdims=True)
  d = 1.0 - f @ f.T
  picks = [first]
  while len(picks) < k:
    best, arg = -np.inf, -1
    for j in range(len(f)):
      if j in picks:
        continue
      m = min(d[s, j] for s in picks)
      if m > best:
        best, arg = m, j
    picks.append(arg)
  return sorted(picks)


@pytest.mark.parametrize("first", ["cls", "isolated"])
def test_todre_k_center(first):
  s = signals(seed=4, batch=2)
  out = run(f"todre:keep=10,first={first}", s)
  for b in range(2):
    f = s.x[b, 1:].astype(np.float64)
    if first == "cls":
      start = int(np.argmax(s.cls_attn[b, -1, :, 1:].mean(0)))
    else:
      fn = f / np.linalg.norm(f, axis=-1, keepdims=True)
      d = 1.0 - fn @ fn.T + np.diag(np.full(len(f), np.inf))
      start = int(np.argmax(d.min(0)))
    assert kept_patches(out, b).tolist() == numpy_k_center(f, 10, start)
    np.testing.assert_array_equal(out.x[b], s.x[b, 1:][kept_patches(out, b)])


# --- FoPru -----------------------------------------------------------------------------------------------

def numpy_significance(attn):
  a = attn[:, 1:, 1:].astype(np.float64).mean(0)
  n = a.shape[0]
  recv = np.array([sum(a[i, j] for i in range(n)) / n for j in range(n)])
  send = np.array([sum(a[i, j] for j in range(n)) / n for i in range(n)])
  return recv if recv.var() > send.var() else send


@pytest.mark.parametrize("reorder", [True, False])
def test_fopru_rank(reorder):
  s = signals(seed=5, batch=2)
  out = run(f"fopru:keep=0.25,reorder={reorder}", s)
  for b in range(2):
    sig = numpy_significance(s.attn[b])
    want = np.argsort(-sig, kind="stable")[:9]
    want = np.sort(want) if reorder else want
    np.testing.assert_array_equal(out.x[b], s.x[b, 1:][want])


@pytest.mark.parametrize("reorder", [True, False])
def test_fopru_row(reorder):
  s = signals(seed=6, batch=2)
  out = run(f"fopru:strategy=row,rows=2,reorder={reorder}", s)
  for b in range(2):
    sig = numpy_significance(s.attn[b]).reshape(6, 6)
    rows = np.argsort(-sig.sum(1), kind="stable")[:2]
    rows = np.sort(rows) if reorder else rows
    want = np.concatenate([np.arange(r * 6, r * 6 + 6) for r in rows])
    np.testing.assert_array_equal(out.x[b], s.x[b, 1:][want])
  method, config = vlm.get("fopru:strategy=row,rows=2")
  assert method.out_count(config, 36) == 12 == out.x.shape[1]


def test_fopru_picks_the_higher_variance_mean():
  """An attention matrix whose rows differ much more than its columns: the row means are the significance."""
  s = signals(seed=7, batch=1)
  attn = np.full_like(s.attn, 1.0 / 37)
  attn[0, :, 5, :] *= 3.0  # query 5 sends three times the average
  out = run("fopru:keep=1", s.replace(attn=attn))
  assert kept_patches(out, 0).tolist() == [4]  # patch 4 = token 5


# --- HiRED -----------------------------------------------------------------------------------------------

def numpy_hired(s, b, budget, alpha, early, split, layout):
  gh, gw = layout
  crops, p, (h, w) = gh * gw, 1, s.grid
  n = h * w
  total = int((crops + 1) * n * budget)
  t_thumb = min(int(total * alpha), n)
  t_crops = min(total - t_thumb, crops * n)
  th = s.thumbnail.cls_attn[b].astype(np.float64)
  kept_thumb = stable_top(th[-1, :, p:].sum(0), t_thumb)
  spatial = set(stable_top(th[early, :, p:].sum(0), int(n * (1 - alpha))))
  counts = np.zeros(crops)
  for j in spatial:
    r, c = divmod(j, w)
    part = (min(r // (h // gh), gh - 1) * gw + min(c // (w // gw), gw - 1)) if split == "region" else j // (n // crops)
    counts[part] += 1
  kept = [(0, j) for j in kept_thumb]
  for i in range(crops):
    k = min(int(math.floor(counts[i] / counts.sum() * t_crops)), n)
    row = s.cls_attn[b, -1][:, i * (p + n) + p:(i + 1) * (p + n)].astype(np.float64).sum(0)
    kept += [(i + 1, j) for j in stable_top(row, k)]
  return kept, t_thumb + t_crops


@pytest.mark.parametrize("split", ["region", "raster"])
def test_hired(split):
  s = signals(seed=8, batch=2, crops=4)
  out = run(f"hired:budget=0.3,alpha=0.4,early=1,split={split},layout=2x2", s)
  allx = np.concatenate([s.thumbnail.x, s.x], axis=1)
  for b in range(2):
    kept, cap = numpy_hired(s, b, 0.3, 0.4, 1, split, (2, 2))
    assert out.x.shape[1] == cap
    want = [v * 37 + 1 + j for v, j in kept]
    got = np.flatnonzero(out.index[b] >= 0)
    assert got.tolist() == want
    assert out.mask[b].sum() == len(want) and out.mask[b, :len(want)].all()
    np.testing.assert_array_equal(out.x[b, :len(want)], allx[b, want])


# --- Fourier-VLM -----------------------------------------------------------------------------------------

def numpy_dct_lowpass(x, hw, out_hw):
  (h, w), (oh, ow) = hw, out_hw
  grid = x.reshape(h, w, -1).astype(np.float64)

  def a(k, n):
    return math.sqrt((1 if k == 0 else 2) / n)

  spec = np.zeros((oh, ow, grid.shape[-1]))
  for u in range(oh):
    for v in range(ow):
      for r in range(h):
        for c in range(w):
          spec[u, v] += (a(u, h) * a(v, w) * math.cos(math.pi * (2 * r + 1) * u / (2 * h))
                         * math.cos(math.pi * (2 * c + 1) * v / (2 * w)) * grid[r, c])
  out = np.zeros((oh, ow, grid.shape[-1]))
  for r in range(oh):
    for c in range(ow):
      for u in range(oh):
        for v in range(ow):
          out[r, c] += (a(u, oh) * a(v, ow) * math.cos(math.pi * (2 * r + 1) * u / (2 * oh))
                        * math.cos(math.pi * (2 * c + 1) * v / (2 * ow)) * spec[u, v])
  return (out * math.sqrt(oh * ow / (h * w))).reshape(oh * ow, -1)


def test_fourier_lowpass():
  s = signals(seed=9, batch=2)
  out = run("fourier:grid=4x3", s)
  for b in range(2):
    np.testing.assert_allclose(out.x[b], numpy_dct_lowpass(s.x[b, 1:], (6, 6), (4, 3)), rtol=1e-5, atol=1e-5)
  # the full grid is the identity, a constant map stays constant
  same = run("fourier:grid=6", s)
  np.testing.assert_allclose(same.x, s.x[:, 1:], rtol=1e-5, atol=1e-5)
  const = s.replace(x=np.ones_like(s.x))
  np.testing.assert_allclose(run("fourier:grid=2", const).x, 1.0, rtol=1e-5)


# --- LLaVolta / M3 ---------------------------------------------------------------------------------------

def test_llavolta_average_pool():
  s = signals(seed=10, batch=2)
  out = run("llavolta:grid=3x2", s)
  for b in range(2):
    g = s.x[b, 1:].reshape(6, 6, -1).astype(np.float64)
    want = [g[i * 2:i * 2 + 2, j * 3:j * 3 + 3].mean((0, 1)) for i in range(3) for j in range(2)]
    np.testing.assert_allclose(out.x[b], np.stack(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.size, 6.0)
  # nested: pooling 6 -> 3 equals pooling the 6 -> 3 result of a 12 -> 6 pool of a 12 x 12 grid
  big = signals(seed=11, batch=1, grid=(12, 12))
  mid = run("llavolta:grid=6", big)
  twice = run("llavolta:grid=3", vlm.VisualSignals(x=np.concatenate([big.x[:, :1], mid.x], 1), num_prefix=1,
                                                     grid=(6, 6)))
  np.testing.assert_allclose(run("llavolta:grid=3", big).x, twice.x, rtol=1e-5, atol=1e-6)


def test_llavolta_needs_a_dividing_grid():
  method, config = vlm.get("llavolta:grid=4")
  with pytest.raises(ValueError, match="grid"):
    method.apply(signals(seed=0, batch=1), config=config)


# --- GlobalCom² ------------------------------------------------------------------------------------------

def torch_like_bilinear(img, out_h, out_w):
  h, w = img.shape

  def coords(n_in, n_out):
    res = []
    for i in range(n_out):
      src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
      lo = min(int(math.floor(src)), n_in - 1)
      res.append((lo, min(lo + 1, n_in - 1), src - lo))
    return res

  out = np.zeros((out_h, out_w))
  for i, (r0, r1, lr) in enumerate(coords(h, out_h)):
    for j, (c0, c1, lc) in enumerate(coords(w, out_w)):
      out[i, j] = ((1 - lr) * ((1 - lc) * img[r0, c0] + lc * img[r0, c1])
                   + lr * ((1 - lc) * img[r1, c0] + lc * img[r1, c1]))
  return out


def numpy_globalcom2(s, b, keep, temperature, layout):
  gh, gw = layout
  crops, p, (h, w) = gh * gw, 1, s.grid
  n = h * w
  thumb = s.thumbnail.cls_attn[b, -1, :, p:].astype(np.float64).mean(0)
  kept = [(0, j) for j in stable_top(thumb, int(n * keep))]
  sums = np.zeros(crops)
  for j in range(n):
    r, c = divmod(j, w)
    sums[min(r // (h // gh), gh - 1) * gw + min(c // (w // gw), gw - 1)] += thumb[j]
  e = np.exp((sums - sums.max()) / temperature)
  sigma = e / e.sum()
  ratios = np.minimum(keep * (1 + sigma - sigma.mean()), 1.0)
  big = torch_like_bilinear(thumb.reshape(h, w), gh * h, gw * w)
  for i in range(crops):
    own = s.cls_attn[b, -1][:, i * (p + n) + p:(i + 1) * (p + n)].astype(np.float64).mean(0)
    r, c = divmod(i, gw)
    guide = big[r * h:(r + 1) * h, c * w:(c + 1) * w].reshape(-1)
    score = own / np.linalg.norm(own) + guide / np.linalg.norm(guide)
    kept += [(i + 1, j) for j in stable_top(score, int(n * ratios[i]))]
  return kept


def test_globalcom2():
  s = signals(seed=12, batch=2, crops=6)
  out = run("globalcom2:keep=0.3,temperature=0.05,layout=2x3", s)
  allx = np.concatenate([s.thumbnail.x, s.x], axis=1)
  per_crop = []
  for b in range(2):
    kept = numpy_globalcom2(s, b, 0.3, 0.05, (2, 3))
    want = [v * 37 + 1 + j for v, j in kept]
    assert np.flatnonzero(out.index[b] >= 0).tolist() == want
    np.testing.assert_array_equal(out.x[b, :len(want)], allx[b, want])
    per_crop.append(np.bincount([v for v, _ in kept], minlength=7)[1:])
  assert out.x.shape[1] == int(36 * 0.3) + int(6 * 36 * 0.3)
  assert any(len(set(c.tolist())) > 1 for c in per_crop)  # the thumbnail did steer different crop budgets

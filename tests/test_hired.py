"""HiRED (tokcomp/vlm/hired.py): parity with hasanar1f/HiRED @ 502d6dd (tests/goldens/hired_*.npz,
tools/goldens/make_hired.py: the official `HiRED_token_selection` on synthetic AnyRes [CLS] rows, batch 1 per
sample), batch 3 == batch 1, one compile, out_count."""
import functools

import jax
import numpy as np
import pytest

from goldens_util import load
from helpers import count_compiles
from tokcomp import vlm

CASES = {"g6_2x2": "hired:budget=0.2,alpha=0.5,early=0,split=raster,layout=2x2",
         "g6_1x3": "hired:budget=0.3,alpha=0.4,early=1,split=raster,layout=1x3"}


@functools.lru_cache(maxsize=None)
def golden(case):
  cfg, _, g = load(f"hired_{case}")
  grid = tuple(cfg["grid"])
  thumb = vlm.VisualSignals(x=g["thumb_x"], cls_attn=g["thumb_cls_attn"], num_prefix=1, grid=grid)
  return cfg, g, vlm.VisualSignals(x=g["x"], cls_attn=g["cls_attn"], thumbnail=thumb, num_prefix=1, grid=grid)


def kept_masks(out, views, n):
  """Tokens.index over [thumbnail, crops] -> [B, V, n] kept patches (prefix excluded)."""
  return (np.asarray(out.index) >= 0).reshape(-1, views, 1 + n)[:, :, 1:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_batch1_and_batch3(case):
  cfg, g, s = golden(case)
  assert g["min_margin"] > 1e-4
  method, config = vlm.get(CASES[case])
  f, compiles = count_compiles(lambda s: method.apply(s, config=config))
  views, n = g["masks"].shape[1], g["masks"].shape[2]
  out3 = f(s)
  np.testing.assert_array_equal(kept_masks(out3, views, n), g["masks"])
  assert out3.x.shape[1] == method.out_count(config, g["x"].shape[1] - (views - 1))
  allx = np.concatenate([g["thumb_x"], g["x"]], axis=1)
  for b in range(3):
    out1 = f(jax.tree_util.tree_map(lambda a: a[b:b + 1], s))
    np.testing.assert_array_equal(kept_masks(out1, views, n)[0], g["masks"][b])
    slots = np.flatnonzero(np.asarray(out3.index[b]) >= 0)
    k = len(slots)
    assert int(np.asarray(out3.mask[b]).sum()) == k and np.asarray(out3.mask[b, :k]).all()
    np.testing.assert_array_equal(np.asarray(out3.x[b, :k]), allx[b, slots])  # thumbnail, then crops, in order
    assert np.isfinite(np.asarray(out3.x[b])).all()
  assert compiles() == 2  # batch 3 and batch 1


def test_region_split_differs_from_the_reference_raster_split():
  _, g, s = golden("g6_2x2")
  method, config = vlm.get("hired:budget=0.2,alpha=0.5,early=0,split=region,layout=2x2")
  out = method.apply(s, config=config)
  assert not np.array_equal(kept_masks(out, 5, 36), g["masks"])  # the paper's regions vs the code's raster chunks

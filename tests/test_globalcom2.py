"""GlobalCom² (tokcomp/vlm/globalcom2.py): parity with xuyang-liu16/GlobalCom2 @ 96b2d00
(tests/goldens/globalcom2_*.npz, tools/goldens/make_globalcom2.py: its compress_thumbnail / generate_scale_for_crop_features / interpolate_and_split /
select_topk_crop_features on synthetic pre-softmax CLS logits, batch 1 per sample) with score=logits; batch 3 ==
batch 1; one compile; the default softmax scores choose differently."""
import functools

import jax
import numpy as np
import pytest

from goldens_util import load
from helpers import count_compiles
from tokcomp import vlm

CASES = {"g6_2x2": "globalcom2:keep=0.3,temperature=10,layout=2x2,score=logits",
         "g6_2x3": "globalcom2:keep=0.35,temperature=0.5,layout=2x3,score=logits"}


@functools.lru_cache(maxsize=None)
def golden(case):
  cfg, _, g = load(f"globalcom2_{case}")
  grid = tuple(cfg["grid"])
  thumb = vlm.VisualSignals(x=g["thumb_x"], cls_attn=g["thumb_cls_attn"], cls_logits=g["thumb_cls_logits"],
                            num_prefix=1, grid=grid)
  return cfg, g, vlm.VisualSignals(x=g["x"], cls_attn=g["cls_attn"], cls_logits=g["cls_logits"], thumbnail=thumb,
                                   num_prefix=1, grid=grid)


def kept(out, crops, n):
  """-> thumbnail [B, n] and crops [B, C, n] kept patches from Tokens.index over [thumbnail, crops]."""
  m = (np.asarray(out.index) >= 0).reshape(-1, 1 + crops, 1 + n)[:, :, 1:]
  return m[:, 0], m[:, 1:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_batch1_and_batch3(case):
  cfg, g, s = golden(case)
  assert g["min_margin"] > 1e-4 and g["int_margin"] > 1e-4
  method, config = vlm.get(CASES[case])
  f, compiles = count_compiles(lambda s: method.apply(s, config=config))
  crops, n = g["crop_masks"].shape[1], g["crop_masks"].shape[2]
  thumb_ref = np.zeros((3, n), bool)
  for b in range(3):
    thumb_ref[b, g["thumb_keep"][b]] = True
  out3 = f(s)
  t3, c3 = kept(out3, crops, n)
  np.testing.assert_array_equal(t3, thumb_ref)
  np.testing.assert_array_equal(c3, g["crop_masks"])
  assert out3.x.shape[1] == method.out_count(config, crops * n)
  allx = np.concatenate([g["thumb_x"], g["x"]], axis=1)
  for b in range(3):
    t1, c1 = kept(f(jax.tree_util.tree_map(lambda a: a[b:b + 1], s)), crops, n)
    np.testing.assert_array_equal(t1[0], thumb_ref[b])
    np.testing.assert_array_equal(c1[0], g["crop_masks"][b])
    slots = np.flatnonzero(np.asarray(out3.index[b]) >= 0)
    assert int(np.asarray(out3.mask[b]).sum()) == len(slots)
    np.testing.assert_array_equal(np.asarray(out3.x[b, :len(slots)]), allx[b, slots])
  assert compiles() == 2


def test_softmax_scores_differ_and_missing_logits_raise():
  _, g, s = golden("g6_2x3")
  method, config = vlm.get("globalcom2:keep=0.35,temperature=0.5,layout=2x3")  # score=attn (default)
  _, c = kept(method.apply(s, config=config), 6, 36)
  assert not np.array_equal(c, g["crop_masks"])
  method, config = vlm.get(CASES["g6_2x3"])
  with pytest.raises(ValueError, match="cls_logits"):
    method.apply(s.replace(cls_logits=None), config=config)
  with pytest.raises(ValueError, match="score"):
    vlm.get("globalcom2:score=probs")

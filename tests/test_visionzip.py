"""VisionZip: parity with dvlab-research/VisionZip @ 3151f6d on the same tower signals (goldens made at batch 1
per sample), our batch of 3 against them, and the index / size bookkeeping of the contextual merge."""
import jax
import numpy as np
import pytest

from goldens_util import load
from tokcomp import vlm


def run(name):
  config, _, g = load(name)
  grid = tuple(config["grid"])
  signals = vlm.VisualSignals(x=g["x"], cls_attn=g["cls_attn"], keys=g["keys"], num_prefix=1, grid=grid)
  method, cfg = vlm.get(f"visionzip:dominant={config['dominant']},contextual={config['contextual']}")
  return config, g, jax.jit(lambda s: method.apply(s, config=cfg))(signals)


@pytest.mark.parametrize("name", ["visionzip_g7", "visionzip_llava"])
def test_visionzip_parity(name):
  config, g, out = run(name)
  assert g["min_margin"] > 1e-4
  np.testing.assert_allclose(np.asarray(out.x), g["out"], rtol=1e-5, atol=1e-5)
  # Dominant set: the reference's indices (CLS, then by descending score) are where index maps to a dominant slot.
  index = np.asarray(out.index)
  for b in range(3):
    kept = np.flatnonzero((index[b] >= 0) & (index[b] < config["dominant"]))
    np.testing.assert_array_equal(kept, np.sort(g["all_indices"][b]))
    np.testing.assert_array_equal(index[b][kept], np.arange(config["dominant"]))


def test_visionzip_contextual_bookkeeping():
  config, g, out = run("visionzip_g7")
  d, c = config["dominant"], config["contextual"]
  index, size, x = np.asarray(out.index), np.asarray(out.size), g["x"]
  assert (index >= 0).all()  # nothing is dropped: every patch is dominant or merged into a contextual token
  for b in range(3):
    np.testing.assert_array_equal(size[b, :d], 1.0)
    rest = np.flatnonzero(index[b] >= d)  # the non-dominant tokens in original order
    step = max(1, len(rest) // c)
    for j in range(c):
      target = rest[j * step]  # every step-th remaining token is a target
      members = np.flatnonzero(index[b] == d + j)
      assert target in members and size[b, d + j] == len(members)
      merged = members[members != target]
      want = x[b, target] + (x[b, merged].mean(0) if len(merged) else 0.0)
      np.testing.assert_allclose(np.asarray(out.x)[b, d + j], want, rtol=1e-5, atol=1e-5)

"""FasterVLM and VTC-CLS: parity with Theia-4869/FasterVLM @ f5d5f12 and THU-MIG/VTC-CLS @ e41ac9b on the same
attention rows (references at batch 1 per sample, ours batched), and the count forms."""
import jax
import numpy as np
import pytest

from goldens_util import load
from tokcomp import vlm
from vlm_visual_util import signals


def run(spec, config, g):
  s = vlm.VisualSignals(x=g["x"], cls_attn=g["cls_attn"], num_prefix=1, grid=tuple(config["grid"]))
  method, cfg = vlm.get(spec)
  return jax.jit(lambda s: method.apply(s, config=cfg))(s)


@pytest.mark.parametrize("name", ["fastervlm_g7", "fastervlm_llava"])
@pytest.mark.parametrize("which", ["fastervlm", "vtc"])
def test_cls_attention_parity(name, which):
  config, _, g = load(name)
  assert g["min_margin"] > 1e-4
  if which == "fastervlm":
    spec = f"fastervlm:keep={config['fastervlm_keep']}"
  else:
    spec = f"vtc_cls:keep={config['vtc_keep']},start={config['vtc_start']}"
  out = run(spec, config, g)
  np.testing.assert_allclose(np.asarray(out.x), g[f"{which}_out"], rtol=0, atol=0)
  index = np.asarray(out.index)
  for b in range(3):
    np.testing.assert_array_equal(np.flatnonzero(index[b] >= 0), g[f"{which}_kept"][b] + 1)
  assert out.num_protected == 0 and (index[:, 0] == -1).all()


def test_fraction_and_count_agree():
  s = signals(seed=0, batch=2)  # 36 patches
  a = run("fastervlm:keep=9", {"grid": s.grid}, {"x": s.x, "cls_attn": s.cls_attn})
  b = run("fastervlm:keep=0.25", {"grid": s.grid}, {"x": s.x, "cls_attn": s.cls_attn})
  np.testing.assert_array_equal(np.asarray(a.index), np.asarray(b.index))
  method, cfg = vlm.get("fastervlm:keep=0.25")
  assert method.out_count(cfg, 576) == 144


def test_vtc_cls_start_is_a_layer_range():
  """vtc_cls with start at the feature layer is FasterVLM; start=0 sums every layer's head-mean row."""
  s = signals(seed=1, batch=2)
  g = {"x": s.x, "cls_attn": s.cls_attn}
  last = run("vtc_cls:keep=7,start=-1", {"grid": s.grid}, g)
  np.testing.assert_array_equal(np.asarray(last.index), np.asarray(run("fastervlm:keep=7", {"grid": s.grid}, g).index))
  every = run("vtc_cls:keep=7,start=0", {"grid": s.grid}, g)
  score = s.cls_attn[:, :, :, 1:].mean(2).sum(1)  # [B, n]
  for b in range(2):
    want = np.sort(np.argsort(-score[b], kind="stable")[:7]) + 1
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(every.index)[b] >= 0), want)

"""Schedules: ToMe's r forms, keep layers, static counts, and FLOPs cross-checked with XLA."""
import jax
import jax.numpy as jnp
import pytest

from helpers import tiny_vit
from tokcomp import reducers, schedules
from tokcomp.models import vit


def test_parse_r_forms_match_tome():
  assert schedules.parse_r(5, 4) == (5, 5, 5, 5)
  assert schedules.parse_r([6, 5], 4) == (6, 5, 0, 0)
  # ToMe's ramp: lo = int(r (1 - inflect)), hi = 2r - lo, r_l = int(lo + (hi - lo) / (depth - 1) * l)
  assert schedules.parse_r((4, -0.5), 4) == (6, 4, 3, 2)
  assert schedules.parse_r((8, 0.5), 12) == tuple(int(4 + 8 / 11 * i) for i in range(12))
  with pytest.raises(ValueError, match="at most depth=2"):
    schedules.parse_r([1, 2, 3], 2)
  with pytest.raises(ValueError, match="int >= 0"):
    schedules.parse_r([1, -2], 2)
  with pytest.raises(ValueError, match="must be an int"):
    schedules.parse_r(2.5, 2)


def test_resolve_caps_r_like_tome():
  steps = reducers.build_schedule("tome:r=30", 4)
  resolved, counts = schedules.resolve(steps, 50, 1)
  # 49 mergeable -> cap 24, then 25 -> 12, 13 -> 6, 7 -> 3
  assert [s.config.r for s in resolved] == [24, 12, 6, 3]
  assert [c.n_mlp for c in counts] == [26, 14, 8, 5]
  resolved, counts = schedules.resolve(reducers.build_schedule("tome:r=30", 8), 50, 1)
  assert resolved[-1] is None and counts[-1].n_mlp == 2  # nothing left to merge: identity, as ToMe


def test_evit_counts_follow_ceil_rule():
  steps = reducers.build_schedule("evit:keep=0.7,layers=1-3", 4)
  _, counts = schedules.resolve(steps, 50, 1)
  # ceil(0.7 * 49) = 35 (+CLS +fused = 37); ceil(0.7 * 36) = 26 (+2 = 28)
  assert [c.n_mlp for c in counts] == [50, 37, 37, 28]
  steps = reducers.build_schedule("topk:keep=1.0,layers=1", 4)
  assert schedules.resolve(steps, 50, 1)[0][1] is None  # keeps everything: identity


def test_flops_match_xla_cost_analysis():
  for spec in (None, "tome:r=4", "evit:keep=0.6,layers=1-2"):
    model = tiny_vit(reduce=spec, width=192, mlp_dim=768, num_heads=3)  # Ti-sized blocks: matmuls dominate
    x = jnp.zeros((2, 56, 56, 3))
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    compiled = jax.jit(model.apply).lower(params, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = cost["flops"] / 2
    ours = model.flops((56, 56))
    # XLA also counts LayerNorm, softmax, GELU and the reducers; the analytic count is the matmuls.
    assert 0.93 < ours / xla < 1.01, (spec, ours, xla)


def test_flops_standard_vit_s16():
  # ViT-S/16@224: 4.6 GMACs (timm / DeiT paper, Table 1) = 9.2 GFLOPs
  assert abs(vit.make("S/16").flops((224, 224)) / 1e9 - 9.2) < 0.1


def test_bad_layer_index_names_field():
  with pytest.raises(ValueError, match="evit layers entry 12"):
    vit.make("S/16", reduce="evit:keep=0.7,layers=3-12").plan((224, 224))


def test_cosine_anneal_samples_evits_keep_rate():
  """Stages sample the reference's per-iteration rule (evit helpers.adjust_keep_rate) at their starts."""
  import math

  def reference(t, start, steps, base, maximum=1.0):  # adjust_keep_rate with one iteration per "epoch"
    if t < start:
      return maximum
    if t >= start + steps:
      return base
    return base + (maximum - base) * (math.cos((t - start) / steps * math.pi) + 1) * 0.5

  pieces = schedules.cosine_anneal(100, 800, 0.7, stages=4)
  assert [t for t, _ in pieces] == [0, 300, 500, 700, 900]
  for t, rho in pieces:
    assert rho == pytest.approx(reference(t, 100, 800, 0.7))
  assert schedules.cosine_anneal(0, 10, 0.5, stages=1) == [(0, 1.0), (10, 0.5)]
  with pytest.raises(ValueError, match="stages=0"):
    schedules.cosine_anneal(0, 10, 0.5, stages=0)
  with pytest.raises(ValueError, match="base=1.5"):
    schedules.cosine_anneal(0, 10, 1.5)

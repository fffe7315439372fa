"""Contract for every registered pre-LLM ("visual") VLM reducer: batch 3 == three batch-1 runs, one compile per
budget, the declared count, finite outputs, `index` consistent with the slots, ValueError on bad specs."""
import chex
import jax
import numpy as np
import pytest

from tokcomp import vlm
from vlm_visual_util import row, signals

VISUAL = vlm.names("visual")


def example(name):
  return vlm._REGISTRY[name].example  # names() imported every method module


def example_signals(name, seed, batch=3):
  method, _ = vlm.get(example(name))
  return signals(seed=seed, batch=batch, crops=2 if "thumbnail" in method.needs else 0)


def n_in(s):
  """Candidate patches of a signal set (crops: all crops' patches)."""
  per_view = s.num_prefix + s.grid[0] * s.grid[1]
  return (s.x.shape[1] // per_view) * s.grid[0] * s.grid[1]


def test_registry_has_the_visual_methods():
  assert {"visionzip", "divprune", "fastervlm", "vtc_cls", "todre", "fopru", "hired", "fourier", "llavolta",
          "globalcom2"} <= set(VISUAL)


@pytest.mark.parametrize("name", VISUAL)
def test_visual_contract(name):
  method, config = vlm.get(example(name))
  fn = jax.jit(chex.assert_max_traces(lambda s: method.apply(s, config=config), n=1))
  outs = []
  for seed in (0, 1):  # same shapes, new data: no retrace
    s = example_signals(name, seed)
    out = fn(s)
    expected = method.out_count(config, n_in(s))
    n0 = s.x.shape[1] + (0 if s.thumbnail is None else s.thumbnail.x.shape[1])  # AnyRes: thumbnail, then crops
    assert out.x.shape == (3, expected, s.x.shape[-1]), (out.x.shape, expected)
    assert out.index.shape == (3, n0)
    assert np.isfinite(np.asarray(out.x)).all()
    index = np.asarray(out.index)
    assert ((index >= -1) & (index < expected)).all()
    # Every valid slot is held by at least one original token and its size counts them; a slot past a
    # data-dependent count (static capacity) is invalid and holds none.
    mask = np.asarray(out.mask)
    for b in range(3):
      held = np.bincount(index[b][index[b] >= 0], minlength=expected)
      np.testing.assert_array_equal(held >= 1, mask[b], err_msg=f"{name}: valid slots == slots held")
      np.testing.assert_allclose(np.asarray(out.size)[b][mask[b]], held[mask[b]])
    assert mask[:, 0].all()
    outs.append(out)
  assert not np.allclose(outs[0].x, outs[1].x)
  chex.clear_trace_counter()


@pytest.mark.parametrize("name", VISUAL)
def test_visual_batch_equals_rows(name):
  method, config = vlm.get(example(name))
  s = example_signals(name, 3)
  fn = jax.jit(lambda s: method.apply(s, config=config))
  out = fn(s)
  for b in range(3):
    one = fn(row(s, b))
    np.testing.assert_allclose(np.asarray(out.x)[b], np.asarray(one.x)[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.index)[b], np.asarray(one.index)[0])
    np.testing.assert_array_equal(np.asarray(out.mask)[b], np.asarray(one.mask)[0])
    np.testing.assert_allclose(np.asarray(out.size)[b], np.asarray(one.size)[0])


@pytest.mark.parametrize("name", VISUAL)
def test_visual_unknown_argument(name):
  with pytest.raises(ValueError, match="bogus"):
    vlm.get(example(name) + ",bogus=1")


@pytest.mark.parametrize("name", [n for n in VISUAL if vlm.get(example(n))[0].needs])  # the rest read only x
def test_visual_missing_signal(name):
  method, config = vlm.get(example(name))
  s = example_signals(name, 0)
  field = method.needs[0]
  with pytest.raises(ValueError, match=field):
    method.apply(s.replace(**{field: None}), config=config)


@pytest.mark.parametrize("spec, field", [
    ("visionzip:dominant=0,contextual=6", "dominant"),
    ("visionzip:dominant=9", "contextual"),
    ("visionzip:dominant=9,contextual=0.5", "contextual"),
    ("divprune:keep=0", "keep"),
    ("divprune:keep=1.5", "keep"),
    ("divprune:keep='a'", "keep"),
    ("fastervlm:keep=-3", "keep"),
    ("vtc_cls:keep=4", "start"),
    ("vtc_cls:keep=4,start=1.5", "start"),
    ("todre:keep=4,first=random", "first"),
    ("fopru:strategy=col,keep=4", "strategy"),
    ("fopru:strategy=row,keep=4", "rows"),
    ("fopru:keep=4,rows=2", "rows"),
    ("fopru:keep=4,reorder=1", "reorder"),
    ("hired:alpha=1.5", "alpha"),
    ("hired:split=stripes", "split"),
    ("hired:layout=2y2", "layout"),
    ("fourier:grid=0", "grid"),
    ("fourier", "grid"),
    ("llavolta:grid='a'", "grid"),
    ("globalcom2:keep=2", "keep"),
    ("globalcom2:temperature=0", "temperature"),
])
def test_visual_bad_spec(spec, field):
  with pytest.raises(ValueError, match=field):
    vlm.get(spec)


@pytest.mark.parametrize("spec, field", [
    ("visionzip:dominant=40,contextual=6", "dominant"),     # more than 1 + 36 tokens
    ("visionzip:dominant=30,contextual=10", "contextual"),  # only 7 patches left
    ("divprune:keep=37", "keep"),
    ("fastervlm:keep=100", "keep"),
    ("vtc_cls:keep=4,start=3", "start"),                    # 3 layers run
    ("vtc_cls:keep=4,start=-4", "start"),
    ("todre:keep=40", "keep"),
    ("fopru:strategy=row,rows=7", "rows"),
    ("fourier:grid=7", "grid"),
    ("llavolta:grid=5", "grid"),
    ("hired:layout=1x2,budget=1000", "budget"),
    ("hired:layout=1x3", "layout"),  # the signals hold 2 crops
    ("hired:layout=1x2,early=3", "early"),
    ("globalcom2:layout=2x2", "layout"),
])
def test_visual_budget_out_of_range(spec, field):
  method, config = vlm.get(spec)
  with pytest.raises(ValueError, match=field):
    method.apply(signals(seed=0, batch=1, crops=2 if "thumbnail" in method.needs else 0), config=config)


def test_visual_batch_sharded_has_no_collectives():
  """Every method jitted with the batch sharded over 8 simulated devices: no collectives, same result."""
  import json
  import os
  import subprocess
  import sys
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  r = subprocess.run([sys.executable, os.path.join(here, "vlm_sharding_check.py")], capture_output=True, text=True,
                     env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-4000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(result) == set(VISUAL)
  for name, res in result.items():
    assert res == {"collectives": [], "same": True}, (name, res)

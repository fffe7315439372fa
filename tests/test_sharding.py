"""Data parallelism: a batch-sharded forward equals the unsharded one, and reducers need no collectives.

This process has already initialised jax with one CPU device, so the checks run once, in a subprocess with
8 simulated devices (tests/sharding_check.py), and the tests below assert on the JSON it prints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tokcomp import reducers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "sharding_check.py")
VIT_CASES = ["dense", "tome", "evit", "mctf", "gtp", "dynamicvit"]  # keys of sharding_check.VIT_REDUCE

@pytest.fixture(scope="module")
def results():
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([ROOT, HERE])}
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"sharding_check.py failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
  out = json.loads(r.stdout.strip().splitlines()[-1])
  out["_seconds"] = time.perf_counter() - t0
  return out


def test_eight_simulated_devices(results):
  assert results["devices"] == {"count": 8, "platform": "cpu"}


@pytest.mark.parametrize("label", [f"vit/{c}" for c in VIT_CASES])
def test_vit_sharded_forward_equals_unsharded(results, label):
  r = results[label]
  assert r["close"], f"{label}: sharded forward differs from unsharded (max |diff| {r['max_abs']:.3g})"
  assert r["logit_shards"] == 8, "logits should come back split over the 8 devices"


@pytest.mark.parametrize("label", [f"vit/{c}" for c in VIT_CASES])
def test_vit_sharded_forward_has_no_collectives(results, label):
  assert results[label]["collectives"] == [], f"{label}: compiled HLO has {results[label]['collectives']}"


def test_every_registered_reducer_was_checked(results):
  assert sorted(k[len("reducer/"):] for k in results if k.startswith("reducer/")) == reducers.names()


@pytest.mark.parametrize("name", reducers.names())
def test_reducer_sharded_equals_unsharded(results, name):
  r = results[f"reducer/{name}"]
  assert r["close"], f"{name} ({r['example']}): sharded output differs (max |diff| {r['max_abs']:.3g})"
  assert r["x_shards"] == 8


@pytest.mark.parametrize("label", [f"reducer/{n}" for n in reducers.names()])
def test_reducer_has_no_collectives(results, label):
  r = results[label]
  assert r["collectives"] == [], f"{label} ({r['example']}): compiled HLO has {r['collectives']}"


TOKENIZER_CASES = ["titok", "one_d_piece", "flextok_flow", "flextok_pixel"]  # sharding_check.TOKENIZER_CASES


@pytest.mark.parametrize("label", [f"tokenizer/{c}" for c in TOKENIZER_CASES])
def test_tokenizer_sharded_reconstruct_equals_unsharded(results, label):
  r = results[label]
  assert r["close"], f"{label}: sharded reconstruction differs (max |diff| {r['max_abs']:.3g})"
  assert r["x_shards"] == 8
  assert r["collectives"] == [], f"{label}: compiled HLO has {r['collectives']}"


def test_sharding_check_is_fast(results):
  """A guard against blow-ups (a reducer that compiles for minutes), not a benchmark: alone on 2 idle cores the
  check takes ~35 s (15 reducers + 5 ViTs, 2026-11-22); beside the other pytest worker it takes 2-4x that."""
  assert results["_seconds"] < 300, f"sharding_check.py took {results['_seconds']:.0f} s (budget 300 s)"

"""Batch-sharding check for the pre-LLM VLM reducers, run by tests/test_vlm_visual.py in its own process with 8
simulated CPU devices (the pytest process has already initialised jax with one device):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/vlm_sharding_check.py

Every registered "visual" method, jitted on its example spec with the batch (8) sharded over ("data",): the
collectives in the compiled HLO (there should be none: every op is per example) and sharded == unsharded.
Prints one JSON object {name: {"collectives": [...], "same": bool}} on the last line.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from tokcomp import vlm  # noqa: E402
from vlm_visual_util import signals  # noqa: E402

COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")


def main():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  result = {}
  for name in vlm.names("visual"):
    method, config = vlm.get(vlm._REGISTRY[name].example)
    s = signals(seed=0, batch=8, crops=2 if "thumbnail" in method.needs else 0)
    sharded = jax.tree_util.tree_map(lambda a: jax.device_put(a, NamedSharding(mesh, P("data"))), s)
    fn = jax.jit(lambda s, method=method, config=config: method.apply(s, config=config))
    hlo = fn.lower(sharded).compile().as_text()
    out, ref = fn(sharded), fn(s)
    same = all(np.allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
               for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True))
    result[name] = {"collectives": [c for c in COLLECTIVES if c in hlo], "same": same}
  print(json.dumps(result))


if __name__ == "__main__":
  main()

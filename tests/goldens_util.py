"""Loading golden fixtures made by tools/goldens/*.py through tokcomp's own checkpoint converter."""
from __future__ import annotations

import json
import os

import numpy as np

from tokcomp import checkpoints
from tokcomp.models.vit import Encoder1DBlock

HERE = os.path.dirname(__file__)


def load(name: str):
  g = np.load(os.path.join(HERE, "goldens", name + ".npz"), allow_pickle=False)
  config = json.loads(str(g["config"]))
  state = {k[len("param/"):]: g[k] for k in g.files if k.startswith("param/")}
  arrays = {k: g[k] for k in g.files if not k.startswith("param/")}
  return config, state, arrays


def nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def model_from_state(state, **overrides):
  return checkpoints.load(state, **overrides)


def assert_same_rows(ours, ref, rtol=1e-5, atol=1e-5, what=""):
  """Rows of ours [N, D] and ref [N, D] agree up to a permutation (for reducers whose order differs)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f"{what}: shapes {ours.shape} vs {ref.shape}"
  d = np.linalg.norm(ours[:, None, :] - ref[None, :, :], axis=-1)
  match = d.argmin(axis=1)
  assert len(set(match.tolist())) == len(match), f"{what}: rows do not match one to one"
  np.testing.assert_allclose(ours, ref[match], rtol=rtol, atol=atol, err_msg=what)


def run_with_blocks(model, params, images):
  """Jitted forward that also returns every block's output token state: (logits, aux, [Tokens per block])."""
  import jax

  def f(p, x):
    return model.apply(p, x, capture_intermediates=lambda mdl, _: isinstance(mdl, Encoder1DBlock))
  (logits, aux), state = jax.jit(f)(params, images)
  blocks = state["intermediates"]["Transformer"]
  return logits, aux, [blocks[f"encoderblock_{i}"]["__call__"][0] for i in range(model.depth)]

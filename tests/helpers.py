"""Shared test helpers: tiny models and token fixtures."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.models import vit
from tokcomp.tokens import Tokens

TINY = dict(num_classes=10, patch_size=(8, 8), width=64, depth=4, mlp_dim=128, num_heads=2)


def tiny_vit(**kw) -> vit.ViT:
  return vit.ViT(**{**TINY, **kw})


def random_params(model, image_hw=(56, 56), seed=0, std=0.2):
  """Init, then perturb every parameter so that heads, scores and prefix tokens are non-trivial."""
  x = jnp.zeros((1, *image_hw, 3))
  # Under jit (eager init compiles op by op). Learned reducers add their parameters to the dense twin's.
  learned = any(reducers.is_learned(st) for st in reducers.build_schedule(model.reduce, model.depth))
  params = jax.jit((model if learned else model.clone(reduce=None)).init)(jax.random.key(seed), x)
  params = {"params": params["params"]}  # not the collections a module may sow into
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [np.asarray(l) + std * np.asarray(jax.random.normal(k, l.shape)) for l, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, leaves)


def tokens_and_signals(batch=3, n=37, d=16, heads=2, protected=1, seed=0):
  """Random tokens plus the signals every reducer may ask for."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k1, (batch, n, d))
  tokens = Tokens.create(x, protected)
  attn = jax.nn.softmax(3 * jax.random.normal(k2, (batch, heads, n, n)), axis=-1)  # [B, H, N, N]
  signals = Signals(cls_attn=attn[:, :, 0], keys_mean=jax.random.normal(k3, (batch, n, d)),
                    value_norm=jnp.abs(jax.random.normal(k4, (batch, heads, n))), attn=attn)
  return tokens, signals


def images(batch=3, hw=(56, 56), seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, *hw, 3))


def count_compiles(fn):
  """Wraps a jitted function; returns (wrapper, counter) where counter() is how often it was traced."""
  calls = {"n": 0}

  def traced(*a, **k):
    calls["n"] += 1
    return fn(*a, **k)

  return jax.jit(traced), lambda: calls["n"]


@contextlib.contextmanager
def backend_compiles():
  """`with backend_compiles() as n: ...`: n() is how many XLA executables were compiled inside the block (the
  compile event of `jax.monitoring`). A jitted function's private `_cache_size()` reads the C++ dispatch cache,
  which jax shares across the process: in a CI run (2026-12-07) it read 0 right after a compile, most likely
  because of the tests run before in that xdist worker. Keep eager jnp ops out of the block: they compile too."""
  count = {"n": 0}

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    count["n"] += event == "/jax/core/compile/backend_compile_duration"

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield lambda: count["n"]
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def assert_close(a, b, rtol=1e-5, atol=1e-6, err_msg=""):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=err_msg)


def apply_step(step, tokens, signals, seed=0):
  """One reducer step at inference: a training-free `reduce`, or a learned module with parameters drawn from
  `seed` (init runs inside, so the same seed gives the same module under jit, sharded or not)."""
  if not reducers.is_learned(step):
    return reducers.apply(step, tokens, signals)
  module = reducers.module(step)
  params = {"params": module.init(jax.random.key(seed), tokens, signals)["params"]}
  return module.apply(params, tokens, signals)

"""Batch-sharding checks, run by tests/test_sharding.py in its own process with 8 simulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharding_check.py

The pytest process has already initialised jax with one device, so these checks cannot run in it. Prints one
JSON object, {case: {...}}, on the last line of stdout; test_sharding.py asserts on it. Cases:
  vit/<reduce>      a tiny ViT forward with the batch sharded over ("data",) and replicated params vs the
                    unsharded forward; also the collectives in the compiled HLO
  reducer/<name>    each registered reducer alone, jitted with the batch sharded: its collectives (there should
                    be none: every reducer is per example) and sharded vs unsharded output
  tokenizer/<name>  each 1D tokenizer's reconstruct (encode -> quantise -> decode) at a per-example [B] kept
                    length, batch sharded vs unsharded, and its collectives (none: tokens never cross examples)
"""
from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import helpers  # noqa: E402
from tokcomp import reducers, schedules  # noqa: E402
from tokcomp.tokens import Tokens  # noqa: E402

COLLECTIVES = ("all-gather", "all-to-all", "reduce-scatter", "all-reduce", "collective-permute")
VIT_REDUCE = {"dense": None, "tome": "tome:r=4", "evit": "evit:keep=0.7,layers=1-2",
              "mctf": "mctf:r=5,layers=1-2",  # the "ahead" slot: attention run twice, fused probs applied
              "gtp": "gtp:num_prop=5,layers=1-2",  # the encoder_input signal
              "dynamicvit": "dynamicvit:keep=0.7,layers=1-2"}  # a learned reducer: its own parameters
BATCH, N, GRID = 8, 37, (6, 6)
TOKENIZER_CASES = {"titok": "tokenizer=titok", "one_d_piece": "tokenizer=one_d_piece",
                   "flextok_flow": "tokenizer=flextok,decoder=flow", "flextok_pixel": "tokenizer=flextok,decoder=pixel"}


def collectives(hlo: str) -> list[str]:
  """The collective op names that occur anywhere in compiled HLO text (async -start/-done forms included)."""
  return [c for c in COLLECTIVES if c in hlo]


def compare(out, ref, rtol=1e-5, atol=1e-5) -> dict:
  """Sharded vs unsharded: every float leaf within rtol/atol, every int/bool leaf identical; and the largest
  absolute float difference."""
  close, max_abs = True, 0.0
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    if x.shape != y.shape or x.dtype != y.dtype:
      return {"close": False, "max_abs": float("inf"), "why": f"{x.shape} {x.dtype} vs {y.shape} {y.dtype}"}
    if np.issubdtype(x.dtype, np.floating):
      close &= bool(np.allclose(x, y, rtol=rtol, atol=atol))
      max_abs = max(max_abs, float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0)))
    else:
      close &= bool(np.array_equal(x, y))
  return {"close": close, "max_abs": max_abs}


def shards_of(x) -> list[int]:
  """Which devices hold a distinct batch slice of a sharded output (len 8 when split over all devices)."""
  return sorted({s.index[0].start or 0 for s in x.addressable_shards})


def main() -> None:
  results: dict[str, dict] = {"devices": {"count": jax.device_count(), "platform": jax.devices()[0].platform}}
  mesh = Mesh(np.array(jax.devices()), ("data",))
  data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

  # --- the whole model ---------------------------------------------------------------------------------------
  images = helpers.images(batch=BATCH, hw=(56, 56))
  dense_params = helpers.random_params(helpers.tiny_vit())  # training-free reducers add no parameters
  for label, spec in VIT_REDUCE.items():
    t0 = time.perf_counter()
    model = helpers.tiny_vit(reduce=spec)
    learned = any(reducers.is_learned(s) for s in reducers.build_schedule(spec, model.depth))
    params = helpers.random_params(model) if learned else dense_params
    ref = jax.jit(model.apply)(params, images)
    sharded = jax.jit(model.apply, in_shardings=(repl, data), out_shardings=data)
    compiled = sharded.lower(params, images).compile()
    out = compiled(jax.device_put(params, repl), jax.device_put(images, data))
    results[f"vit/{label}"] = {
        **compare(out, ref), "collectives": collectives(compiled.as_text()),
        "logit_shards": len(shards_of(out[0])), "tokens": int(out[1]["tokens"].n),
        "seconds": round(time.perf_counter() - t0, 2)}

  # --- each reducer alone ------------------------------------------------------------------------------------
  tokens, signals = helpers.tokens_and_signals(batch=BATCH, n=N)
  tokens = Tokens.create(tokens.x, 1, grid=GRID)  # avgpool needs the patch grid; same state otherwise
  for name in reducers.names():
    t0 = time.perf_counter()
    method = reducers.get(name)
    steps, _ = schedules.resolve(reducers.build_schedule(method.example, 4), N, tokens.num_protected)
    step = next(s for s in steps if s is not None)
    fn = lambda t, s, step=step: helpers.apply_step(step, t, s)
    ref = jax.jit(fn)(tokens, signals)
    sharded = jax.jit(fn, in_shardings=(data, data), out_shardings=data)
    compiled = sharded.lower(tokens, signals).compile()
    out = compiled(jax.device_put(tokens, data), jax.device_put(signals, data))
    results[f"reducer/{name}"] = {
        **compare(out, ref), "collectives": collectives(compiled.as_text()),
        "example": method.example, "n_out": int(out.n), "x_shards": len(shards_of(out.x)),
        "seconds": round(time.perf_counter() - t0, 2)}

  # --- each 1D tokenizer: encode -> quantise -> decode at a per-example length ----------------------------------
  from configs import fmnist_tokenizer
  from tokcomp import tokenizers
  images = jax.random.uniform(jax.random.key(3), (BATCH, 28, 28, 1))
  for label, arg in TOKENIZER_CASES.items():
    t0 = time.perf_counter()
    config = fmnist_tokenizer.get_config(arg + ",runlocal")
    model = tokenizers.get(config.model_name)(**config.model)
    params = model.init({"params": jax.random.key(0), "token_drop": jax.random.key(1), "noise": jax.random.key(2)},
                        images[:1])
    lengths = 1 + jnp.arange(BATCH) % model.num_latent_tokens
    fn = lambda p, x, n: model.apply(p, x, length=n, method=model.reconstruct)
    ref = jax.jit(fn)(params, images, lengths)
    sharded = jax.jit(fn, in_shardings=(repl, data, data), out_shardings=data)
    compiled = sharded.lower(params, images, lengths).compile()
    out = compiled(jax.device_put(params, repl), jax.device_put(images, data), jax.device_put(lengths, data))
    results[f"tokenizer/{label}"] = {
        **compare(out, ref), "collectives": collectives(compiled.as_text()), "x_shards": len(shards_of(out)),
        "seconds": round(time.perf_counter() - t0, 2)}

  print(json.dumps(results))


if __name__ == "__main__":
  main()

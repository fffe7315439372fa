r"""Merge implementation: one batched scatter-add vs a one-hot einsum, per shape (issue 9).

  python benchmarks/merge_impl/bench.py [--out benchmarks/merge_impl]

`Tokens.reassign` accumulates x'[b, m] = sum_{n: dest[b,n] = m} w[b,n] x[b,n]. Two ways: a batched scatter-add
(`tokens.batched_scatter`, what it does now) or a one-hot matrix [B, M, N] times x (an MXU/tensor-core friendly
matmul, O(M N D) work instead of O(N D)). Timed jitted, median of 50 calls, interleaved, at ToMe-like shapes
(N tokens in, M = N - r out, D width) and the result checked equal. Writes merge_impl.{json,md}.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tokcomp import bench  # noqa: E402
from tokcomp.tokens import batched_scatter  # noqa: E402


def scatter(x, w, dest, m):
  return batched_scatter(jnp.zeros((x.shape[0], m, x.shape[-1]), x.dtype), dest, w[..., None] * x, "add", mode="drop")


def one_hot(x, w, dest, m):
  oh = (dest[:, None, :] == jnp.arange(m)[None, :, None]).astype(x.dtype) * w[:, None, :]  # [B, M, N]
  return jnp.einsum("bmn,bnd->bmd", oh, x)


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  ap.add_argument("--runs", type=int, default=50)
  args = ap.parse_args(argv)
  shapes = [(64, 197, 384, 184), (64, 197, 768, 184), (64, 197, 384, 100), (8, 577, 768, 561), (8, 1025, 1024, 1009),
            (256, 197, 768, 184)]
  rows = []
  for b, n, d, m in shapes:
    for dtype in (jnp.float32, jnp.bfloat16):
      k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      x = jax.random.normal(k1, (b, n, d), dtype)
      w = jax.random.uniform(k2, (b, n), dtype)
      dest = jax.random.randint(k3, (b, n), 0, m)
      fns = {name: jax.jit(f, static_argnums=3).lower(x, w, dest, m).compile()
             for name, f in (("scatter", scatter), ("one_hot", one_hot))}
      ref = np.asarray(fns["scatter"](x, w, dest).astype(jnp.float32))
      got = np.asarray(fns["one_hot"](x, w, dest).astype(jnp.float32))
      tol = 1e-4 if dtype == jnp.float32 else 5e-2
      np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
      times = {k: [] for k in fns}
      for f in fns.values():
        for _ in range(3):
          jax.block_until_ready(f(x, w, dest))
      for _ in range(args.runs):
        for k, f in fns.items():
          t0 = time.perf_counter()
          jax.block_until_ready(f(x, w, dest))
          times[k].append(time.perf_counter() - t0)
      med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
      rows.append(dict(batch=b, n=n, d=d, m=m, dtype=jnp.dtype(dtype).name, scatter_ms=med["scatter"],
                       one_hot_ms=med["one_hot"], faster="scatter" if med["scatter"] <= med["one_hot"] else "one_hot"))
      print(rows[-1], flush=True)
  device, date = bench.device_name(), datetime.date.today().isoformat()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "merge_impl.json"), "w") as f:
    json.dump(dict(device=device, date=date, jax=jax.__version__, runs=args.runs, rows=rows), f, indent=1)
  lines = [f"Merge accumulation, scatter-add vs one-hot einsum; {device}, JAX {jax.__version__}, {date}; median of "
           f"{args.runs} jitted calls", "", "| B | N | D | M | dtype | scatter ms | one-hot ms | faster |",
           "|---|---|---|---|---|---|---|---|"]
  lines += [f"| {r['batch']} | {r['n']} | {r['d']} | {r['m']} | {r['dtype']} | {r['scatter_ms']:.2f} | "
            f"{r['one_hot_ms']:.2f} | {r['faster']} |" for r in rows]
  with open(os.path.join(args.out, "merge_impl.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()

"""Synthetic `VisualSignals` for the pre-LLM reducer tests: a CLS + h x w patch grid with attention rows that are
real softmax rows, head-mean keys, and (on request) text and an AnyRes thumbnail."""
from __future__ import annotations

import numpy as np

from tokcomp import vlm


def softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def view(rng, batch, grid, prefix=1, dim=16, layers=3, heads=2, key_dim=8, tokens=None):
  """One view as numpy arrays: x [B, N, D], cls_attn [B, L, H, N], keys [B, N, d], attn [B, H, N, N] (the
  feature layer's full attention; its row 0 is cls_attn[:, -1])."""
  n = tokens if tokens is not None else prefix + grid[0] * grid[1]
  x = rng.standard_normal((batch, n, dim)).astype(np.float32)
  cls_attn = softmax(2.0 * rng.standard_normal((batch, layers, heads, n))).astype(np.float32)
  attn = softmax(2.0 * rng.standard_normal((batch, heads, n, n))).astype(np.float32)
  attn[:, :, 0] = cls_attn[:, -1]
  keys = rng.standard_normal((batch, n, key_dim)).astype(np.float32)
  return x, cls_attn, keys, attn


def signals(seed=0, batch=3, grid=(6, 6), prefix=1, dim=16, layers=3, heads=2, crops=0, text_len=5,
            as_numpy=False):
  """VisualSignals with every field filled. crops > 0: AnyRes layout, `crops` views of (prefix + h w) tokens
  stacked on the token axis (each view's CLS row covers its own tokens), plus a thumbnail view of the same grid."""
  rng = np.random.default_rng(seed)
  if crops:
    x, cls_attn, keys, _ = view(rng, batch, grid, prefix, dim, layers, heads,
                                tokens=crops * (prefix + grid[0] * grid[1]))
    attn = None  # views attend within themselves: no one N x N matrix
    tx, tattn, tkeys, tfull = view(rng, batch, grid, prefix, dim, layers, heads)
    thumb = vlm.VisualSignals(x=tx, cls_attn=tattn, keys=tkeys, attn=tfull, num_prefix=prefix, grid=grid)
  else:
    x, cls_attn, keys, attn = view(rng, batch, grid, prefix, dim, layers, heads)
    thumb = None
  text = rng.standard_normal((batch, text_len, dim)).astype(np.float32)
  out = dict(x=x, cls_attn=cls_attn, keys=keys, attn=attn, text=text, text_mask=np.ones((batch, text_len), bool),
             thumbnail=thumb)
  if as_numpy:
    return out
  return vlm.VisualSignals(**out, num_prefix=prefix, grid=grid)


def row(s: vlm.VisualSignals, b: int) -> vlm.VisualSignals:
  """Example b of a batch as a batch of one."""
  import jax
  return jax.tree_util.tree_map(lambda a: a[b:b + 1], s)

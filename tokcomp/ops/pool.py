"""Spatial pooling of the patch grid."""
from __future__ import annotations

import jax.numpy as jnp

from tokcomp.tokens import Tokens


def grid_pool_dest(tokens: Tokens, stride: int) -> tuple[jnp.ndarray, int, tuple[int, int]]:
  """Destination slots for stride x stride average pooling of the patch grid (prefix slots stay first).

  Count: P + h*w -> P + ceil(h/s) * ceil(w/s); a ragged edge pools the patches it has.
  """
  if tokens.grid is None:
    raise ValueError("avgpool needs the tokens on their full patch grid (Tokens.grid is None after a reduction)")
  if stride < 1:
    raise ValueError(f"avgpool stride={stride}: must be >= 1")
  h, w = tokens.grid
  oh, ow = -(-h // stride), -(-w // stride)
  p = tokens.num_protected
  i, j = jnp.divmod(jnp.arange(h * w), w)
  patch_dest = p + (i // stride) * ow + j // stride
  dest = jnp.concatenate([jnp.arange(p), patch_dest]).astype(jnp.int32)
  return jnp.broadcast_to(dest, (tokens.batch, tokens.n)), p + oh * ow, (oh, ow)

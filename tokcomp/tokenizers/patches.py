"""Images <-> flat patch rows, shared by the tokenizers' patch embeddings and pixel heads."""
from __future__ import annotations

import jax


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], patches row-major, each flattened as (py, px, c)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, h: int, w: int, c: int) -> jax.Array:
  """Inverse of `patchify`: [B, (H/p)(W/p), p*p*C] -> [B, H, W, C]."""
  b = patches.shape[0]
  x = patches.reshape(b, h // patch, w // patch, patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)

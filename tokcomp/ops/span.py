"""Keep-k inside a static span of the sequence (in-LLM visual-token pruning: the image tokens sit at a fixed slice)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def keep_top_in_span(score: jax.Array, span: tuple[int, int], k: int) -> jax.Array:
  """score [B, S] -> keep [B, S - length + k] int32, ascending: every slot outside span = (start, length) plus the
  k best-scoring slots inside it (stable: ties go to the lower slot)."""
  b, s = score.shape
  start, length = span
  if not 0 <= k <= length or not 0 <= start <= start + length <= s:
    raise ValueError(f"keep_top_in_span k={k}, span={span}: need 0 <= k <= length and the span inside S={s}")
  inside = score[:, start:start + length].astype(jnp.float32)
  idx = jnp.sort(jnp.argsort(inside, axis=1, descending=True, stable=True)[:, :k], axis=1) + start
  before = jnp.broadcast_to(jnp.arange(start, dtype=jnp.int32), (b, start))
  after = jnp.broadcast_to(jnp.arange(start + length, s, dtype=jnp.int32), (b, s - start - length))
  return jnp.concatenate([before, idx.astype(jnp.int32), after], axis=1)

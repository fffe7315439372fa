"""The token state that travels through the encoder, and the moves every reducer is made of.

A reducer sees and returns one `Tokens` pytree. All of its shapes are static: a reduction changes the token
axis from one Python int to another, and data-dependent counts use a static capacity plus `mask`.

  x      [B, N, D]  features
  mask   [B, N]     valid slots (all true for fixed-count methods)
  size   [B, N]     how many original tokens each slot stands for (ToMe's proportional attention uses log size)
  index  [B, N0]    for every original token (prefix + patches), the slot that now holds it, or -1 if dropped
  policy [B, N]     training only, else None: a float keep decision in [0, 1] that carries gradients (learned
                    reducers train at full length: DynamicViT's hard gumbel decisions; attention then uses
                    DynamicViT's softmax_with_policy, so dropped tokens stop being attended to)
  num_protected     static: prefix tokens (CLS, distill, registers) that sit first and are never reduced
  grid              static: (h, w) of the patch grid while the patches are still a full grid in raster order

Three moves compose `index` for free, so unmerging and merge maps need no extra bookkeeping:
  gather(keep)          prune / reorder: keep the slots `keep` [B, K], in that order
  compact(valid, cap)   masking plus sort: valid slots first in their order, cut to a static capacity
  reassign(dest, m)     merge: slot n goes to new slot dest[n] (-1 drops it), weighted sum or mean
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Tokens:
  x: jax.Array
  mask: jax.Array
  size: jax.Array
  index: jax.Array
  policy: jax.Array | None = None
  num_protected: int = struct.field(pytree_node=False, default=0)
  grid: tuple[int, int] | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, x: jax.Array, num_protected: int = 0, grid: tuple[int, int] | None = None) -> "Tokens":
    """Fresh state: every slot valid, size 1, slot n holds original token n."""
    b, n, _ = x.shape
    if not 0 <= num_protected <= n:
      raise ValueError(f"Tokens.num_protected={num_protected}: must be in [0, {n}] for N={n}")
    if grid is not None and grid[0] * grid[1] != n - num_protected:
      raise ValueError(f"Tokens.grid={grid}: h*w must equal N - num_protected = {n - num_protected}")
    return cls(
        x=x,
        mask=jnp.ones((b, n), bool),
        size=jnp.ones((b, n), jnp.float32),
        index=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
        num_protected=num_protected,
        grid=grid,
    )

  @property
  def batch(self) -> int:
    return self.x.shape[0]

  @property
  def n(self) -> int:
    """Current number of slots (static)."""
    return self.x.shape[1]

  @property
  def num_original(self) -> int:
    return self.index.shape[1]

  @property
  def num_reducible(self) -> int:
    return self.n - self.num_protected

  def keep_weight(self) -> jax.Array:
    """[B, N] float: how much each slot counts (mask, times the training policy when there is one)."""
    w = self.mask.astype(jnp.float32)
    return w if self.policy is None else w * self.policy.astype(jnp.float32)

  def protected_mask(self) -> jax.Array:
    """[N] bool, true on the protected prefix."""
    return jnp.arange(self.n) < self.num_protected

  # --- the three moves -------------------------------------------------------------------------------------

  def gather(self, keep: jax.Array) -> "Tokens":
    """Keeps slots `keep` [B, K] in that order; every other slot is dropped (index -1)."""
    b, k = keep.shape
    keep = keep.astype(jnp.int32)
    take = lambda a: jnp.take_along_axis(a, keep.reshape(b, k, *([1] * (a.ndim - 2))), axis=1)
    old_to_new = batched_scatter(jnp.full((b, self.n), -1, jnp.int32), keep, jnp.arange(k, dtype=jnp.int32))
    return self.replace(x=take(self.x), mask=take(self.mask), size=take(self.size),
                        index=_compose(self.index, old_to_new), grid=None,
                        policy=None if self.policy is None else take(self.policy))

  def compact(self, valid: jax.Array, capacity: int) -> "Tokens":
    """Masking plus sort: valid slots first in their original order, then cut to `capacity` (static).

    Protected slots always count as valid. Slots past the valid count come out with mask false.
    """
    if not self.num_protected <= capacity <= self.n:
      raise ValueError(f"compact capacity={capacity}: must be in [{self.num_protected}, {self.n}]")
    valid = (valid | self.protected_mask()) & self.mask
    order = jnp.argsort(~valid, axis=1, stable=True)[:, :capacity]
    out = self.gather(order)
    kept_valid = jnp.take_along_axis(valid, order, axis=1)
    # Slots cut by the capacity, or kept but invalid, no longer hold anything.
    old_to_new = batched_scatter(jnp.full((self.batch, self.n), -1, jnp.int32), order,
                                 jnp.where(kept_valid, jnp.arange(capacity), -1))
    return out.replace(mask=kept_valid, index=_compose(self.index, old_to_new))

  def reassign(self, dest: jax.Array, num_out: int, weight: jax.Array | None = None,
               normalize: bool = True) -> "Tokens":
    """Merge: slot n moves to new slot dest[b, n] in [0, num_out), or is dropped when dest is -1.

    x'_m = sum_{n: dest n = m} w_n x_n, divided by sum w_n if `normalize`. The default weight is `size`, so
    a normalized reassign is ToMe's size-weighted mean. Sizes add; a new slot is valid if any member is.
    One batched scatter-add per field; no loop over the merged tokens.
    """
    if self.policy is not None:
      raise ValueError("Tokens.reassign: cannot merge tokens that carry a training policy (DynamicViT-style "
                       "full-length training); prune with gather, or train the merge without a policy")
    b = self.batch
    by_size = weight is None
    size_in = jnp.where(self.mask, self.size, 0.0)
    weight = size_in if by_size else jnp.where(self.mask, weight, 0.0)
    dest = dest.astype(jnp.int32)
    tgt = jnp.where(dest < 0, num_out, dest)  # out-of-range rows are dropped by mode="drop"
    acc = lambda vals, shape, dt: batched_scatter(jnp.zeros(shape, dt), tgt, vals, "add", mode="drop")
    x = acc(weight[..., None].astype(self.x.dtype) * self.x, (b, num_out, self.x.shape[-1]), self.x.dtype)
    size = acc(size_in, (b, num_out), self.size.dtype)
    if normalize:
      wsum = size if by_size else acc(weight, (b, num_out), weight.dtype)
      x = x / jnp.where(wsum > 0, wsum, 1.0)[..., None].astype(x.dtype)
    count = acc(self.mask.astype(jnp.int32), (b, num_out), jnp.int32)
    return self.replace(x=x, size=size, mask=count > 0, index=_compose(self.index, dest), grid=None)

  # --- reading the state back ------------------------------------------------------------------------------

  def unmerge(self, features: jax.Array | None = None, fill: float = 0.0) -> jax.Array:
    """Scatters per-slot features [B, N, C] back to every original token: [B, N0, C] (`fill` if dropped)."""
    f = self.x if features is None else features
    idx = jnp.clip(self.index, 0, self.n - 1)
    out = jnp.take_along_axis(f, idx[..., None], axis=1)
    return jnp.where((self.index >= 0)[..., None], out, jnp.asarray(fill, f.dtype))

  def unmerge_grid(self, features: jax.Array | None = None, grid: tuple[int, int] | None = None,
                   fill: float = 0.0) -> jax.Array:
    """Like `unmerge`, for the patches only, as a dense map [B, h, w, C] (the prefix is left out)."""
    if grid is None:
      raise ValueError("unmerge_grid: pass the original patch grid (h, w)")
    out = self.unmerge(features, fill)[:, self.num_original - grid[0] * grid[1]:]
    return out.reshape(out.shape[0], grid[0], grid[1], out.shape[-1])

  def source(self) -> jax.Array:
    """[B, N, N0] one-hot: which original tokens each slot holds (ToMe's `source` trace)."""
    return (self.index[:, None, :] == jnp.arange(self.n)[None, :, None]) & (self.index[:, None, :] >= 0)


def batched_scatter(target: jax.Array, idx: jax.Array, values, op: str = "set", mode: str | None = None):
  """target[b, idx[b, j]] (op)= values[b, j], with the batch as a scatter batching dimension (jax.vmap), so a
  batch-sharded call partitions with no collectives (an explicit arange(B) row index does not)."""
  values = jnp.broadcast_to(jnp.asarray(values, target.dtype), idx.shape + target.shape[2:])
  return jax.vmap(lambda t, i, v: getattr(t.at[i], op)(v, mode=mode))(target, idx, values)


def _compose(index: jax.Array, old_to_new: jax.Array) -> jax.Array:
  """index'[b, p] = old_to_new[b, index[b, p]], keeping -1 as dropped."""
  new = jnp.take_along_axis(old_to_new, jnp.clip(index, 0, old_to_new.shape[1] - 1), axis=1)
  return jnp.where(index >= 0, new, -1)

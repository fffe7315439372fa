"""DiffRate search: differentiable per-block prune and merge rates under a FLOPs target (Chen et al., "DiffRate:
Differentiable Compression Rate for Efficient Vision Transformers", ICCV 2023, arXiv:2305.17997, §3.3-3.4). Its
result is the schedule that the training-free `diffrate` reducer runs (the authors' compression_rate.json).

Each block (the "mid" slot of every block, as the reference's `DiffRateBlock`) holds two rate distributions over
the candidate kept counts c_k = N0-1, N0-1-g, ..., (N0 - 1 patches; granularity g), with logits θ (init 0):
  kept   K = ste_ceil(Σ_k c_k softmax(θ)_k) + 1        (eq. 6; straight-through ceil; +1: the class token)
  prob   π_j = Σ_k softmax(θ)_k [j < c_k + 1]            (the probability that sorted position j survives)
  mask   m_j = [j < K or j >= U] - sg(π_j) + π_j         (eq. 8: a hard mask with π's gradient; U: the tokens
                                                           alive before this step)
In training the tokens keep their full length (static shapes): the block sorts all tokens by its CLS attention
(head mean; the reference's `attn[:, :, 0, 1:]`), prunes by multiplying the keep policy with the prune mask
(when K_p < U), then merges: sorted positions K_m <= j < min(U, K_p) go to their most similar position in
1..K_m-1 (cosine on the detached features), each destination becoming the unweighted mean of itself and its
sources, sizes s'_i = max(s_i ν_i, 1) for sources (ν: that similarity) added into the destination; sources stay
in place and are masked out (the merge mask over [K_m, min(U, K_p))). Attention applies the policy with
softmax_with_policy and the size bias log s (proportional attention).
FLOPs: each block sows its surviving count n_l = ste_min(n_{l-1}, K_p, K_m) (value: the minimum; gradient: to
both K_p and K_m, as the reference's STE_Min) into the "counts" collection; train.py turns the counts into the
model's FLOPs (`schedules.vit_flops`) and adds weight · (FLOPs / dense FLOPs - ratio)^2 (`config.flops_target`).
Outside training the same rates run as masks (no speedup); `searched_counts(params, depth)` reads the discrete
counts, `write_schedule` writes the authors' JSON, and `diffrate:schedule=PATH` runs it at static counts.
Config: `diffrate_search` (every block), `diffrate_search:granularity=2`. Block 0 is never compressed (its one
candidate is all patches), as the reference's `non_compressed_block_index = [0]`.

Parity: tests/goldens/diffrate_search_cls50.npz (tools/goldens/make_diffrate_search.py, OpenGVLab/DiffRate @
        91ae3e3, the training pass): logits, the alive counts per block, the FLOPs, and the gradients of the
        logits and of the FLOPs with respect to every block's rate logits.

Where we differ from the reference, on purpose:
  * The FLOPs loss is on the ratio to the dense FLOPs (FLOPs = 2 MACs, schedules.vit_flops), not on GMACs:
    weight = 5 * 4.6^2 (train.py's default) is the reference's λ = 5 at DeiT-S's 4.6 GMACs, in those units.
  * The token count entering a block is the rounded sum of the keep policy, per example (the reference truncates
    `mask[0].sum().int()`, which a float sum of 1 - π + π can put one below the count).
  * Tokens whose CLS attention ties exactly (the masked ones) may sort in another order than torch's unstable
    sort; they are masked, so only their slots differ, not the kept tokens or the logits.
"""
from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops import merge as merge_ops
from tokcomp.ops import select
from tokcomp.tokens import Tokens, batched_scatter


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  layer: int
  granularity: int = 1
  num_patches: int | None = None  # N0 - 1, bound from the model's input


def candidates(num_patches: int, granularity: int) -> np.ndarray:
  """Kept patch-count candidates N0-1, N0-1-g, ..., > 0 (the reference's `kept_token_candidate`)."""
  return np.arange(num_patches, 0, -granularity, dtype=np.float32)


def ste_ceil(x: jax.Array) -> jax.Array:
  return x + jax.lax.stop_gradient(jnp.ceil(x) - x)


def kept_and_probability(logits: jax.Array, cand: np.ndarray, n: int) -> tuple[jax.Array, jax.Array]:
  """(K = ste_ceil(E[c]) + 1 with its gradient, π [n]: the survival probability of each sorted position)."""
  p = jax.nn.softmax(logits.astype(jnp.float32))
  kept = ste_ceil(jnp.dot(jnp.asarray(cand), p)) + 1.0
  survives = jnp.arange(n)[None, :] < (jnp.asarray(cand)[:, None] + 1)  # [K, n]
  return kept, jnp.dot(p, survives.astype(jnp.float32))


def step_mask(kept: jax.Array, prob: jax.Array, upto: jax.Array) -> jax.Array:
  """[..., n]: 0 on sorted positions [int(K), U), 1 elsewhere, with π's straight-through gradient (eq. 8).
  U may be per example ([B, 1]); K and π are shared by the batch."""
  j = jnp.arange(prob.shape[0])
  hard = jnp.where((j >= jnp.floor(kept)) & (j < upto), 0.0, 1.0)
  return hard - jax.lax.stop_gradient(prob) + prob


class DiffRateSearch(nn.Module):
  """One block's searchable prune and merge rates (see the module docstring)."""
  config: SearchConfig

  @nn.compact
  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    c = self.config
    if tokens.num_protected != 1:
      raise ValueError(f"diffrate_search needs exactly one class token (num_protected=1), got "
                       f"{tokens.num_protected}")
    if tokens.n - 1 != c.num_patches:
      raise ValueError(f"diffrate_search runs at full length: block {c.layer} got {tokens.n - 1} patches, "
                       f"expected {c.num_patches} (no other reducer may shorten the sequence before it)")
    if signals.cls_attn is None:
      raise ValueError("diffrate_search needs signals.cls_attn (the CLS attention row)")
    cand = candidates(c.num_patches, c.granularity)
    prune_logits = self.param("prune_logits", nn.initializers.zeros, cand.shape)
    merge_logits = self.param("merge_logits", nn.initializers.zeros, cand.shape)

    # Sort every token by the CLS attention, CLS first (masked tokens carry ~0 attention and sort last).
    order = select.keep_with_prefix(tokens, select.rank_reducible(
        tokens, select.cls_attention_score(signals.cls_attn)))
    tokens = tokens.gather(order)
    alive = tokens.keep_weight()  # [B, N]: the policy (train) or the mask
    n = tokens.n
    # Tokens alive entering this step, per example (the same for every row: the masks are positional; the
    # reference reads row 0, which would tie the rows together under batch sharding).
    upto = jnp.round(jax.lax.stop_gradient(jnp.sum(alive, axis=1, keepdims=True)))  # [B, 1]

    kept_p, prob_p = kept_and_probability(prune_logits, cand, n)
    alive = jnp.where(kept_p < upto, alive * step_mask(kept_p, prob_p, upto), alive)
    mid = jnp.minimum(upto, jnp.floor(kept_p))

    kept_m, prob_m = kept_and_probability(merge_logits, cand, n)
    merging = kept_m < mid                                               # [B, 1]
    j = jnp.arange(n)
    is_src = merging & (j >= jnp.floor(kept_m)) & (j < mid)            # [B, N]
    is_dst = (j >= 1) & (j < jnp.floor(kept_m))                          # never the class token
    metric = merge_ops.normalize(jax.lax.stop_gradient(tokens.x))
    sim, partner = merge_ops.best_match(metric, metric, jnp.broadcast_to(~is_dst, (tokens.batch, n)))
    src = is_src
    dest = jnp.where(src, partner, jnp.arange(n)[None])                  # sources -> partner, others stay
    count = batched_scatter(jnp.zeros((tokens.batch, n)), dest, jnp.where(src, 1.0, 0.0), "add")
    x_sum = batched_scatter(jnp.zeros_like(tokens.x), dest, jnp.where(src[..., None], tokens.x, 0), "add")
    is_dst_b = jnp.broadcast_to(is_dst, sim.shape)
    x = jnp.where(is_dst_b[..., None], (tokens.x + x_sum) / (1.0 + count)[..., None], tokens.x)
    size = jnp.where(src, tokens.size * sim, tokens.size)
    size = jnp.where((j < mid) & merging, jnp.maximum(size, 1.0), size)
    size_sum = batched_scatter(jnp.zeros_like(size), dest, jnp.where(src, size, 0.0), "add")
    size = jnp.where(is_dst_b & merging, size + size_sum, size)
    alive = jnp.where(merging, alive * step_mask(kept_m, prob_m, mid), alive)

    # The surviving count for the FLOPs: min of the three values, gradient to both rates (STE_Min).
    n_out = jnp.mean(jnp.minimum(upto, jnp.minimum(kept_p, kept_m)))  # rows agree; only the loss reads it
    n_out = jax.lax.stop_gradient(n_out) + (kept_p - jax.lax.stop_gradient(kept_p)) + (
        kept_m - jax.lax.stop_gradient(kept_m))
    tokens = tokens.replace(x=x.astype(tokens.x.dtype), size=size)
    if train:
      self.sow("counts", "n", n_out)
      return tokens.replace(policy=alive)
    return tokens.replace(mask=tokens.mask & (alive > 0.5))


def searched_counts(params, num_patches: int, granularity: int = 1):
  """The discrete kept counts (prefix included) per block of searched params, as the reference's
  `kept_token_number = int(ceil(Σ c_k softmax(θ)_k) + 1)`: a `diffrate.KeptCounts`."""
  from tokcomp.reducers.diffrate import KeptCounts
  blocks = params["params"]["Transformer"]
  prune, merge = [], []
  for i in range(len([k for k in blocks if k.startswith("encoderblock_")])):
    p = blocks[f"encoderblock_{i}"]["diffrate_search"]
    cand = candidates(num_patches, num_patches + 1 if i == 0 else granularity)
    for out, key in ((prune, "prune_logits"), (merge, "merge_logits")):
      out.append(int(kept_and_probability(jnp.asarray(p[key]), cand, 1)[0]))
  return KeptCounts(tuple(prune), tuple(merge))


def export(params, model, workdir: str, image_hw) -> str:
  """train.py's hook after a search run: writes workdir/compression_rate.json, keyed by the model and the
  searched schedule's GFLOPs (tokcomp's count, 2 per MAC), and returns its path."""
  from tokcomp.reducers import diffrate
  step = next(s for s in reducers.build_schedule(model.reduce, model.depth) if s is not None)
  gh, gw = model.grid(image_hw)
  counts = searched_counts(params, gh * gw, step.config.granularity)
  searched = model.clone(reduce=diffrate.schedule(counts, clamp=True))
  path = os.path.join(workdir, "compression_rate.json")
  name = f"ViT-w{model.width}-d{model.depth}-p{model.patch_size[0]}"
  write_schedule(path, counts, name, round(searched.flops(image_hw, 1) / 1e9, 4))
  return path


def write_schedule(path: str | os.PathLike, counts, model: str, flops: float | str) -> None:
  """Adds one entry to an authors'-format compression_rate.json (created if absent):
  {model: {flops: {"prune_kept_num": "[...]", "merge_kept_num": "[...]"}}}, the lists as strings as theirs."""
  data = {}
  if os.path.exists(path):
    with open(path) as f:
      data = json.load(f)
  data.setdefault(model, {})[str(flops)] = {"prune_kept_num": str(list(counts.prune)).replace(" ", ""),
                                            "merge_kept_num": str(list(counts.merge)).replace(" ", "")}
  with open(path, "w") as f:
    json.dump(data, f, indent=1)


def _build(args, depth):
  args = reducers.check_args("diffrate_search", args, {"granularity": 1})
  g = args["granularity"]
  if isinstance(g, bool) or not isinstance(g, int) or g < 1:
    raise ValueError(f"diffrate_search granularity={g!r}: must be an int >= 1 (candidate spacing in tokens)")
  return tuple(schedules.Step("diffrate_search", SearchConfig(l, g)) for l in range(depth))


def _bind(config: SearchConfig, n0: int, protected: int) -> SearchConfig:
  # Block 0 is never compressed (the reference's `non_compressed_block_index = [0]`): one candidate, all patches.
  g = n0 - protected + 1 if config.layer == 0 else config.granularity
  return dataclasses.replace(config, num_patches=n0 - protected, granularity=g)


reducers.register(reducers.Method(
    name="diffrate_search", reduce=None, module=DiffRateSearch, signals=("cls_attn",), build=_build,
    out_count=lambda c, n, p: n, bind=_bind, prop_attn=lambda c: True, export=export, example="diffrate_search"))

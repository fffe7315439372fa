"""Token Transforming: many-to-many soft token transform (Zeng, Yu, Kong, Tang 2025, arXiv:2506.05709, §3).

The paper writes every token reduction as X' = T X with an explicit matrix T [M, N]: pruning is one-hot rows,
merging is disjoint rows, and Token Transforming lets every source token spread over several output tokens
(many-to-many), training-free. Our construction, per example, at one block (mid slot, after attention):

  1. Targets. a_n = (1/H) Σ_h softmax(q_cls k_nᵀ/√d)_h (EViT's attentiveness). The k = ceil(ρ (N - P)) most
     attentive reducible tokens are the informative targets; with the prefix they are the M = P + k outputs.
  2. Similarity. c_{n,m} = cos(f_n, f_{t_m}) between every slot n and every reducible target t_m, with f the
     head-mean keys k̄ (metric=keys, as ToMe) or the block's features x (metric=x).
  3. Sparsity. Each non-target source n keeps only its `topk` most similar targets (ties by position).
  4. Soft assignment. A[n, m] = softmax_m(c_{n,m} / τ) over those top-k targets; every row sums to 1, so a
     source's whole mass is shared out. Targets (and the prefix) keep themselves: A[t_m, m] = 1. Invalid
     (masked) slots have zero rows.
  5. Transform (tokcomp.ops.transform.soft_reassign): size'_m = Σ_n A[n, m] s_n and
     T[m, n] = A[n, m] s_n / size'_m, so x' = T x is the size-weighted mean of everything a target received
     (size' is conserved exactly in fp32 by rounding its shares to a dyadic grid; see the ops module).
     With proportional attention (prop_attn, default on) later blocks add log size' to the attention logits.
Special cases: topk=1 (or τ -> 0) is a hard merge of each inattentive token into its most similar target
(`Tokens.reassign` with sizes); a zero row for the inattentive tokens would be top-k pruning (`Tokens.gather`);
the tests check both against the matrix form.
Count: N -> P + k, k = ceil(ρ (N - P)) (EViT's rule). Nothing happens when k = N - P.
Order: prefix, then the targets in ascending slot order.
Index: original token p lives in the slot that receives the largest share of it (argmax_m A[n, m]; a target
  maps to itself). `unmerge` is therefore the hard read-back of a soft transform.
Config: `transform:keep=0.7,layers=3-6-9[,topk=4,tau=0.1,metric=keys,prop_attn=True]`; layers are 0-based
  block indices (3-6-9 = DeiT blocks 4, 7, 10, EViT's schedule).
Parity: no official code exists (github.com/AuroraZengfh/TokenTransforming @ dedcac5 holds only a README and
  a licence), so tests/test_transform.py checks this file against a loop-based NumPy reference of steps 1-5.
Deliberate choices where the paper text could not be checked (see tools/goldens/transform.md): the target
  score (CLS attention), the metric (keys), per-source top-k then a temperature softmax over targets,
  targets mapping to themselves with weight 1, sizes as transported mass with proportional attention, and
  the defaults topk=4, τ=0.1. No spatial-locality restriction is applied.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals, masked_softmax
from tokcomp.ops import select
from tokcomp.ops.transform import soft_reassign
from tokcomp.reducers import keep
from tokcomp.tokens import Tokens

METRICS = ("keys", "x")


@dataclasses.dataclass(frozen=True)
class TransformConfig:
  keep: float              # ρ: fraction of the reducible tokens kept as targets, k = ceil(ρ (N - P))
  topk: int = 4            # targets each inattentive token is spread over (static)
  tau: float = 0.1         # softmax temperature on the cosine similarities
  metric: str = "keys"     # similarity features: "keys" (head-mean keys) or "x" (the block's tokens)
  prop_attn: bool = True   # hand log(size) to later attention as a bias


def check_config(config: TransformConfig) -> TransformConfig:
  keep.check_keep("transform", config.keep)
  if isinstance(config.topk, bool) or not isinstance(config.topk, int) or config.topk < 1:
    raise ValueError(f"transform topk={config.topk!r}: must be an int >= 1")
  if isinstance(config.tau, bool) or not isinstance(config.tau, (int, float)) or not config.tau > 0:
    raise ValueError(f"transform tau={config.tau!r}: must be a temperature > 0")
  if config.metric not in METRICS:
    raise ValueError(f"transform metric={config.metric!r}: must be one of {METRICS}")
  return config


def assignment(tokens: Tokens, score: jax.Array, metric: jax.Array, config: TransformConfig
               ) -> tuple[jax.Array, jax.Array]:
  """Steps 1-4: the targets [B, M] (prefix + k informative slots, ascending) and A [B, N, M]."""
  k = keep.kept_count(config, tokens.n, tokens.num_protected)
  idx, inattentive = select.topk_reducible(tokens, score, k)
  targets = select.keep_with_prefix(tokens, idx)  # [B, M]
  m = targets.shape[1]

  f = metric.astype(jnp.float32)
  f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
  f_targets = jnp.take_along_axis(f, targets[..., None], axis=1)  # [B, M, C]
  cos = jnp.einsum("bnc,bmc->bnm", f, f_targets, precision=jax.lax.Precision.HIGHEST)  # [B, N, M]

  # Candidates: reducible, valid targets. Each source keeps its topk best (stable: ties by target order).
  target_valid = jnp.take_along_axis(tokens.mask, targets, axis=1) & (jnp.arange(m) >= tokens.num_protected)
  ranked = jnp.where(target_valid[:, None, :], cos, -jnp.inf)
  best = jnp.argsort(ranked, axis=-1, descending=True, stable=True)[..., :config.topk]  # [B, N, topk]
  in_topk = jnp.any(best[..., None] == jnp.arange(m), axis=-2)  # [B, N, M]
  soft = masked_softmax(cos / config.tau, in_topk & target_valid[:, None, :])

  itself = (targets[:, None, :] == jnp.arange(tokens.n)[None, :, None]).astype(jnp.float32)  # [B, N, M]
  assign = jnp.where(inattentive[..., None], soft, itself)
  return targets, jnp.where(tokens.mask[..., None], assign, 0.0)


def reduce(tokens: Tokens, signals: Signals, *, config: TransformConfig) -> Tokens:
  check_config(config)
  if signals.cls_attn is None:
    raise ValueError("transform needs signals.cls_attn (the CLS attention row); the model has no CLS token?")
  if config.metric == "keys" and signals.keys_mean is None:
    raise ValueError("transform metric='keys' needs signals.keys_mean (the head-mean keys of the attention)")
  metric = signals.keys_mean if config.metric == "keys" else tokens.x
  _, assign = assignment(tokens, select.cls_attention_score(signals.cls_attn), metric, config)
  return soft_reassign(tokens, assign)


def _build(args, depth):
  args = reducers.check_args("transform", args, {"keep": None, "layers": "3-6-9", "topk": 4, "tau": 0.1,
                                                 "metric": "keys", "prop_attn": True})
  if args["keep"] is None:
    raise ValueError("transform: argument keep is required, e.g. transform:keep=0.7,layers=3-6-9")
  layers = args.pop("layers")
  config = check_config(TransformConfig(**args))
  if not isinstance(config.prop_attn, bool):
    raise ValueError(f"transform prop_attn={config.prop_attn!r}: must be True or False")
  config = dataclasses.replace(config, keep=float(config.keep), tau=float(config.tau))
  layers = schedules.parse_layers(layers, depth, "transform layers")
  return tuple(schedules.Step("transform", config) if i in layers else None for i in range(depth))


def _resolve(config: TransformConfig, n: int, protected: int):
  check_config(config)
  return None if keep.kept_count(config, n, protected) >= n - protected else config


reducers.register(reducers.Method(
    name="transform", reduce=reduce, signals=("cls_attn", "keys_mean"), build=_build,
    out_count=lambda c, n, p: p + keep.kept_count(c, n, p), resolve=_resolve,
    prop_attn=lambda c: c.prop_attn, example="transform:keep=0.5,layers=1,topk=3"))

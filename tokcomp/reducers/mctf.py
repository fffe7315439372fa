"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee, Choi & Kim, CVPR 2024,
arXiv:2403.10030, §3.2-3.3), training-free (the reference's evaluation path; no fine-tuning here).

Criteria (§3.2). Slots alternate into A (even) and B (odd), as ToMe. An edge (a, b) scores
  W = W_sim · W_info · W_size,
  W_sim  = ((cos(x_a, x_b) + 1) / 2)^(1/τ_sim)             similarity of the token features x (the residual
                                                            stream, not the keys)
  W_info = (ĩ_a ĩ_b)^(1/τ_info),  ĩ_n = (1/ā_n) / max_m (1/ā_m)   informativeness: ā_n = the attention token n
                                                            receives, mean over heads and queries
  W_size = (s̃_a s̃_b)^(1/τ_size),  s̃_n = (1/s_n) / max_m (1/s_m)  size: s_n original tokens in slot n
A criterion with τ = 0 is left out (factor 1), as in the reference.
Matching (§3.2, "bidirectional"): r1 = r // 2 A slots merge into B by their best edge; then the r2 = r - r1 B
slots with the best edge to a still unmerged A slot merge into it (both rounds on the same W);
`tokcomp.ops.scored_matching`. With bidirection=False: one round of r, ToMe's order.
Fusion (§3.2; the reference's `pooling_type`): x'_g = Σ_{n∈g} w_n x_n / Σ_{n∈g} w_n with
  pooling=attn (1): w_n = ā_n s_n / max_m s_m (attention-weighted; the published setting)
  pooling=size (0): w_n = s_n (ToMe's);  pooling=mean (3): w_n = 1;  pooling=max (2): x'_g = max_{n∈g} x_n.
Sizes add. With prop_attn, later attention adds log s to its logits (ToMe's proportional attention).
One-step-ahead attention (§3.3; `one_step_ahead`, the reference's Block_DEIT.forward):
  1 (default): the reduction runs at the start of block l on its input tokens, with ā from block l's own
    attention A on those tokens (qk only: the attention "one step ahead" of block l-1's output). The block then
    does not recompute its attention: it applies the fused map A'_{g,g'} = Σ_{i∈g} w̃_i Σ_{j∈g'} A_ij
    (key columns summed, query rows pooled with the same weights as x, or max for pooling=max) to the values
    of the fused tokens. Block slot "ahead" (tokcomp/models/vit.py); `reduce(..., fuse_attention=True)`.
  2 ("precise"): as 1, but block l recomputes its attention on the fused tokens (slot "ahead", no A').
  0 (off): the reduction runs after block l's MLP with ā from block l's attention (slot "post").
Count: N -> N - r per active block, with the reference's rule (utils/mctf.py `mctf`): r <- N - 10 if
  N - r < 10; then r <- int((N - P) r) if r < 1 (a rate); then r <- min(r, (N - P) // 2). r = 0: untouched.
Order: as the reference: protected prefix, the unmerged A by position, then (bidirectional) the unmerged B by
  descending round-2 score, or (one direction) all B by position.

Config: "mctf:r=16" (all blocks but the first, the published DeiT setting) or e.g.
  "mctf:r=0.35,layers=3-6-9,one_step_ahead=1,tau_sim=1,tau_info=20,tau_size=40,bidirection=True,pooling=attn,
   prop_attn=True" (every value after layers is the default: the reference's mctf_type [r,0,0,1,1,1,20,40,1,1,0]).
  r: int >= 1, or a rate in (0, 1) of the reducible tokens. pooling: attn|size|max|mean, or the reference's
  pooling_type 0-3. one_step_ahead: 0, 1 or 2. τ >= 0.

Parity: tests/goldens/mctf_*.npz (tools/goldens/make_mctf.py, mlvlab/MCTF @ 2004da0, run unmodified): five
  cases covering one_step_ahead 0/1/2, pooling 0-3, bidirection and prop_attn on/off, a rate r and the keep-10
  cap; logits, every block output (slot by slot), final sizes and source map at 1e-5 (measured: <= 6e-7 abs).
Cost: `ViT.flops` counts an "ahead" block as a dense block at its reduced count; the Q, K projections and the
  N x N scores on the incoming tokens are left out, as every reducer's own work is.
Deliberate differences from the reference:
  - Ties in the rankings break by position (stable sorts); the reference's torch argsort/sort is unstable.
  - The reference blocks only A rows [0, P) for a prefix of P slots (right for P = 1, its only case); here
    the P prefix slots, wherever they fall in A or B, take part in no edge and always come out first.
  - Invalid (masked) slots take part in no edge; ā averages over valid queries; maxima run over valid slots;
    1/ā is floored at the smallest normal float (the reference gives inf/NaN if a column underflows to 0).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.scored_matching import scored_bipartite_matching
from tokcomp.tokens import Tokens, batched_scatter

POOLINGS = ("size", "attn", "max", "mean")  # index = the reference's pooling_type
MIN_TOKENS = 10  # the reference keeps at least this many tokens (utils/mctf.py)


@dataclasses.dataclass(frozen=True)
class MCTFConfig:
  r: int | float             # merged per active block: a count >= 1, or a rate in (0, 1) of N - P
  one_step_ahead: int = 1    # 0 off (reduce after the MLP), 1 fused attention, 2 recomputed attention
  tau_sim: float = 1.0       # temperatures; 0 leaves a criterion out
  tau_info: float = 20.0
  tau_size: float = 40.0
  bidirection: bool = True
  pooling: str = "attn"      # one of POOLINGS
  prop_attn: bool = True


def merge_count(config: MCTFConfig, n: int, protected: int) -> int:
  """The reference's r for a block that meets N tokens (utils/mctf.py `mctf`), in Python numbers."""
  r = config.r
  if n - r < MIN_TOKENS:
    r = n - MIN_TOKENS
  r = min(int((n - protected) * r) if r < 1 else r, (n - protected) // 2)
  return max(int(r), 0)


def received_attention(attn: jax.Array, mask: jax.Array) -> jax.Array:
  """ā [B, N]: the attention each token receives, averaged over heads and (valid) queries."""
  rows = jnp.where(mask[:, None, :, None], attn.astype(jnp.float32), 0.0)
  count = attn.shape[1] * jnp.maximum(jnp.sum(mask, axis=1), 1)
  return jnp.sum(rows, axis=(1, 2)) / count[:, None]


def _pair_factor(u: jax.Array, tau: float) -> jax.Array:
  """(ũ_a ũ_b)^(1/τ) [B, Na, Nb] from per-slot values ũ [B, N] (A = even slots, B = odd slots)."""
  return (u[:, 0::2, None] * u[:, None, 1::2]) ** (1.0 / tau)


def _inverse_normalized(v: jax.Array, mask: jax.Array) -> jax.Array:
  """(1/v) / max over valid slots of 1/v, 0 on invalid slots."""
  inv = jnp.where(mask, 1.0 / jnp.maximum(v, jnp.finfo(jnp.float32).tiny), 0.0)
  return inv / jnp.max(inv, axis=1, keepdims=True)


def multi_criteria_scores(tokens: Tokens, received: jax.Array, config: MCTFConfig) -> jax.Array:
  """W = W_sim · W_info · W_size [B, Na, Nb] between A (even) and B (odd) slots (§3.2)."""
  x = tokens.x.astype(jnp.float32)
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  if config.tau_sim:
    w = ((jnp.einsum("bic,bjc->bij", x[:, 0::2], x[:, 1::2]) + 1) / 2) ** (1.0 / config.tau_sim)
  else:
    w = jnp.ones((tokens.batch, (tokens.n + 1) // 2, tokens.n // 2), jnp.float32)
  if config.tau_info:
    w = w * _pair_factor(_inverse_normalized(received, tokens.mask), config.tau_info)
  if config.tau_size:
    w = w * _pair_factor(_inverse_normalized(tokens.size, tokens.mask), config.tau_size)
  return w


def pooling_weight(tokens: Tokens, received: jax.Array, pooling: str) -> jax.Array | None:
  """w [B, N] of the fusion x'_g = Σ w x / Σ w; None for the size weight (Tokens.reassign's default)."""
  if pooling == "attn":
    size_max = jnp.max(jnp.where(tokens.mask, tokens.size, 0.0), axis=1, keepdims=True)
    return received * (tokens.size / size_max)
  if pooling == "mean":
    return jnp.ones_like(tokens.size)
  return None  # size (and max, whose bookkeeping only needs sizes)


def fuse_attention_map(attn: jax.Array, dest: jax.Array, num_out: int, weight: jax.Array, mask: jax.Array,
                   pooling: str) -> jax.Array:
  """A' [B, H, N', N'] from A [B, H, N, N]: key columns summed per group, query rows pooled per group with
  `weight` (a weighted mean) or, for pooling=max, by their maximum (the reference's `merge_wavg`)."""
  b, h, n, _ = attn.shape
  tgt = jnp.where(dest < 0, num_out, dest)
  cols = batched_scatter(jnp.zeros((b, num_out, h, n), jnp.float32), tgt,
                         attn.astype(jnp.float32).transpose(0, 3, 1, 2), "add", mode="drop")  # [B, N'k, H, Nq]
  cols = cols.transpose(0, 3, 2, 1)  # [B, Nq, H, N'k]
  if pooling == "max":
    rows = batched_scatter(jnp.full((b, num_out, h, num_out), -jnp.inf, jnp.float32), tgt,
                           jnp.where(mask[:, :, None, None], cols, -jnp.inf), "max", mode="drop")
    rows = jnp.where(jnp.isfinite(rows), rows, 0.0)
  else:
    weight = jnp.where(mask, weight, 0.0)
    rows = batched_scatter(jnp.zeros((b, num_out, h, num_out), jnp.float32), tgt,
                           weight[:, :, None, None] * cols, "add", mode="drop")
    wsum = batched_scatter(jnp.zeros((b, num_out), jnp.float32), tgt, weight, "add", mode="drop")
    rows = rows / jnp.where(wsum > 0, wsum, 1.0)[:, :, None, None]
  return rows.transpose(0, 2, 1, 3)


def reduce(tokens: Tokens, signals: Signals, *, config: MCTFConfig, fuse_attention: bool = False
           ) -> Tokens | tuple[Tokens, jax.Array | None]:
  """Merges r slots. With fuse_attention=True (the block's "ahead" slot) returns (tokens, A'), where A' is the
  fused attention for the block to apply (one_step_ahead=1), or None for it to recompute (0 or 2)."""
  if signals.attn is None:
    raise ValueError("mctf needs signals.attn (the full attention probabilities of the block)")
  if signals.attn.shape[-1] != tokens.n or signals.attn.shape[-2] != tokens.n:
    raise ValueError(f"mctf signals.attn shape {signals.attn.shape}: must be [B, H, N, N] for N={tokens.n}")
  _check(config)
  r = merge_count(config, tokens.n, tokens.num_protected)
  if r == 0:
    return (tokens, None) if fuse_attention else tokens
  received = received_attention(signals.attn, tokens.mask)
  scores = multi_criteria_scores(tokens, received, config)
  dest = scored_bipartite_matching(scores, tokens.mask, r, tokens.num_protected, config.bidirection)
  num_out = tokens.n - r
  weight = pooling_weight(tokens, received, config.pooling)
  out = tokens.reassign(dest, num_out, weight=weight)
  if config.pooling == "max":
    tgt = jnp.where(dest < 0, num_out, dest)
    x = batched_scatter(jnp.full(out.x.shape, -jnp.inf, out.x.dtype), tgt,
                        jnp.where(tokens.mask[..., None], tokens.x, -jnp.inf), "max", mode="drop")
    out = out.replace(x=jnp.where(out.mask[..., None], x, 0.0).astype(out.x.dtype))
  if not fuse_attention:
    return out
  if config.one_step_ahead != 1:
    return out, None
  weight = tokens.size if weight is None else weight
  return out, fuse_attention_map(signals.attn, dest, num_out, weight, tokens.mask, config.pooling)


def _check(config: MCTFConfig) -> None:
  r = config.r
  if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r >= 1 and float(r) == int(r) or 0 < r < 1):
    raise ValueError(f"mctf r={r!r}: must be an int >= 1 (tokens merged per block) or a rate in (0, 1)")
  if config.one_step_ahead not in (0, 1, 2):
    raise ValueError(f"mctf one_step_ahead={config.one_step_ahead!r}: must be 0 (off), 1 (fused attention) "
                     "or 2 (recomputed attention)")
  for name in ("tau_sim", "tau_info", "tau_size"):
    tau = getattr(config, name)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
      raise ValueError(f"mctf {name}={tau!r}: must be a number >= 0 (0 leaves the criterion out)")
  if config.pooling not in POOLINGS:
    raise ValueError(f"mctf pooling={config.pooling!r}: must be one of {POOLINGS} (or 0-3)")


def _build(args: dict[str, Any], depth: int) -> schedules.Schedule:
  args = reducers.check_args("mctf", args, {
      "r": None, "layers": None, "one_step_ahead": 1, "tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0,
      "bidirection": True, "pooling": "attn", "prop_attn": True})
  if args["r"] is None:
    raise ValueError("mctf: argument r is required, e.g. mctf:r=16 or mctf:r=0.35,layers=3-6-9")
  pooling = args["pooling"]
  if isinstance(pooling, int) and not isinstance(pooling, bool) and 0 <= pooling < len(POOLINGS):
    pooling = POOLINGS[pooling]
  r = args["r"]
  if isinstance(r, float) and r >= 1 and r == int(r):
    r = int(r)
  config = MCTFConfig(r=r, one_step_ahead=args["one_step_ahead"], tau_sim=args["tau_sim"],
                      tau_info=args["tau_info"], tau_size=args["tau_size"], bidirection=bool(args["bidirection"]),
                      pooling=pooling, prop_attn=bool(args["prop_attn"]))
  _check(config)
  layers = args["layers"] if args["layers"] is not None else list(range(1, depth))
  layers = schedules.parse_layers(layers, depth, "mctf layers")
  slot = "post" if config.one_step_ahead == 0 else "ahead"
  return tuple(schedules.Step("mctf", config, slot=slot) if i in layers else None for i in range(depth))


def _resolve(config: MCTFConfig, n: int, protected: int):
  _check(config)
  return config if merge_count(config, n, protected) > 0 else None


reducers.register(reducers.Method(
    name="mctf", reduce=reduce, signals=("attn",), build=_build,
    out_count=lambda c, n, p: n - merge_count(c, n, p), resolve=_resolve, prop_attn=lambda c: c.prop_attn,
    example="mctf:r=5,layers=1"))

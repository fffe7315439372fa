"""GTP-ViT: graph-based token propagation (Xu et al., WACV 2024, arXiv:2311.03035, §3).

At each chosen block, after the attention residual (the "mid" slot, where the reference acts), the
`num_prop` least significant patch tokens are removed and their features are propagated into the kept
tokens they are connected to on a token graph; the kept tokens "summarise" the graph.

Significance (reference `select`, default "MixedAttnMax", the paper's regeneration difficulty γ times
broadcasting ability ψ), from the block's attention probabilities A [B, H, N, N] (after the log-size bias):
    s_j = max_h A_h[j, j] · max_h Σ_i A_h[i, j]          (i over every valid query, prefix included)
Also: CLSAttnMean/Max (A_h[0, j]), IMGAttnMean/Max (Σ_i A_h[i, j]), DiagAttnMean/Max (A_h[j, j]),
MixedAttnMean (means instead of maxes), SumAttnMax (γ + ψ), CosSimMean/Max (−Σ_k cos(Ā[j], Ā[k]) over
the patch rows of the head-mean/-max attention). The reducible slots are ranked by s, descending; the
first N − P − num_prop are kept, the rest are propagated (invalid slots rank last).

Graph (reference `GraphPropagationTransformer.forward_features`), built once on the encoder input
E (patch + position embeddings, `Signals.encoder_input`), over the M patches in raster order:
    spatial  S_pq = 1 if |Δrow| <= 1 and |Δcol| <= 1 on the patch grid, p != q      (8-neighbourhood)
    semantic C_pq = 1 if cos(E_p, E_q) >= the (num_neighbours + 1)-th largest cos of row p, minus I
    mixed    G = C | S (integer or);  "spatial": G = S;  "semantic": G = C
    Ĝ = D^{-1/2} G D^{-1/2},  D = diag(row sums of G)   (symmetric normalisation on the FULL patch graph)
Later blocks use Ĝ restricted to the surviving tokens, never renormalised. We rebuild exactly that
restriction from each slot's original patch (`ops.graph.slot_origin`), so no graph travels with the state.

Propagation (reference `propagate`, the paper's X^s = X^k + α Â^p X^p):
    "GraphProp"  x_k ← x_k + α Σ_p Ĝ[k, p] x_p      (k kept, p propagated; Ĝ on original positions)
                 with token_scale=True also s_k ← s_k + α Σ_p Ĝ[k, p] s_p for the token scales, which we
                 keep in `size`; later attention adds log s (proportional attention, `prop_attn`)
    "None"       plain pruning by significance
    "Mean"       the propagated tokens become one token, their mean, appended last
Attention sparsification (reference `Attention.forward`, sparsity θ in (0, 1], default 1 = none): in EVERY
block of the model (also blocks where nothing is propagated), after the softmax (and after the log token-scale
bias), per example and head, with n the block's current token count (valid tokens only):
    k = int(n · n · (1 − θ)),   t = the k-th smallest (1-based) of the n × n probabilities,   A_ij ← 0 if A_ij < t
without renormalisation. The sparsified A is applied to the values and is what the selection reads. It is an
attention change, not a token reduction: the method declares it (`Method.attn_sparsity`), models/vit.py hands
it to every block's `Attention(sparsity=θ)` (`attention.sparsify_probs`), which then computes the N × N
probabilities explicitly in fp32 (no fused kernel); θ = 1 leaves the fused dense attention untouched.
Count: N -> N − num_prop (+1 with "Mean"); 1 <= num_prop <= N − P, else ValueError. `num_prop` is an int
       for every block in `layers` (default: all blocks, as the reference), or one entry per block.
Order: protected prefix, then the kept tokens in descending significance (as the reference), then the mean
       token with "Mean". Propagated tokens are dropped from `index` (-1): their information is spread over
       many slots. With "Mean" they map to the mean slot.

Config: `gtp:num_prop=6` (defaults: selection=MixedAttnMax, propagation=GraphProp, graph_type=Mixed,
        num_neighbours=8, alpha=0.1, token_scale=False, sparsity=1, layers=all), e.g.
        `gtp:num_prop=6,alpha=0.15,num_neighbours=8,token_scale=True`, `gtp:num_prop=4-4-8-8,graph_type=spatial`,
        `gtp:num_prop=8,layers=0-1-2,propagation=None`, `gtp:num_prop=5,sparsity=0.7` (θ in (0, 1], else
        ValueError). Option values are the reference's names (any case).
Parity: tests/goldens/gtp_*.npz (tools/goldens/make_gtp.py, Ackesnal/GTP-ViT @ 97a1178, models_v3.py):
        logits and every block's output at 1e-5, fp32, on CLS and GAP models, all three graphs, GraphProp
        with and without token scales, and Mean; attention sparsification (θ = 0.7 and 0.8, with and without
        token scales) in gtp_sparse_*.npz.
Deliberate differences from the reference:
  - sparsity: where k = int(n·n·(1 − θ)) is 0 (θ within 1/n² of 1) the reference's kthvalue raises; we zero
    nothing there (the θ -> 1 limit). Slots made invalid by an earlier masking reducer do not count toward
    n and their keys stay excluded (the reference has no masking). One θ per model, as the reference: a
    schedule that declares two different values is a ValueError; so is θ < 1 with a training keep policy
    (DynamicViT) or a pair mask. Training and eval use one rule (the reference's train-mode mask multiply
    and eval-mode assignment give the same values). `ViT.flops` ignores θ (the products stay dense).
  - Without a prefix token the reference's semantic graph keeps num_neighbours + 1 neighbours (its kthvalue
    index counts a CLS that is not there); we keep num_neighbours for every prefix count. With one CLS token
    (the paper's models) both agree. The golden feeds the reference num_neighbours − 1 for the GAP case.
  - The reference indexes the grid as a square (√M); we use the true (h, w) grid (same on square grids).
  - More than one prefix token (DeiT distillation, registers) is not supported by the reference; here the
    prefix is left alone and CLS-row selections read row 0.
  - Invalid slots (from an earlier masking reducer) rank last and propagate nothing (their graph weight is
    0); the reference has no masking. A slot that holds several originals (an earlier merge) takes the graph
    row of its lowest original token. Isolated nodes get weight 0 where the reference's D^{-1/2} is inf.
  - "Random" selection (a fresh torch.randn per call) is not offered.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops import graph, select
from tokcomp.tokens import Tokens, batched_scatter

SELECTIONS = ("CLSAttnMean", "CLSAttnMax", "IMGAttnMean", "IMGAttnMax", "DiagAttnMean", "DiagAttnMax",
              "MixedAttnMean", "MixedAttnMax", "SumAttnMax", "CosSimMean", "CosSimMax")
PROPAGATIONS = ("GraphProp", "None", "Mean")
GRAPHS = ("Spatial", "Semantic", "Mixed")
DEFAULTS = dict(num_prop=None, layers=None, selection="MixedAttnMax", propagation="GraphProp",
                graph_type="Mixed", num_neighbours=8, alpha=0.1, token_scale=False, sparsity=1)


@dataclasses.dataclass(frozen=True)
class GTPConfig:
  num_prop: int                     # tokens propagated away at this block (static)
  selection: str = "MixedAttnMax"
  propagation: str = "GraphProp"
  graph_type: str = "Mixed"
  num_neighbours: int = 8           # semantic graph: neighbours per patch
  alpha: float = 0.1                # magnitude of the propagated features
  token_scale: bool = False         # carry the reference's token scales in `size`, attend with log(size)
  sparsity: float = 1.0             # θ: attention sparsification in every block of the model (1: none)


# --- significance --------------------------------------------------------------------------------------------

def significance(attn: jax.Array, mask: jax.Array, num_protected: int, selection: str) -> jax.Array:
  """[B, N] score of every slot (only the reducible ones are used), from attention probs [B, H, N, N]."""
  if selection.startswith("CLS") and num_protected == 0:
    raise ValueError(f"gtp selection={selection!r} reads the CLS attention row: the model has no prefix token; "
                     f"use one of {[s for s in SELECTIONS if not s.startswith('CLS')]}")
  head = jnp.mean if selection.endswith("Mean") else lambda a, axis: jnp.max(a, axis=axis)
  attn = attn.astype(jnp.float32)
  if selection.startswith("CLSAttn"):
    return head(attn[:, :, 0, :], axis=1)
  diagonal = lambda: head(jnp.diagonal(attn, axis1=-2, axis2=-1), axis=1)                 # γ: A_h[j, j]
  received = lambda: head(jnp.sum(jnp.where(mask[:, None, :, None], attn, 0.0), axis=-2), axis=1)  # ψ
  if selection.startswith("IMGAttn"):
    return received()
  if selection.startswith("DiagAttn"):
    return diagonal()
  if selection.startswith("MixedAttn"):
    return diagonal() * received()
  if selection == "SumAttnMax":
    return diagonal() + received()
  # CosSim: rows of the head-reduced attention of the reducible queries, negated total cosine similarity.
  rows = head(attn[:, :, num_protected:, :], axis=1)                                       # [B, N - P, N]
  rows = rows / jnp.linalg.norm(rows, axis=-1, keepdims=True)
  sim = jnp.einsum("bik,bjk->bij", rows, rows)
  sim = jnp.where(mask[:, None, num_protected:], sim, 0.0)
  score = -jnp.sum(sim, axis=-1)
  return jnp.pad(score, ((0, 0), (num_protected, 0)))


# --- the graph on original positions -------------------------------------------------------------------------

def graph_rows(tokens: Tokens, encoder_input: Tokens | None, config: GTPConfig) -> tuple[jax.Array, jax.Array]:
  """The rows of the encoder-input patch graph G for every reducible slot: (adjacency [B, N - P, M] int32
  over all M original patches, patch [B, N - P] the slot's own original patch, -1 if it holds none)."""
  p = tokens.num_protected
  m = tokens.num_original - p
  patch = graph.slot_origin(tokens)[:, p:] - p                 # original patch of each reducible slot
  patch = jnp.where(patch >= 0, patch, -1)
  own = jnp.clip(patch, 0, m - 1)
  all_patches = jnp.arange(m, dtype=jnp.int32)
  adjacency = jnp.zeros((tokens.batch, tokens.num_reducible, m), jnp.int32)
  if config.graph_type in ("Semantic", "Mixed"):
    if encoder_input is None:
      raise ValueError(f"gtp graph_type={config.graph_type!r} needs signals.encoder_input (the encoder's input "
                       "embeddings, which models/vit.py hands over), or use graph_type=Spatial")
    if encoder_input.num_original != tokens.num_original or encoder_input.num_protected != p:
      raise ValueError("gtp: signals.encoder_input must be the encoder's input state of this token sequence "
                       f"(N0={tokens.num_original}, protected={p})")
    if not 1 <= config.num_neighbours <= m - 1:
      raise ValueError(f"gtp num_neighbours={config.num_neighbours}: must be in [1, {m - 1}] for {m} patches")
    embed = encoder_input.x[:, p:].astype(jnp.float32)         # [B, M, D]
    sim = graph.cosine_similarity(jnp.take_along_axis(embed, own[..., None], axis=1), embed)
    # Self (cos 1) is among the num_neighbours + 1 largest; the reference then subtracts I (integer or after).
    adjacency = (graph.at_least_kth_largest(sim, config.num_neighbours + 1).astype(jnp.int32)
                 - (own[..., None] == all_patches))
  if config.graph_type in ("Spatial", "Mixed"):
    grid = encoder_input.grid if encoder_input is not None and encoder_input.grid else tokens.grid
    if grid is None or grid[0] * grid[1] != m:
      raise ValueError(f"gtp graph_type={config.graph_type!r} needs the original patch grid: signals.encoder_input "
                       "with its grid (models/vit.py hands it over), or fresh tokens with Tokens.grid")
    spatial = graph.grid_adjacency(own, all_patches, grid).astype(jnp.int32)
    adjacency = adjacency | spatial if config.graph_type == "Mixed" else spatial
  return adjacency, patch


def propagation_weights(tokens: Tokens, encoder_input: Tokens | None, kept: jax.Array, prop: jax.Array,
                        config: GTPConfig) -> jax.Array:
  """Ĝ[kept, prop] [B, K, R]: the normalised encoder-input graph between kept and propagated slots (slot
  indices [B, K] and [B, R]); 0 in the column of an invalid slot or one that holds no original patch."""
  p = tokens.num_protected
  adjacency, patch = graph_rows(tokens, encoder_input, config)
  inv_sqrt = graph.inverse_sqrt_degree(adjacency)              # D^{-1/2}, degrees of the full patch graph
  take = lambda a, idx: jnp.take_along_axis(a, idx, axis=1)
  prop_patch = take(patch, prop - p)                           # [B, R]
  rows = take(adjacency, (kept - p)[..., None])                # [B, K, M]
  cols = jnp.broadcast_to(jnp.clip(prop_patch, 0)[:, None, :], (rows.shape[0], rows.shape[1], prop.shape[1]))
  edge = jnp.take_along_axis(rows, cols, axis=2).astype(jnp.float32)  # [B, K, R]
  # (D^{-1/2} G) D^{-1/2}, in the reference's order of products.
  weight = (take(inv_sqrt, kept - p)[:, :, None] * edge) * take(inv_sqrt, prop - p)[:, None, :]
  usable = (prop_patch >= 0) & take(tokens.mask, prop)
  return jnp.where(usable[:, None, :], weight, 0.0)


# --- the reduction -------------------------------------------------------------------------------------------

def reduce(tokens: Tokens, signals: Signals, *, config: GTPConfig) -> Tokens:
  if signals.attn is None:
    raise ValueError("gtp needs signals.attn (the block's full attention probabilities)")
  p, n = tokens.num_protected, tokens.n
  if not 1 <= config.num_prop <= n - p:
    raise ValueError(f"gtp num_prop={config.num_prop}: must be in [1, {n - p}] (N={n}, protected={p})")
  score = significance(signals.attn, tokens.mask, p, config.selection)
  order = select.rank_reducible(tokens, score)                 # [B, N - P], most significant first
  num_kept = n - p - config.num_prop
  kept, prop = order[:, :num_kept], order[:, num_kept:]
  keep = select.keep_with_prefix(tokens, kept)                 # [B, P + K]: prefix, kept by significance

  if config.propagation == "Mean":
    # One scatter: kept slots move to their place, propagated ones average into the last slot.
    m = keep.shape[1]
    dest = batched_scatter(jnp.full((tokens.batch, n), m, jnp.int32), keep, jnp.arange(m, dtype=jnp.int32))
    return tokens.reassign(dest, m + 1, weight=jnp.ones(tokens.size.shape, jnp.float32))

  out = tokens.gather(keep)
  if config.propagation == "None":
    return out
  weight = propagation_weights(tokens, signals.encoder_input, kept, prop, config)   # [B, K, R]
  take = lambda a, idx: jnp.take_along_axis(a, idx.reshape(*idx.shape, *([1] * (a.ndim - 2))), axis=1)
  x_prop = take(tokens.x, prop).astype(jnp.float32)
  message = jnp.einsum("bkr,brd->bkd", weight, x_prop)
  x_kept = out.x[:, p:] + (config.alpha * message).astype(out.x.dtype)
  out = out.replace(x=jnp.concatenate([out.x[:, :p], x_kept], axis=1))
  if config.token_scale:
    scale = jnp.einsum("bkr,br->bk", weight, take(tokens.size, prop))
    out = out.replace(size=jnp.concatenate([out.size[:, :p], out.size[:, p:] + config.alpha * scale], axis=1))
  return out


# --- config --------------------------------------------------------------------------------------------------

def _choice(field: str, value, options: tuple[str, ...]) -> str:
  by_lower = {o.lower(): o for o in options}
  value = "None" if value is None else value  # the spec parser reads the bare word None as Python's None
  if not isinstance(value, str) or value.lower() not in by_lower:
    raise ValueError(f"gtp {field}={value!r}: must be one of {list(options)} (any case)")
  return by_lower[value.lower()]


def _per_block(num_prop, layers, depth: int) -> list[int]:
  """num_prop for every block: an int on `layers` (default all), or one entry per block (no `layers`)."""
  if isinstance(num_prop, str):
    try:
      num_prop = [int(t) for t in num_prop.split("-")]
    except ValueError:
      raise ValueError(f"gtp num_prop={num_prop!r}: must be an int, or one int per block joined by '-'") from None
  if isinstance(num_prop, (list, tuple)):
    if layers is not None:
      raise ValueError("gtp: give layers only with an int num_prop; a per-block num_prop already says where")
    if len(num_prop) != depth:
      raise ValueError(f"gtp num_prop has {len(num_prop)} entries: must have one per block, depth={depth}")
    values = list(num_prop)
  elif isinstance(num_prop, int) and not isinstance(num_prop, bool):
    chosen = range(depth) if layers is None else schedules.parse_layers(layers, depth, "gtp layers")
    values = [num_prop if i in chosen else 0 for i in range(depth)]
  else:
    raise ValueError(f"gtp num_prop={num_prop!r}: required, an int >= 1 or one int >= 0 per block, e.g. "
                     "gtp:num_prop=6 or gtp:num_prop=4-4-8-8")
  for i, v in enumerate(values):
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
      raise ValueError(f"gtp num_prop at block {i} = {v!r}: must be an int >= 0")
  if not any(values):
    raise ValueError(f"gtp num_prop={num_prop!r}: propagates nothing; must be >= 1 on some block")
  return values


def make_config(args: dict, num_prop: int) -> GTPConfig:
  sparsity = args["sparsity"]
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
    raise ValueError(f"gtp sparsity={sparsity!r}: must be a number in (0, 1] (1: no attention sparsification)")
  nn_ = args["num_neighbours"]
  if not isinstance(nn_, int) or isinstance(nn_, bool) or nn_ < 1:
    raise ValueError(f"gtp num_neighbours={nn_!r}: must be an int >= 1")
  alpha = args["alpha"]
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
    raise ValueError(f"gtp alpha={alpha!r}: must be a finite number")
  if not isinstance(args["token_scale"], bool):
    raise ValueError(f"gtp token_scale={args['token_scale']!r}: must be True or False")
  propagation = _choice("propagation", args["propagation"], PROPAGATIONS)
  if args["token_scale"] and propagation != "GraphProp":
    raise ValueError(f"gtp token_scale=True: needs propagation=GraphProp (the reference updates token scales "
                     f"only there), got {propagation}")
  return GTPConfig(num_prop=num_prop, selection=_choice("selection", args["selection"], SELECTIONS),
                   propagation=propagation, graph_type=_choice("graph_type", args["graph_type"], GRAPHS),
                   num_neighbours=nn_, alpha=float(alpha), token_scale=args["token_scale"],
                   sparsity=float(sparsity))


def _build(args, depth):
  args = reducers.check_args("gtp", args, DEFAULTS)
  per_block = _per_block(args.pop("num_prop"), args.pop("layers"), depth)
  config = make_config(args, 1)
  return tuple(schedules.Step("gtp", dataclasses.replace(config, num_prop=v)) if v else None for v in per_block)


def _resolve(config: GTPConfig, n: int, protected: int):
  if not 1 <= config.num_prop <= n - protected:
    raise ValueError(f"gtp num_prop={config.num_prop}: must be in [1, {n - protected}] (N={n}, "
                     f"protected={protected})")
  return config


def out_count(config: GTPConfig, n: int, protected: int) -> int:
  return n - config.num_prop + int(config.propagation == "Mean")


reducers.register(reducers.Method(
    name="gtp", reduce=reduce, signals=("attn", "encoder_input"), build=_build, out_count=out_count,
    resolve=_resolve, prop_attn=lambda c: c.token_scale,
    attn_sparsity=lambda c: c.sparsity if c.sparsity < 1 else None,
    example="gtp:num_prop=5,graph_type=spatial,layers=1"))

"""TokenLearner: S learned tokens, v1.1 (softmax over space of an MLP's scores, the default) or v1 (sigmoid maps
of a small conv stack on the patch grid) (Ryoo et al., NeurIPS 2021, arXiv:2106.11297 v2, §2 and appendix; the
reference's `TokenLearnerModuleV11` and `TokenLearnerModule`).

The paper's token i is z_i = ρ(X ⊙ γ(α_i(X))): a spatial map α_i(X) [N] weighs the N patches X [N, C] and ρ
pools over space. On the patch tokens (the prefix is left out), for s = 1..S:
  v1.1 (version=1.1, default; its configs' `use_v11=True`):
    A = softmax_n( MLP(LN(X))ᵀ )            MLP: C -> bottleneck -> S, tanh-GELU between         A [S, N]
    z_s = Σ_n A[s, n] x_n                    (ρ = sum over space)
  v1 (version=1; the module "used for the experiments in the paper", its EncoderMod with `use_v11=False`), on
  the h x w patch grid (`Tokens.grid`):
    F = conv_4(g(conv_3(g(conv_2(g(conv_1(LN(X))))))))   conv_k: 3x3, stride 1, SAME zero padding, no bias,
                                             S output channels (C -> S, then S -> S); g = tanh-GELU; F [h, w, S]
    A = sigmoid(F)ᵀ                          A [S, h·w], each map in (0, 1), not normalised over space
    z_s = Σ_n A[s, n] x_n                    (pool=sum, the reference's default `use_sum_pooling=True`)
    z_s = (1/h·w) Σ_n A[s, n] x_n            (pool=mean, its `use_sum_pooling=False`)
  v1.1 takes any N (also tokens an earlier reducer left); v1 needs the full raster-order patch grid: it raises
  a ValueError at trace time when `Tokens.grid` is None (an earlier reducer removed or merged patches).
Count: N -> protected + S, inserted once, before block `layer` (the reference's `EncoderMod`: the learner runs
       on the block's input and the block and every later one see the S tokens). 1 <= S <= the patches entering.
Order: the protected prefix (CLS, ...) unchanged, then the S learned tokens in the order of the map's channels.
Index/size: the learned tokens are no subset or merge of the input, so `index` sends every original token to
       the slot it weighs most in (argmax_s A[s, n], composed with the incoming index) and `size` counts the
       original tokens whose slot that is (the incoming sizes summed, `Tokens.reassign`), so sizes still sum
       to the originals held; a learned token may have size 0 (it is nobody's argmax) yet stays valid: the
       mask is all true, grid None. The sums and this bookkeeping are the shared `tokcomp.ops.aggregate`
       (`aggregate_reducible` for v1.1's softmax, PatchMerger's and SiT's too; `pool_reducible` for v1's given
       weights). (So a later proportional-attention method would see log 0 there; none is meant to follow.)
Config: "tokenlearner:tokens=8,layer=2" (S = tokens, default 8 as the reference's `EncoderMod`; layer default
       depth * 3 // 4, the reference's ImageNet config's 9 of 12), version=1.1 (or 1), bottleneck=64 (v1.1
       only: the MLP's hidden width, the reference's default), pool=sum (v1 only: sum or mean), slot=pre (the
       reference's placement; "mid" runs it after the block's attention).
       E.g. "tokenlearner:tokens=8,layer=3,version=1".
Parameters: named as the reference's modules, so its weights drop in under `encoderblock_{layer}/tokenlearner`:
       v1.1 `LayerNorm_0`, `token_masking/Dense_0`, `token_masking/Dense_1`; v1 `LayerNorm_0`, `Conv_0` ..
       `Conv_3` (kernels [3, 3, C, S] and [3, 3, S, S], no bias).
FLOPs (`Method.flops`): v1.1 the MLP 2·N·bottleneck·(C + S); v1 the four convs 2·h·w·9·S·(C + 3S); both plus
       the S weighted sums 2·N·S·C (LayerNorm, GELU and sigmoid not counted, as nowhere in `vit_flops`).
Parity: tests/goldens/tokenlearner_*.npz (tools/goldens/make_tokenlearner.py), scenic's
       `TokenLearnerModuleV11` (`tokenlearner_v11_*`) and `TokenLearnerModule` (`tokenlearner_v1_*`, sum and
       mean pooling, square grids) run on the same weights, google-research/scenic @ 4a38d47.
Differences from the reference, on purpose:
  * Prefix tokens: the reference's TokenLearner ViT has none (it pools with GAP); here CLS and other protected
    tokens pass through unchanged and the learner sees the patches only.
  * Dropout: the reference's v1.1 MLP has dropout at the model's dropout_rate (0 in its ImageNet config; the
    identity at inference). tokcomp's ViT trains without dropout and train.py has no dropout rng, so there is
    none here: inference is the reference's exactly, training matches it at rate 0. (v1 has no dropout.)
  * Masked slots (after a capacity-based reducer) get weight 0 in the softmax (v1.1) or the sigmoid maps (v1;
    the convs still read them on the grid); the reference has no mask. With every slot valid, as in the
    reference, the two agree. The learned tokens are summed at HIGHEST precision (the shared op's choice; on
    CPU fp32 the same). v1's mean pooling divides by the valid slots (h·w when all are valid, the reference).
  * v1 grid: the reference reshapes [B, h·w, C] to a square h = sqrt(h·w) and rejects other counts; here the
    grid is `Tokens.grid`, so non-square patch grids work too (the convs are the same on any h x w).
  * LayerNorm eps 1e-6 and tanh-approximate GELU as the reference's (flax defaults), not the ViT's exact GELU.
TokenFuser (the same paper, §2) maps the S tokens back to the N positions after a block; it needs the block's
input beside its output, which no reducer slot sees: see `tokcomp/reducers/tokenfuser.py` (v1.1 learners).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.aggregate import aggregate_flops, aggregate_reducible, pool_reducible
from tokcomp.tokens import Tokens

SLOTS = ("pre", "mid")
VERSIONS = ("1", "1.1")
POOLS = ("sum", "mean")
V1_CONVS = 4  # the reference's `TokenLearnerModule`: three 3x3 convs with GELU, then one without


@dataclasses.dataclass(frozen=True)
class Config:
  num_tokens: int = 8    # S: learned tokens
  bottleneck: int = 64   # v1.1: hidden width of the spatial-attention MLP
  version: str = "1.1"   # "1.1" (MLP + softmax over space) or "1" (conv stack + sigmoid on the grid)
  pool: str = "sum"      # v1: sum (the reference's default) or mean over space


def _positive_int(method: str, field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{method} {field}={value!r}: must be an int >= 1")
  return value


def _version(value) -> str:
  version = {1: "1", 1.1: "1.1", "1": "1", "1.1": "1.1"}.get(value) if not isinstance(value, bool) else None
  if version is None:
    raise ValueError(f"tokenlearner version={value!r}: must be one of {VERSIONS} (1: conv maps + sigmoid on the "
                     "grid; 1.1: MLP + softmax)")
  return version


def build(args, depth):
  args = reducers.check_args("tokenlearner", args, {"tokens": 8, "layer": None, "bottleneck": None, "slot": "pre",
                                                    "version": 1.1, "pool": None})
  num_tokens = _positive_int("tokenlearner", "tokens", args["tokens"])
  version = _version(args["version"])
  if version == "1" and args["bottleneck"] is not None:
    raise ValueError(f"tokenlearner bottleneck={args['bottleneck']!r}: v1.1 only (v1's maps come from 3x3 convs "
                     "with `tokens` channels); drop it or set version=1.1")
  if version == "1.1" and args["pool"] is not None:
    raise ValueError(f"tokenlearner pool={args['pool']!r}: v1 only (v1.1 sums softmax weights); drop it or set "
                     "version=1")
  bottleneck = _positive_int("tokenlearner", "bottleneck", 64 if args["bottleneck"] is None else args["bottleneck"])
  pool = "sum" if args["pool"] is None else args["pool"]
  if pool not in POOLS:
    raise ValueError(f"tokenlearner pool={pool!r}: must be one of {POOLS}")
  layer = args["layer"]
  if layer is None:
    layer = depth * 3 // 4
  if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
    raise ValueError(f"tokenlearner layer={layer!r}: must be one block index in [0, {depth}) for depth={depth} "
                     f"(TokenLearner is inserted once)")
  if args["slot"] not in SLOTS:
    raise ValueError(f"tokenlearner slot={args['slot']!r}: must be one of {SLOTS}")
  step = schedules.Step("tokenlearner", Config(num_tokens, bottleneck, version, pool), slot=args["slot"])
  return tuple(step if i == layer else None for i in range(depth))


def resolve(config: Config, n: int, protected: int) -> Config:
  if not 1 <= config.num_tokens <= n - protected:
    raise ValueError(f"tokenlearner tokens={config.num_tokens}: must be in [1, {n - protected}] (the patches "
                     f"entering the block)")
  return config


def out_count(config: Config, n: int, protected: int) -> int:
  return protected + config.num_tokens


def flops(config: Config, n: int, protected: int, width: int) -> float:
  """The learner's own layers (see the module docstring), then the S weighted sums."""
  patches, s = n - protected, config.num_tokens
  if config.version == "1":  # 3x3 convs C -> S, then three S -> S, at every grid position
    maps = 2.0 * patches * 9 * s * (width + (V1_CONVS - 1) * s)
  else:  # the scoring MLP C -> bottleneck -> S per patch
    maps = 2.0 * patches * config.bottleneck * (width + s)
  return maps + aggregate_flops(patches, s, width)


class TokenMasking(nn.Module):
  """Dense -> tanh-GELU -> Dense (the reference's `MlpBlock` at inference; shared with TokenFuser)."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Dense(self.out, name="Dense_1")(nn.gelu(nn.Dense(self.hidden, name="Dense_0")(x), approximate=True))


class TokenLearner(nn.Module):
  """Reducer signature (tokens, signals, *, train) -> tokens. See the module docstring."""
  config: Config

  @nn.compact
  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    del signals, train  # reads no attention signal; no dropout, so training is inference's path
    c, p = self.config, tokens.num_protected
    if tokens.policy is not None:
      raise ValueError("tokenlearner: the incoming tokens carry a training keep policy (a full-length pruner "
                       "before it in training); the learned tokens cannot carry it on")
    if not 1 <= c.num_tokens <= tokens.num_reducible:
      raise ValueError(f"tokenlearner tokens={c.num_tokens}: must be in [1, {tokens.num_reducible}] "
                       f"(the patches entering)")
    if c.version == "1" and tokens.grid is None:
      raise ValueError(f"tokenlearner version=1: its 3x3 convs need the patches on their full grid "
                       f"(`Tokens.grid`), but the {tokens.num_reducible} tokens entering have none (an earlier "
                       "reducer removed or merged patches); use version=1.1, which takes any tokens")
    normed = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(tokens.x[:, p:])  # [B, N-p, C]
    if c.version == "1.1":
      scores = TokenMasking(c.bottleneck, c.num_tokens, name="token_masking")(normed)  # [B, N-p, S]
      return aggregate_reducible(tokens, scores)[0]  # softmax over the patches, weighted sums, index/size
    (h, w), b = tokens.grid, tokens.batch
    grid = normed.reshape(b, h, w, -1)
    for k in range(V1_CONVS):  # 3x3 convs with S channels, no bias, tanh-GELU between (not after the last)
      grid = nn.Conv(c.num_tokens, kernel_size=(3, 3), strides=(1, 1), padding="SAME", use_bias=False,
                     name=f"Conv_{k}")(grid)
      grid = nn.gelu(grid, approximate=True) if k < V1_CONVS - 1 else grid
    scores = grid.reshape(b, h * w, c.num_tokens)  # [B, N-p, S], raster order as the patches
    valid = tokens.mask[:, p:, None]
    weights = jnp.where(valid, jax.nn.sigmoid(scores.astype(jnp.float32)), 0.0)
    if c.pool == "mean":
      weights = weights / jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
    return pool_reducible(tokens, weights)


reducers.register(reducers.Method(
    name="tokenlearner", reduce=None, module=TokenLearner, signals=(), build=build, out_count=out_count,
    resolve=resolve, example="tokenlearner:tokens=7,layer=1", flops=flops))

"""TokenLearner v1.1: S learned tokens from a softmax over space (Ryoo et al., NeurIPS 2021, arXiv:2106.11297 v2,
§2; the reference's `TokenLearnerModuleV11`).

The paper's token i is z_i = ρ(X ⊙ γ(α_i(X))): a spatial map α_i(X) [N] weighs the N patches X [N, C] and ρ
pools over space. In v1.1, on the patch tokens (the prefix is left out), for s = 1..S:
  A = softmax_n( MLP(LN(X))ᵀ )            MLP: C -> bottleneck -> S, tanh-GELU between         A [S, N]
  z_s = Σ_n A[s, n] x_n                    (ρ = sum over space)
v1.1 (the reference's `TokenLearnerModuleV11`, its configs' default `use_v11=True`) replaces v1's four 3x3
convolutions and sigmoid map on the h x w feature map by this per-token MLP and a softmax over space, so it needs
no square grid and takes any N (also tokens an earlier reducer left); v1 is not implemented.
Count: N -> protected + S, inserted once, before block `layer` (the reference's `EncoderMod`: the learner runs
       on the block's input and the block and every later one see the S tokens). 1 <= S <= the patches entering.
Order: the protected prefix (CLS, ...) unchanged, then the S learned tokens in the order of the MLP's outputs.
Index/size: the learned tokens are no subset or merge of the input, so `index` sends every original token to
       the slot it weighs most in (argmax_s A[s, n], composed with the incoming index) and `size` counts the
       original tokens whose slot that is (the incoming sizes summed, `Tokens.reassign`), so sizes still sum
       to the originals held; a learned token may have size 0 (it is nobody's argmax) yet stays valid: the
       mask is all true, grid None. The softmax, the sums and this bookkeeping are the shared
       `tokcomp.ops.aggregate.aggregate_reducible` (PatchMerger's and SiT's too). (So a later proportional-attention method would see log 0 there; none is
       meant to follow this one.)
Config: "tokenlearner:tokens=8,layer=2" (S = tokens, default 8 as the reference's `EncoderMod`; layer default
       depth * 3 // 4, the reference's ImageNet config's 9 of 12), bottleneck=64 (the MLP's hidden width, the
       reference's default), slot=pre (the reference's placement; "mid" runs it after the block's attention).
Parameters: named as the reference's module (`LayerNorm_0`, `token_masking/Dense_0`, `token_masking/Dense_1`),
       so its weights drop in under `encoderblock_{layer}/tokenlearner`.
Parity: tests/goldens/tokenlearner_*.npz (tools/goldens/make_tokenlearner.py), scenic's `TokenLearnerModuleV11`
       run on the same weights, google-research/scenic @ 4a38d47.
Differences from the reference, on purpose:
  * Prefix tokens: the reference's TokenLearner ViT has none (it pools with GAP); here CLS and other protected
    tokens pass through unchanged and the learner sees the patches only.
  * Dropout: the reference's MLP has dropout at the model's dropout_rate (0 in its ImageNet config; the
    identity at inference). tokcomp's ViT trains without dropout and train.py has no dropout rng, so there is
    none here: inference is the reference's exactly, training matches it at rate 0.
  * Masked slots (after a capacity-based reducer) get weight 0 in the softmax; the reference has no mask. With
    every slot valid, as in the reference, the two agree. The learned tokens are summed at HIGHEST precision
    (the shared op's choice; on CPU fp32 the same).
  * LayerNorm eps 1e-6 and tanh-approximate GELU as the reference's (flax defaults), not the ViT's exact GELU.
TokenFuser (the same paper, §2) maps the S tokens back to the N positions after a block; it needs the block's
input beside its output, which no reducer slot sees: see `tokcomp/reducers/tokenfuser.py`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.aggregate import aggregate_flops, aggregate_reducible
from tokcomp.tokens import Tokens

SLOTS = ("pre", "mid")


@dataclasses.dataclass(frozen=True)
class Config:
  num_tokens: int = 8    # S: learned tokens
  bottleneck: int = 64   # hidden width of the spatial-attention MLP


def _positive_int(method: str, field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{method} {field}={value!r}: must be an int >= 1")
  return value


def build(args, depth):
  args = reducers.check_args("tokenlearner", args, {"tokens": 8, "layer": None, "bottleneck": 64, "slot": "pre"})
  num_tokens = _positive_int("tokenlearner", "tokens", args["tokens"])
  bottleneck = _positive_int("tokenlearner", "bottleneck", args["bottleneck"])
  layer = args["layer"]
  if layer is None:
    layer = depth * 3 // 4
  if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < depth:
    raise ValueError(f"tokenlearner layer={layer!r}: must be one block index in [0, {depth}) for depth={depth} "
                     f"(TokenLearner is inserted once)")
  if args["slot"] not in SLOTS:
    raise ValueError(f"tokenlearner slot={args['slot']!r}: must be one of {SLOTS}")
  step = schedules.Step("tokenlearner", Config(num_tokens, bottleneck), slot=args["slot"])
  return tuple(step if i == layer else None for i in range(depth))


def resolve(config: Config, n: int, protected: int) -> Config:
  if not 1 <= config.num_tokens <= n - protected:
    raise ValueError(f"tokenlearner tokens={config.num_tokens}: must be in [1, {n - protected}] (the patches "
                     f"entering the block)")
  return config


def out_count(config: Config, n: int, protected: int) -> int:
  return protected + config.num_tokens


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
    scores = TokenMasking(c.bottleneck, c.num_tokens, name="token_masking")(
        nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(tokens.x[:, p:]))  # [B, N-p, S]
    return aggregate_reducible(tokens, scores)[0]  # softmax over the patches, weighted sums, index/size


reducers.register(reducers.Method(
    name="tokenlearner", reduce=None, module=TokenLearner, signals=(), build=build, out_count=out_count,
    resolve=resolve, example="tokenlearner:tokens=7,layer=1",
    # the scoring MLP D -> bottleneck -> S per patch, then the S weighted sums
    flops=lambda c, n, p, d: 2.0 * (n - p) * c.bottleneck * (d + c.num_tokens)
    + aggregate_flops(n - p, c.num_tokens, d)))

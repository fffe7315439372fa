"""TokenFuser: maps S learned tokens back to the N positions after a block (Ryoo et al., NeurIPS 2021,
arXiv:2106.11297 v2, §2, and the reference's `TokenFuser`). A linen building block, not a registered reducer.

With Y [S, C] the block's output on the S learned tokens and X [N, C] the block's input (before TokenLearner):
  Y' = LN2( (LN1(Y)ᵀ W_mix)ᵀ )                       W_mix [S, S]: mixes the tokens, per channel
  B  = sigmoid( MLP(LN(X)) )                         MLP: C -> bottleneck -> S, tanh-GELU between     B [N, S]
  out_n = Σ_s B[n, s] Y'_s                           [N, C]; the reference's encoder then adds X (a residual)
`use_normalization=False` drops LN1 and LN2 (the reference's switch, for v1's sum pooling).
Parameters: named as the reference's (`fuser_mix_norm1`, `Dense_0`, `fuser_mix_norm2`, `LayerNorm_0`,
`token_masking/Dense_0`, `token_masking/Dense_1`), so its weights drop in.
Parity: tests/goldens/tokenlearner_fuser_*.npz (tools/goldens/make_tokenlearner.py), scenic's `TokenFuser` on
the same weights, google-research/scenic @ 4a38d47. Dropout (the reference's rate, the identity at inference) is
left out as in tokenlearner.py.

Wired in as the registered method `tokenfuser` (the reference's `EncoderModFuser`): in every block from `layer`
on, a TokenLearner (its own parameters per block) turns the block's input into S tokens, the block runs on the
prefix + S tokens, and TokenFuser maps its output back: patches' = X + TokenFuser(Y, X), the prefix as the
block left it. The sequence is N long again between blocks. Slot "wrap" (tokcomp/models/vit.py): the block's
attention and MLP run at P + S, what follows the block sees N.
Config: "tokenfuser:tokens=8,layer=3[,bottleneck=64,norm=True]".
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import dataclasses

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.aggregate import aggregate_flops
from tokcomp.reducers import tokenlearner
from tokcomp.reducers.tokenlearner import TokenMasking
from tokcomp.tokens import Tokens


class TokenFuser(nn.Module):
  """(learned [B, S, C], original [B, N, C]) -> fused [B, N, C], without the residual. See the docstring."""
  bottleneck: int = 64
  use_normalization: bool = True

  @nn.compact
  def __call__(self, learned: jax.Array, original: jax.Array) -> jax.Array:
    if learned.ndim != 3 or original.ndim != 3 or learned.shape[::2] != original.shape[::2]:
      raise ValueError(f"TokenFuser: learned {learned.shape} and original {original.shape} must be [B, S, C] "
                       f"and [B, N, C] with the same B and C")
    num_tokens = learned.shape[1]
    y = learned
    if self.use_normalization:
      y = nn.LayerNorm(epsilon=1e-6, name="fuser_mix_norm1")(y)
    y = jnp.swapaxes(nn.Dense(num_tokens, kernel_init=nn.initializers.zeros, name="Dense_0")(jnp.swapaxes(y, 1, 2)),
                     1, 2)  # mixes the S tokens per channel
    if self.use_normalization:
      y = nn.LayerNorm(epsilon=1e-6, name="fuser_mix_norm2")(y)
    gate = nn.sigmoid(TokenMasking(self.bottleneck, num_tokens, name="token_masking")(
        nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(original)))  # [B, N, S]
    return jnp.einsum("bns,bsc->bnc", gate, y)


@dataclasses.dataclass(frozen=True)
class Config:
  num_tokens: int = 8
  bottleneck: int = 64
  use_normalization: bool = True


class LearnerFuser(nn.Module):
  """One "wrap" step: `__call__` learns the S tokens before the block, `fuse` maps the block's output back."""
  config: Config

  def setup(self):
    c = self.config
    self.learner = tokenlearner.TokenLearner(tokenlearner.Config(c.num_tokens, c.bottleneck))
    self.fuser = TokenFuser(c.bottleneck, c.use_normalization)

  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    return self.learner(tokens, signals, train=train)

  def fuse(self, out: Tokens, original: Tokens) -> Tokens:
    """The block's output on the learned tokens -> the original slots: X + TokenFuser(Y, X) on the patches."""
    p = original.num_protected
    patches = original.x[:, p:] + self.fuser(out.x[:, p:], original.x[:, p:]).astype(original.x.dtype)
    return original.replace(x=jnp.concatenate([out.x[:, :p], patches], axis=1))


def build(args, depth):
  args = reducers.check_args("tokenfuser", args, {"tokens": 8, "layer": None, "bottleneck": 64, "norm": True})
  learner = tokenlearner.build({"tokens": args["tokens"], "layer": args["layer"], "bottleneck": args["bottleneck"]},
                               depth)
  first = next(i for i, st in enumerate(learner) if st is not None)
  if not isinstance(args["norm"], bool):
    raise ValueError(f"tokenfuser norm={args['norm']!r}: must be True or False")
  config = Config(learner[first].config.num_tokens, learner[first].config.bottleneck, args["norm"])
  return tuple(schedules.Step("tokenfuser", config, slot="wrap") if i >= first else None for i in range(depth))


def resolve(config: Config, n: int, protected: int) -> Config:
  tokenlearner.resolve(tokenlearner.Config(config.num_tokens, config.bottleneck), n, protected)
  return config


def flops(c: Config, n: int, p: int, d: int) -> float:
  """The learner's, plus the fuser's: the S x S mix per channel, the gate MLP per patch, the N weighted sums."""
  learner = tokenlearner.Config(c.num_tokens, c.bottleneck)
  s = c.num_tokens
  return (reducers.get("tokenlearner").flops(learner, n, p, d) + 2.0 * s * s * d
          + 2.0 * (n - p) * c.bottleneck * (d + s) + aggregate_flops(s, n - p, d))


reducers.register(reducers.Method(
    name="tokenfuser", reduce=None, module=LearnerFuser, signals=(), build=build,
    out_count=lambda c, n, p: p + c.num_tokens,  # inside the block; after it the sequence is N again ("wrap")
    resolve=resolve, flops=flops, example="tokenfuser:tokens=7,layer=2"))

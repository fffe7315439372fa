"""PatchMerger: M learned queries merge the tokens between two blocks (Renggli, Pinto, Houlsby, Mustafa,
Puigcerver, Riquelme, "Learning to Merge Tokens in Vision Transformers", arXiv:2202.12015, 2022, §3).

With X [N, D] the reducible tokens entering block `layer` and W [D, M] learned (one query per output token):
  Y = softmax(Wᵀ LN(X)ᵀ) X        the softmax runs over the N tokens, separately for each of the M outputs
so every output token is a convex combination of the inputs: scores [M, N] = W_mᵀ LN(x_n), output M tokens.
Count: P + N -> P + M (P: the protected prefix); M in [1, N], else ValueError. Once, before block `layer`.
Prefix: the paper's ViTs have no CLS token (global average pooling over the M outputs, `ViT(pool="gap")`);
  with a prefix (CLS, distillation, registers) we keep it first and unchanged, and it takes no part in the
  merge (neither a query's input nor an output), so a CLS-pooled model still reads its own CLS token.
Order: prefix, then the M merged tokens in query order.
index/size: the new tokens are not a subset or merge of the old ones; `index` sends each original token to
  the output its slot contributes to most (argmax over m of the softmax weights), `size` counts the original
  tokens so assigned (may be 0; mask stays true). See `tokcomp/ops/aggregate.py`.
Training: the merge is differentiable as is, so training runs the same static-count path as inference.
Config: "patchmerger:tokens=8,layer=2"
  tokens  M, the number of output tokens (the paper's default is 8)
  layer   merge after `layer` blocks, i.e. before block `layer` (0-based, the "pre" slot), in [0, depth);
          default depth // 2 (the paper puts it about halfway)
Parameters: `norm` (LayerNorm, eps 1e-6 like the ViT's own) and `queries` (Dense D -> M, no bias: W).
Parity: no official code is public; tests/test_patchmerger.py checks the map against a loop-based NumPy
  reference of the equation above (1e-5).
Deliberate choices where the paper's equation is silent: scores are taken on LN(X) (a pre-LN ViT's residual
  stream has no fixed scale; the unofficial lucidrains/vit-pytorch module does the same) while the outputs
  combine the raw X, as Y = softmax(.) X says, so the residual stream keeps its scale; no 1/sqrt(D) factor
  on the scores (the equation has none; W learns any scale). lucidrains' module differs on both counts (it
  scales by D^-1/2 and outputs combinations of LN(X)).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.aggregate import aggregate_flops, aggregate_reducible
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class Config:
  tokens: int  # M: output tokens (besides the protected prefix)


def check_tokens(tokens) -> int:
  if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
    raise ValueError(f"patchmerger tokens={tokens!r}: must be an int >= 1 (the number of merged output tokens)")
  return tokens


def build(args, depth):
  args = reducers.check_args("patchmerger", args, {"tokens": 8, "layer": None})
  m = check_tokens(args["tokens"])
  layer = args["layer"]
  if layer is None:
    layer = depth // 2
  if isinstance(layer, bool) or not isinstance(layer, int):
    raise ValueError(f"patchmerger layer={layer!r}: must be one block index in [0, {depth}) (the method merges once)")
  (layer,) = schedules.parse_layers(layer, depth, "patchmerger layer")
  return tuple(schedules.Step("patchmerger", Config(m), slot="pre") if i == layer else None for i in range(depth))


def resolve(config: Config, n: int, protected: int) -> Config:
  check_tokens(config.tokens)
  if config.tokens > n - protected:
    raise ValueError(f"patchmerger tokens={config.tokens}: must be in [1, {n - protected}] (the tokens entering "
                     f"the merge, besides {protected} protected)")
  return config


def out_count(config: Config, n: int, protected: int) -> int:
  return protected + config.tokens


class PatchMerger(nn.Module):
  """One merge: reducer signature (tokens, signals, *, train) -> tokens. See the module docstring."""
  config: Config

  @nn.compact
  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    del signals, train  # the same differentiable map in both passes
    m, p = self.config.tokens, tokens.num_protected
    if not 1 <= m <= tokens.num_reducible:
      raise ValueError(f"patchmerger tokens={m}: must be in [1, {tokens.num_reducible}] (the reducible tokens)")
    x = tokens.x[:, p:]
    scores = nn.Dense(m, use_bias=False, name="queries")(nn.LayerNorm(epsilon=1e-6, name="norm")(x))  # [B, N, M]
    return aggregate_reducible(tokens, scores.astype(jnp.float32))[0]


reducers.register(reducers.Method(
    name="patchmerger", reduce=None, module=PatchMerger, signals=(), build=build, out_count=out_count,
    resolve=resolve, example="patchmerger:tokens=7,layer=1",
    # scores M·D per patch, then the M weighted sums
    flops=lambda c, n, p, d: 2.0 * (n - p) * c.tokens * d + aggregate_flops(n - p, c.tokens, d)))

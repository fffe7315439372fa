"""DynamicViT: a learned keep/drop predictor before chosen blocks (Rao et al., NeurIPS 2021, arXiv:2106.02034).

Prediction module (§3.2, eqs. 3-5), on the patch tokens x with the previous decision D (1 = kept):
  z = GELU(W_in LN(x));  z_local = z[:, :C/2];  z_global = Σ_n D_n z_n[C/2:] / Σ_n D_n
  π = log_softmax(MLP([z_local, z_global]))       MLP: C -> C/2 -> C/4 -> 2, GELU between   [B, N, 2]
Training (eqs. 6-11) keeps the full length: D' = gumbel_softmax_hard(π)[..., keep] * D becomes the tokens'
policy, which attention applies through `softmax_with_policy` (a dropped token no longer attends or is
attended to, but it still flows through the MLPs). The ratio loss (eq. 14) is sown into the "losses"
collection: ratio_weight / S * mean_b (mean_n D'_n - ρ^s)^2 for stage s of S. The distillation terms of
eqs. 12-13 (logits KL and kept-token MSE against the dense teacher) are train.py's (`config.distill`).
Inference: the k = int(N0 ρ^s) patches with the largest keep log-probability π[..., 0] (N0: the model's initial
patch count, as the reference's `int(init_n * token_ratio)`), prefix first; stages s = 1..S at `layers`.
Slot: "pre" (the predictor runs on the block's input, before its attention).
Order: kept tokens in ascending slot order (the reference keeps them by descending score: later blocks are
       permutation-equivariant and the head reads CLS, so logits agree).
Parity: tests/goldens/dynamicvit_*.npz (tools/goldens/make_dynamicvit.py, raoyongming/DynamicViT @ 1322e62),
        the inference path and the training path with the reference's gumbel draw.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops import select
from tokcomp.reducers import staged
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class Config(staged.StagedConfig):
  method: ClassVar[str] = "dynamicvit"
  ratio_weight: float = 2.0  # the reference's --ratio_weight default for DeiT


def build(args, depth):
  args = reducers.check_args("dynamicvit", args, {"keep": None, "layers": None, "ratio_weight": 2.0})
  rho = staged.check_rate("dynamicvit", args["keep"])
  layers = args["layers"]
  if layers is None:  # the paper's 3-6-9 of 12, scaled to the depth
    layers = sorted({max(1, depth * s // 4) for s in (1, 2, 3)} & set(range(depth)))
  w = args["ratio_weight"]
  if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
    raise ValueError(f"dynamicvit ratio_weight={w!r}: must be a number >= 0")
  return staged.build(Config, rho, layers, depth, ratio_weight=float(w))


class Predictor(nn.Module):
  """The local-global prediction MLP (PredictorLG): x [B, N, C], decision [B, N] -> log-probs [B, N, 2]."""

  @nn.compact
  def __call__(self, x: jax.Array, decision: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c < 4:
      raise ValueError(f"dynamicvit: width {c} is too small for the predictor (C -> C/2 -> C/4 -> 2); need >= 4")
    gelu = lambda t: nn.gelu(t, approximate=False)
    z = gelu(nn.Dense(c, name="in_dense")(nn.LayerNorm(epsilon=1e-5, name="in_norm")(x)))  # torch LN default eps
    d = decision.astype(z.dtype)[..., None]
    half = c // 2
    glob = jnp.sum(z[..., half:] * d, axis=1, keepdims=True) / jnp.sum(d, axis=1, keepdims=True)
    z = jnp.concatenate([z[..., :half], jnp.broadcast_to(glob, z[..., half:].shape)], axis=-1)
    z = gelu(nn.Dense(c // 2, name="out_dense_0")(z))
    z = gelu(nn.Dense(c // 4, name="out_dense_1")(z))
    return jax.nn.log_softmax(nn.Dense(2, name="out_dense_2")(z).astype(jnp.float32), axis=-1)


class DynamicViT(nn.Module):
  """One pruning stage: reducer signature (tokens, signals, *, train) -> tokens. See the module docstring."""
  config: Config

  @nn.compact
  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    c, p = self.config, tokens.num_protected
    prev = tokens.keep_weight()[:, p:]  # the previous decision; all ones for the kept tokens at inference
    log_probs = Predictor(name="predictor")(tokens.x[:, p:], prev)
    if not train:
      score = jnp.pad(log_probs[..., 0], ((0, 0), (p, 0)))
      idx, _ = select.topk_reducible(tokens, score, c.kept())
      return tokens.gather(select.keep_with_prefix(tokens, idx))
    if tokens.n - p != c.num_patches:
      raise ValueError(f"dynamicvit trains at full length: stage {c.stage} got {tokens.n - p} patches, expected "
                       f"all {c.num_patches} (no reducer may shorten the sequence before it in training)")
    decision = select.hard_gumbel_softmax(log_probs, self.make_rng("gumbel"))[..., 0] * prev
    ratio = jnp.mean((jnp.mean(decision, axis=1) - c.keep) ** 2)
    self.sow("losses", "ratio", c.ratio_weight / c.num_stages * ratio)
    policy = jnp.concatenate([jnp.ones((tokens.batch, p), decision.dtype), decision], axis=1)
    return tokens.replace(policy=policy)


def predictor_flops(config: Config, n: int, protected: int, width: int) -> float:
  """The predictor's FLOPs on the n - P patches it scores (2 per multiply-add): C², C²/2, C²/8 and C/2 per token."""
  c = width
  return 2.0 * (n - protected) * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)


reducers.register(reducers.Method(
    name="dynamicvit", reduce=None, module=DynamicViT, signals=(), build=build, out_count=staged.out_count,
    resolve=staged.resolve, bind=staged.bind, flops=predictor_flops, example="dynamicvit:keep=0.7,layers=1-2"))

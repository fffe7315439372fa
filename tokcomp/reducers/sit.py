"""SiT's token slimming module, TSM (Zong, Li, Song, Wang, Qiao, Leng, Liu, "Self-slimmed Vision Transformer",
ECCV 2022, arXiv:2111.12624, §3.1 "Token Slimming Module").

At stage s the N reducible tokens X [N, D] become M_s learned aggregates (the paper's eq. 1-2):
  A = softmax_N( MLP(X) · σ )ᵀ     MLP = LN -> Dense(D -> D/2) -> GELU -> Dense(D/2 -> M_s)    A [M_s, N]
  X' = A X                          each new token is a convex combination of the old ones
σ is one learned scalar (the reference's `scale`, initialised to 1: the inverse of the paper's temperature τ).
Count: stage s of S keeps M_s = int(N0 · keep^s) tokens (N0: the model's initial patch count, as the
  reference's `keeped_patches = int(num_patches * keeping_ratio ** i)`); P + N -> P + M_s, with M_s in
  [1, N] at that point, else ValueError.
Placement: one TSM before each block in `layers` (the "pre" slot; the reference slims after block i when
  i + 1 is in `slim_index`, the running sums of `stage_blocks`: SiT-S's [9, 3, 2, 2] of 16 blocks slims before
  blocks 9, 12 and 14, SiT-T/XS's [1, 1, 1, 11] before 1, 2 and 3).
Prefix: CLS (and distillation / register tokens) stay first and unchanged; the TSM sees the rest only, as
  the reference's `tokens = x[:, 1:]` (or `x[:, 2:]` with its distillation token).
Order: prefix, then the M_s new tokens in the order of the MLP's outputs.
index/size: the new tokens are not a subset or merge of the old ones; `index` sends each original token to
  the new token its slot contributes to most (argmax over m of A[m, n]), `size` counts the original tokens
  so assigned (may be 0; mask stays true). See `tokcomp/ops/aggregate.py`.
Training: the slimming is differentiable, so training runs the same static-count path as inference.
Config: "sit:keep=0.5,layers=9-12-14"
  keep    the per-stage keep ratio in (0, 1] (the reference's keeping_ratio, 0.5 for every released model)
  layers  blocks before which a TSM runs; default SiT-S's 9-12-14 of 16 scaled to the depth
  hidden  the MLP's hidden width as a fraction of D (the reference's `ratio`, 0.5)
Parameters: `norm` (LayerNorm, eps 1e-5, torch's default), `hidden`, `out` (Dense, truncated-normal std
  0.02 and zero bias, as the reference's init), `scale` (σ, 1).
Parity: tests/goldens/sit_*.npz (tools/goldens/make_sit.py, Sense-X/SiT @ f577808, models/lvvit.py
  `TokenSlimmingModule` on the same weights), plus a loop-based NumPy reference of the map in
  tests/test_sit.py.
Deliberate differences from the reference: its training adds the FRD objective (a ReverseTSM that maps the
  slimmed tokens back to all N0 for a per-layer token distillation from the dense teacher, plus logits
  distillation); we train with the ordinary objective plus train.py's logits distillation only (token
  distillation needs full-length outputs). The reference's LV-ViT backbone (conv stem, skip_lam, token
  labelling) is not part of the method; the TSM runs in our plain ViT. Masked (invalid) slots from an
  earlier reducer get zero weight, which the reference never meets.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops.aggregate import aggregate_flops, aggregate_reducible
from tokcomp.reducers import staged
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class Config(staged.StagedConfig):
  method: ClassVar[str] = "sit"
  hidden: float = 0.5  # MLP hidden width / D


def default_layers(depth: int) -> list[int]:
  """SiT-S's slimming points, before blocks 9, 12 and 14 of 16, scaled to `depth`."""
  return sorted({depth * b // 16 for b in (9, 12, 14)} - {0})


def build(args, depth):
  args = reducers.check_args("sit", args, {"keep": 0.5, "layers": None, "hidden": 0.5})
  keep = staged.check_rate("sit", args["keep"])
  hidden = args["hidden"]
  if isinstance(hidden, bool) or not isinstance(hidden, (int, float)) or not 0.0 < hidden <= 4.0:
    raise ValueError(f"sit hidden={hidden!r}: must be the MLP's hidden width as a fraction of D, in (0, 4]")
  layers = default_layers(depth) if args["layers"] is None else args["layers"]
  return staged.build(Config, keep, layers, depth, hidden=float(hidden))


class TokenSlimming(nn.Module):
  """One TSM: reducer signature (tokens, signals, *, train) -> tokens. See the module docstring."""
  config: Config

  @nn.compact
  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    del signals, train  # the same differentiable map in both passes
    c, p = self.config, tokens.num_protected
    m, d = c.kept(), tokens.x.shape[-1]
    width = int(d * c.hidden)
    if not 1 <= m <= tokens.num_reducible or width < 1:
      raise ValueError(f"sit stage {c.stage}: {m} output tokens must be in [1, {tokens.num_reducible}] and the "
                       f"hidden width int({d} * {c.hidden}) = {width} must be >= 1")
    dense = lambda k, name: nn.Dense(k, kernel_init=nn.initializers.truncated_normal(0.02),
                                     bias_init=nn.initializers.zeros, name=name)
    h = nn.LayerNorm(epsilon=1e-5, name="norm")(tokens.x[:, p:])
    logits = dense(m, "out")(nn.gelu(dense(width, "hidden")(h), approximate=False))  # [B, N, M]
    scale = self.param("scale", nn.initializers.ones, ())
    return aggregate_reducible(tokens, logits.astype(jnp.float32) * scale)[0]


reducers.register(reducers.Method(
    name="sit", reduce=None, module=TokenSlimming, signals=(), build=build, out_count=staged.out_count,
    resolve=staged.resolve, bind=staged.bind, example="sit:keep=0.6,layers=1-2",
    # the TSM MLP D -> hD -> M per token, then the M weighted sums
    flops=lambda c, n, p, d: 2.0 * (n - p) * int(c.hidden * d) * (d + c.kept())
    + aggregate_flops(n - p, c.kept(), d)))

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
FRD (§3.2, Feature Recalibration Distillation; opt-in, frd=1): after every block i the patch tokens X_i
  [M_i, D] (after the TSM that follows block i, if any) are mapped back to all N0 patches by a reverse TSM,
    R_i(X) = Y + MLP₂(LN₂(Y)),   Y = MLP₁(LN₁(X)ᵀ)ᵀ     MLP₁: M_i -> 4 N0 -> N0 across the token axis,
                                                        MLP₂: D -> 4 D -> D; exact GELU; LN eps 1e-5
  (the reference's `ReverseTSM`; the identity while nothing is dropped yet, M_i = N0), and the student learns
    loss = CE + λ_token · (1/depth) Σ_i MSE(R_i(X_i), T_i) + λ_logits · KL(teacher ‖ student)
  with T_i the frozen dense teacher's patch tokens after block i, MSE the mean over B·N0·D (the reference's
  `DistillationLoss` "frd" at tau = 1). Here the TSM module is that step: with frd=1 the schedule has one step
  in the "post" slot of EVERY block i (the TSM of block i + 1's pre slot moves there: nothing runs between the
  two, so the forward and its counts and FLOPs are unchanged), which in training (train=True) runs R_i and
  sows R_i(X_i) [B, N0, D] into the "distill" collection ("tokens"); init creates R_i's parameters; inference
  runs no R_i and sows nothing. train.py takes the sown tokens, the teacher's block outputs
  (`train.teacher_forward`, flax's capture_intermediates) and `config.distill.frd` (= λ_token, the reference
  scripts' 2.0) into `train.frd_loss`; `config.distill.logits` is λ_logits (train.py's KL, as DynamicViT's).
Config: "sit:keep=0.5,layers=9-12-14" or, with FRD, "sit:keep=0.5,layers=2-3-4,frd=1" plus
  `config.distill = dict(teacher="init", logits=2.0, tokens=0.0, frd=2.0)` (SiT's λs; tokens=0: the final
  tokens are slimmed)
  keep    the per-stage keep ratio in (0, 1] (the reference's keeping_ratio, 0.5 for every released model)
  layers  blocks before which a TSM runs; default SiT-S's 9-12-14 of 16 scaled to the depth (frd=1: >= 1)
  hidden  the MLP's hidden width as a fraction of D (the reference's `ratio`, 0.5)
  frd     0 (default: exactly the pre-slot TSMs above) or 1 (FRD's reverse TSMs in training, as above)
Parameters: `norm` (LayerNorm, eps 1e-5, torch's default), `hidden`, `out` (Dense, truncated-normal std
  0.02 and zero bias, as the reference's init), `scale` (σ, 1); with frd=1 also `rtsm/{norm1, mlp1/{fc1,fc2},
  norm2, mlp2/{fc1,fc2}}` (the reference's `rtsm.<i>.*` names), and the TSM of block l's pre slot lives under
  `encoderblock_{l-1}/sit` (its post slot): an frd=1 checkpoint is evaluated with the same frd=1 spec (the
  reverse TSMs are then idle parameters), not with the plain one.
FLOPs (`Method.flops`): the TSM MLP and the weighted sums at inference; the reverse TSMs are training-only and
  not counted.
Parity: tests/goldens/sit_*.npz (tools/goldens/make_sit.py, Sense-X/SiT @ f577808, models/lvvit.py
  `TokenSlimmingModule` on the same weights), plus a loop-based NumPy reference of the map in
  tests/test_sit.py. FRD: tests/goldens/sit_frd_*.npz (tools/goldens/make_sit_frd.py, the same commit: LVViT
  with distillation_type="frd" in train mode, its dense teacher and losses.py's `DistillationLoss`): student
  logits, every block's reverse-mapped tokens, the teacher's block tokens and the token / logits / CE terms.
Deliberate differences from the reference: The reference's LV-ViT backbone (conv stem, skip_lam, token
  labelling) is not part of the method; the TSM runs in our plain ViT. Masked (invalid) slots from an
  earlier reducer get zero weight (TSM) or enter the reverse TSM as zeros, which the reference never meets.
  FRD: the reverse TSM's LayerNorms use the two-pass variance (torch's), not flax's default E[x²] - E[x]²,
  which was 1.6e-5 off the reference at XLA -O0; the reference's hard distillation from an extra CNN teacher
  through a distillation token (`conv_distillation`, `loss_cnn`) and its temperature tau (1 in its scripts)
  are not implemented; FRD runs with sit alone (every block holds one of its steps).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops.aggregate import aggregate_flops, aggregate_reducible
from tokcomp.reducers import staged
from tokcomp.tokens import Tokens


FRD_COLLECTION = "distill"  # where a training pass sows each block's tokens, mapped back to all N0 patches
FRD_KEY = "tokens"
REVERSE_RATIO = 4.0  # the reference's ReverseTSM `ratio` (its default; LVViT never passes another)


@dataclasses.dataclass(frozen=True)
class Config(staged.StagedConfig):
  method: ClassVar[str] = "sit"
  hidden: float = 0.5  # MLP hidden width / D
  frd: bool = False    # FRD: the reverse TSM of every block sows its full-length tokens in training
  slim: bool = True    # False: an FRD step after a block without a TSM (stage = the stages done so far)


def default_layers(depth: int) -> list[int]:
  """SiT-S's slimming points, before blocks 9, 12 and 14 of 16, scaled to `depth`."""
  return sorted({depth * b // 16 for b in (9, 12, 14)} - {0})


def build(args, depth):
  args = reducers.check_args("sit", args, {"keep": 0.5, "layers": None, "hidden": 0.5, "frd": 0})
  keep = staged.check_rate("sit", args["keep"])
  hidden = args["hidden"]
  if isinstance(hidden, bool) or not isinstance(hidden, (int, float)) or not 0.0 < hidden <= 4.0:
    raise ValueError(f"sit hidden={hidden!r}: must be the MLP's hidden width as a fraction of D, in (0, 4]")
  if args["frd"] not in (0, 1):
    raise ValueError(f"sit frd={args['frd']!r}: must be 0 (plain TSMs) or 1 (FRD: reverse TSMs in training)")
  layers = default_layers(depth) if args["layers"] is None else args["layers"]
  steps = staged.build(Config, keep, layers, depth, hidden=float(hidden))
  return frd_schedule(steps) if args["frd"] else steps


def frd_schedule(steps):
  """FRD (§3.2) needs every block's output: one "post" step after each block i, slimming when block i + 1 had
  the TSM (the same map at the same point: nothing runs between a block's post slot and the next one's pre)."""
  depth = len(steps)
  if steps[0] is not None:
    raise ValueError("sit frd=1: layers entry 0 would slim before the first block; FRD, as the reference, slims "
                     "after a block: choose layers in [1, depth)")
  first = next(step.config for step in steps if step is not None)
  out, stage = [], 0
  for i in range(depth):
    nxt = steps[i + 1] if i + 1 < depth else None
    if nxt is not None:  # the TSM that ran before block i + 1, now after block i, then its reverse TSM
      stage = nxt.config.stage
      config = dataclasses.replace(nxt.config, frd=True)
    else:  # the reverse TSM only (the identity before the first stage), at the patches `stage` stages leave
      config = dataclasses.replace(first, stage=stage, frd=True, slim=False)
    out.append(schedules.Step("sit", config, slot="post"))
  return tuple(out)


def resolve(config: Config, n: int, protected: int) -> Config:
  if config.slim:
    return staged.resolve(config, n, protected)
  if config.kept() != n - protected:  # the reverse TSM's first MLP maps exactly this many tokens
    raise ValueError(f"sit frd=1: the reverse TSM after stage {config.stage} expects {config.kept()} patches but "
                     f"{n - protected} enter (another reducer in the schedule?): FRD runs with sit alone")
  return config


def out_count(config: Config, n: int, protected: int) -> int:
  return staged.out_count(config, n, protected) if config.slim else n


def flops(config: Config, n: int, protected: int, width: int) -> float:
  """Inference FLOPs: the TSM MLP D -> hD -> M per token, then the M weighted sums; the reverse TSMs run in
  training only and are not counted."""
  if not config.slim:
    return 0.0
  return 2.0 * (n - protected) * int(config.hidden * width) * (width + config.kept()) + aggregate_flops(
      n - protected, config.kept(), width)


def _dense(features: int, name: str) -> nn.Dense:
  """The reference's Linear init (truncated normal std 0.02, zero bias)."""
  return nn.Dense(features, kernel_init=nn.initializers.truncated_normal(0.02), bias_init=nn.initializers.zeros,
                  name=name)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2 (the reference's `Mlp` at dropout 0), over the last axis."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, x):
    return _dense(self.out, "fc2")(nn.gelu(_dense(self.hidden, "fc1")(x), approximate=False))


class ReverseTSM(nn.Module):
  """[B, M, D] -> [B, N0, D] (the reference's `ReverseTSM`, §3.2): LN, an MLP across the token axis
  M -> 4 N0 -> N0, then a residual MLP D -> 4 D -> D on LN of the result. Masked slots enter as zeros."""
  num_patches: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    d = x.shape[-1]
    # Two-pass variance, as torch's LayerNorm: flax's default E[x²] - E[x]² loses digits on mlp1's output
    # (measured: 1.6e-5 off the reference at XLA -O0 in tests/test_sit.py, 3e-6 with this).
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)
    h = norm("norm1")(x) * valid[..., None]
    h = Mlp(int(self.num_patches * REVERSE_RATIO), self.num_patches, name="mlp1")(jnp.swapaxes(h, 1, 2))
    h = jnp.swapaxes(h, 1, 2)  # [B, N0, D]
    return h + Mlp(int(d * REVERSE_RATIO), d, name="mlp2")(norm("norm2")(h))


class TokenSlimming(nn.Module):
  """One TSM (and, with frd, the reverse TSM after it): reducer signature (tokens, signals, *, train) -> tokens.
  See the module docstring."""
  config: Config

  @nn.compact
  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    del signals  # the same differentiable map in both passes
    c, p = self.config, tokens.num_protected
    if c.slim:
      m, d = c.kept(), tokens.x.shape[-1]
      width = int(d * c.hidden)
      if not 1 <= m <= tokens.num_reducible or width < 1:
        raise ValueError(f"sit stage {c.stage}: {m} output tokens must be in [1, {tokens.num_reducible}] and the "
                         f"hidden width int({d} * {c.hidden}) = {width} must be >= 1")
      h = nn.LayerNorm(epsilon=1e-5, name="norm")(tokens.x[:, p:])
      logits = _dense(m, "out")(nn.gelu(_dense(width, "hidden")(h), approximate=False))  # [B, N, M]
      scale = self.param("scale", nn.initializers.ones, ())
      tokens = aggregate_reducible(tokens, logits.astype(jnp.float32) * scale)[0]
    if c.frd and (train or self.is_initializing()):  # init creates the reverse TSM's parameters too
      if tokens.num_reducible < c.num_patches:
        full = ReverseTSM(c.num_patches, name="rtsm")(tokens.x[:, p:], tokens.mask[:, p:])
      else:  # nothing dropped yet: the reference's identity
        full = tokens.x[:, p:]
      if train:
        self.sow(FRD_COLLECTION, FRD_KEY, full)
    return tokens


reducers.register(reducers.Method(
    name="sit", reduce=None, module=TokenSlimming, signals=(), build=build, out_count=out_count,
    resolve=resolve, bind=staged.bind, example="sit:keep=0.6,layers=1-2", flops=flops))

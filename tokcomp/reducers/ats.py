"""ATS: adaptive token sampling (Fayyaz et al., ECCV 2022, arXiv:2111.15667, §3; "ats").

Significance (as the official code computes it, `score_assignment_step`): for every reducible token j,
  S_j = (Σ_h A_h[0, j]) · ||v_j||  /  Σ_i (Σ_h A_h[0, i]) · ||v_i||,
with A_h[0, ·] the CLS row of head h's softmax and ||v_j|| the L2 norm of token j's whole value vector (all heads
concatenated: ||v_j||² = Σ_h ||v_{h,j}||², from `Signals.value_norm`). Heads are summed before multiplying by
the value norm. Invalid slots score 0.
Sampling (`tokcomp.ops.sample.inverse_transform_sample`): sort S ascending, c = cumsum, min-max normalise c
to [0, 1], place `samples` evenly spaced points from the smallest positive c to 1, each picks the token whose c
is nearest (first on a tie); a token picked more than once counts once. The picked tokens' rows are the
block's attention output rows: each row of `attn @ v` depends only on its own query, so gathering after the
attention residual (the "mid" slot) gives exactly the reference's sampled-rows output.

Counts (static capacity + mask): `samples` = ceil(keep · (N - P)) or tokens - P points; the slot count goes
  N -> P + samples, and at most `samples` reducible slots are valid (data-dependent, per image). The realised
  (static) FLOPs saving is from samples < N - P; the adaptive saving shows as `effective_count` (valid slots,
  `tokens.mask.sum(1)`), and `effective_flops` prices a whole forward at each image's valid counts.
Config: "ats" (reference plug-and-play setting: keep=1 at blocks 3..depth-1, i.e. K = N as the official
  DeiT-S config NUM_TOKENS=197), "ats:keep=0.7,layers=3-6-9" (samples = ceil(0.7 (N - P)) of the count entering
  each listed block), "ats:tokens=150,layers=3-6-9" or "ats:tokens=[197,150,120],layers=3-6-9" (the paper's /
  reference's per-stage K, prefix included: samples = K - P, K in [P + 1, N]). keep and tokens are exclusive.
Order: prefix, then the picked tokens in ascending slot order (the reference emits them by ascending
  significance, then its invalid slots; a set, so logits agree), then invalid slots (mask false).
Parity: tests/goldens/ats_*.npz (tools/goldens/make_ats.py, adaptivetokensampling/ATS @ 9271257), logits and
  per-block valid rows at 1e-5, and the alive token sets after every ATS block.

Deliberate differences from the reference:
  * Counts: the official `AdaptiveTokenSampler` only runs with K >= N (a smaller NUM_TOKENS fails a tensor
    expand) and always places n_ref - 1 points (n_ref = the initial token count). We place `samples` points and
    cut the capacity to P + samples, which is the paper's K - 1 samples for K output tokens and loses no pick.
    With keep=1 (tokens=N) at blocks that still have all N0 slots, the two coincide (the goldens).
  * Masking: the reference keeps invalid slots with zeroed features and a softened masked softmax
    (`softmax_with_policy`, eps 1e-6 added to every key); we mask them exactly. The leak is ~1e-6 relative.
  * drop_tokens=True in the reference trims every image to the batch's largest valid count, which makes the
    min-max CDF (whether an image has any invalid slot) depend on the batch; we follow drop_tokens=False (the
    reference default): per-image, static capacity.
  * More protected tokens (distillation, registers) are never sampled and are left out of the normalisation
    (the reference only knows CLS). Token 0 must be the CLS token: its attention row is the score.
  * samples = 1 places its one point at 1 (the top token); the reference divides 0 by 0 there. With exactly two
    reducible slots the reference's duplicate filter (`get_unique_indices` pads with the value 1) drops the one
    picked token; we keep it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops import sample
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class ATSConfig:
  keep: float | None = None  # samples = ceil(keep * (N - protected)) of the count entering the block
  tokens: int | None = None  # samples = tokens - protected (the reference's per-stage K, prefix included)


def significance(cls_attn: jax.Array, value_norm: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, N] un-normalised ATS significance: head-summed CLS attention times the full value norm (0 if invalid)."""
  v_norm = jnp.sqrt(jnp.sum(jnp.square(value_norm.astype(jnp.float32)), axis=1))
  return jnp.where(mask, jnp.sum(cls_attn.astype(jnp.float32), axis=1) * v_norm, 0.0)


def num_samples(config: ATSConfig, n: int, protected: int) -> int:
  """Sample points (= static reducible capacity) for a block entered by n slots."""
  if config.tokens is not None:
    return config.tokens - protected
  return schedules.ceil_count(config.keep, n - protected)


def reduce(tokens: Tokens, signals: Signals, *, config: ATSConfig) -> Tokens:
  if signals.cls_attn is None or signals.value_norm is None:
    raise ValueError("ats needs signals.cls_attn and signals.value_norm (the CLS attention row, ||v||)")
  p = tokens.num_protected
  if p < 1:
    raise ValueError("ats needs a CLS token (num_protected >= 1): its attention row is the significance")
  s = num_samples(config, tokens.n, p)
  if not 1 <= s <= tokens.num_reducible:
    raise ValueError(f"ats samples={s}: must be in [1, {tokens.num_reducible}] (N={tokens.n}, protected={p})")
  score = significance(signals.cls_attn, signals.value_norm, tokens.mask)
  picked = sample.inverse_transform_sample(score[:, p:], tokens.mask[:, p:], s)
  valid = jnp.concatenate([jnp.ones((tokens.batch, p), bool), picked], axis=1)
  return tokens.compact(valid, p + s)


# --- config ----------------------------------------------------------------------------------------------

def _check_tokens(tokens: Any, field: str) -> int:
  if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
    raise ValueError(f"ats {field}={tokens!r}: must be an int token count >= 2 (prefix included)")
  return tokens


def _check_keep(keep: Any) -> float:
  if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
    raise ValueError(f"ats keep={keep!r}: must be a rate in (0, 1]")
  return float(keep)


def build(args: dict[str, Any], depth: int) -> schedules.Schedule:
  args = reducers.check_args("ats", args, {"keep": None, "tokens": None, "layers": None})
  keep, tokens, layers = args["keep"], args["tokens"], args["layers"]
  if keep is not None and tokens is not None:
    raise ValueError("ats: give keep (a rate) or tokens (a count per block), not both")
  if layers is None:  # the reference's placement: every block from the fourth on (DeiT-S: 3..11)
    if depth <= 3:
      raise ValueError(f"ats layers: the default 3..depth-1 is empty for depth={depth}; pass layers=...")
    layers = tuple(range(3, depth))
  else:
    layers = schedules.parse_layers(layers, depth, "ats layers")
  if tokens is None:
    configs = [ATSConfig(keep=1.0 if keep is None else _check_keep(keep))] * len(layers)
  elif isinstance(tokens, (list, tuple)):
    if len(tokens) != len(layers):
      raise ValueError(f"ats tokens has {len(tokens)} entries: must have one per block in layers={layers}")
    configs = [ATSConfig(tokens=_check_tokens(t, f"tokens[{i}]")) for i, t in enumerate(tokens)]
  else:
    configs = [ATSConfig(tokens=_check_tokens(tokens, "tokens"))] * len(layers)
  by_layer = dict(zip(layers, configs))
  return tuple(schedules.Step("ats", by_layer[i]) if i in by_layer else None for i in range(depth))


def resolve(config: ATSConfig, n: int, protected: int):
  if n - protected < 1:
    return None  # nothing to sample
  if config.tokens is not None:
    if not protected + 1 <= config.tokens <= n:
      raise ValueError(f"ats tokens={config.tokens}: must be in [{protected + 1}, {n}] (N={n}, "
                       f"protected={protected})")
  else:
    _check_keep(config.keep)
  return config  # never the identity: even samples = N - P drops the tokens no point lands on


def out_count(config: ATSConfig, n: int, protected: int) -> int:
  return protected + num_samples(config, n, protected)


reducers.register(reducers.Method(
    name="ats", reduce=reduce, signals=("cls_attn", "value_norm"), build=build, out_count=out_count,
    resolve=resolve, example="ats:keep=0.7,layers=1"))


# --- effective (valid) token counts ----------------------------------------------------------------------

def effective_count(tokens: Tokens) -> jax.Array:
  """[B] int32: valid slots per image (prefix included) — ATS's adaptive count, beside the static `tokens.n`."""
  return jnp.sum(tokens.mask, axis=1, dtype=jnp.int32)


def effective_layer_counts(model, params, images) -> np.ndarray:
  """[B, depth, 2] per image and block: valid tokens entering attention and entering the MLP.

  Runs the model once with the blocks' outputs captured. A block's MLP count is the valid count it outputs;
  its attention count is the previous block's (a "pre" reducer would change this; ATS runs "mid").
  """
  from tokcomp.models.vit import Encoder1DBlock, unscanned

  model, params = unscanned(model, params)

  def run(p, x):
    _, state = model.apply(p, x, capture_intermediates=lambda mdl, _: isinstance(mdl, Encoder1DBlock))
    blocks = state["intermediates"]["Transformer"]
    return [effective_count(blocks[f"encoderblock_{i}"]["__call__"][0]) for i in range(model.depth)]

  after = np.stack([np.asarray(c) for c in jax.jit(run)(params, images)], axis=1)  # [B, depth]
  gh, gw = model.grid(images.shape[1:3])
  first = np.full((after.shape[0], 1), model.num_prefix + gh * gw, after.dtype)
  return np.stack([np.concatenate([first, after[:, :-1]], axis=1), after], axis=-1)


def effective_flops(model, params, images) -> np.ndarray:
  """[B] forward FLOPs per image at its valid token counts, i.e. what an implementation that drops invalid
  slots would spend (`model.flops` is the static, realised count)."""
  return flops_at_counts(model, effective_layer_counts(model, params, images), images.shape[1:3], images.shape[-1])


def flops_at_counts(model, counts: np.ndarray, image_hw, in_channels: int = 3) -> np.ndarray:
  """[B] `schedules.vit_flops` of each image's per-block (attention, MLP) counts [B, depth, 2]."""
  gh, gw = model.grid(image_hw)
  return np.array([schedules.vit_flops([schedules.LayerCounts(int(a), int(m)) for a, m in per_image],
                                       model.width, model.mlp_dim, tuple(model.patch_size), gh * gw,
                                       model.num_classes, in_channels) for per_image in np.asarray(counts)])

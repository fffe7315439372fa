"""FastV: drop image tokens inside the LLM after layer K by the last token's attention (Chen et al., "An Image is
Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv:2403.06764, §4).

Score of image token j at layer K: a_j = (1/H) Σ_h softmax(q_last k^T / √d)_h[j], the attention row of the last
(text) query at layer K-1, averaged over heads (`PrefillSignals.last_attn`, a one-row product beside the fused
attention). The `keep` best image tokens survive; every non-image token survives; from layer K on the decoder runs
and caches only those S' = S - image_len + keep slots, with their ORIGINAL RoPE positions (the reference's inplace
mode).
Spec: "fastv:k=2,keep=20" (keep a count of image tokens), "fastv:k=2,keep=0.5" (a float: the fraction kept,
keep = round(image_len * keep)) or "fastv:k=2,ratio=0.5" (the fraction DROPPED, keep = round(image_len * (1 -
ratio)) with Python's round, ties to even, as the reference's HF-LLaVA variant; the original 4.31 scripts pass the
count (1 - R) * 576 directly). k >= 1 (the reference's inplace mode asserts K > 0).
Count: image_len -> keep; sequence S -> S - image_len + keep.
Order: ascending slot order (prefix, kept image tokens, suffix), as the reference's sorted keep_indexs.
Parity: tests/goldens/fastv_*.npz (tools/goldens/make_fastv.py, pkunlp-icler/FastV @ d1659729, vendored
transformers 4.31 LlamaModel with use_fast_v, inplace and mask modes), batch 1 per sample.
Differences: the reference ranks batch element 0's attention and applies its choice to the whole batch; here every
example ranks its own row (the reference's per-sample result at batch 1). The reference's "last token" is slot
S-1; here it is each example's last real slot (they agree without padding), and the padding mask survives the
prune (the reference rebuilds a plain causal mask). Ties break by lower index (stable sort; torch's topk is
unspecified on ties). K = 0 (random subset in the reference's mask mode) is not offered.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.ops import span


@dataclasses.dataclass(frozen=True)
class FastVConfig:
  k: int                      # the layer whose input is pruned (ranked by layer k-1's attention)
  keep: int | float | None    # int: image tokens kept; float in (0, 1]: fraction kept
  ratio: float | None = None  # fraction of image tokens dropped (HF variant)

  @property
  def layers(self) -> tuple[int, ...]:
    return (self.k,)

  def count(self, image_len: int) -> int:
    if self.ratio is not None:
      n = round(image_len * (1 - self.ratio))
    elif isinstance(self.keep, float):
      n = round(image_len * self.keep)
    else:
      n = self.keep
    if not 0 <= n <= image_len:
      raise ValueError(f"fastv keep={self.keep}: must be in [0, image_len={image_len}]")
    return n


def parse(args: dict[str, Any]) -> FastVConfig:
  unknown = set(args) - {"k", "keep", "ratio"}
  if unknown:
    raise ValueError(f"fastv: unknown argument(s) {sorted(unknown)}; valid: k, keep, ratio")
  k = args.get("k", 2)
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f"fastv k={k!r}: must be an int >= 1 (the layer after the one whose attention ranks)")
  keep, ratio = args.get("keep"), args.get("ratio")
  if (keep is None) == (ratio is None):
    raise ValueError("fastv: give exactly one of keep= (count or fraction kept) or ratio= (fraction dropped)")
  if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1):
    raise ValueError(f"fastv ratio={ratio!r}: must be a float in [0, 1)")
  if keep is not None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
      raise ValueError(f"fastv keep={keep!r}: must be an int count >= 0 or a float fraction in (0, 1]")
    if isinstance(keep, float) and not 0 < keep <= 1:
      raise ValueError(f"fastv keep={keep!r}: a float keep is the fraction kept, in (0, 1]")
    if isinstance(keep, int) and keep < 0:
      raise ValueError(f"fastv keep={keep}: must be >= 0")
  return FastVConfig(k=k, keep=keep, ratio=None if ratio is None else float(ratio))


def apply(signals: vlm.PrefillSignals, *, config: FastVConfig) -> jax.Array:
  """-> keep [B, S - image_len + keep] int32, ascending slots."""
  if signals.last_attn is None:
    raise ValueError("fastv needs PrefillSignals.last_attn (the previous layer's last-query attention row)")
  if signals.image_span is None:
    raise ValueError("fastv needs PrefillSignals.image_span (static (start, length) of the image tokens)")
  count = config.count(signals.image_span[1])
  score = jnp.mean(signals.last_attn.astype(jnp.float32), axis=1)  # [B, S]: head mean of the last query's row
  return span.keep_top_in_span(score, signals.image_span, count)


vlm.register(vlm.Method(
    name="fastv", kind="prefill", parse=parse, apply=apply, out_count=lambda cfg, n: cfg.count(n),
    needs=("last_attn", "image_span"), example="fastv:k=2,keep=0.5"))

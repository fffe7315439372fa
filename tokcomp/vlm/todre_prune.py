"""ToDRE stage 2: task-relevance pruning of the visual tokens inside the decoder (Li, Yang, Lu, "ToDRE: Visual Token
Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models", arXiv:2505.18757, §3, stage
2, "information migration"; stage 1 is `tokcomp/vlm/todre.py`).

At decoder layer l the visual tokens still present are scored by how much the instruction attends to them:
  s_j = (1/H) Σ_h (1/T) Σ_t softmax(q_t K^T / √d)_h[j]
over the T real text queries after the image span (the instruction), with layer l's OWN input norm, q/k projections
and RoPE on the hidden states entering l (`PrefillSignals.text_attn`, a T-row side product beside the fused
attention), fp32. The `keep` best survive; every non-image token survives with its original RoPE position, and from
layer l on the decoder runs and caches S' = S - n + keep slots. keep=0 drops every visual token at layer l (the
paper's "prunes all visual tokens within certain decoder layers", once their information has migrated to the text).
Spec: "todre_prune:layer=16,keep=0" / "keep=0.5" (a float: fraction of the n visual tokens present, round(f n),
Python's round) / "keep=32" (a count).
Count: n -> keep (static); sequence S -> S - n + keep.
Order: ascending slot order.
Parity: no public code was found (searched the stored corpora for the paper's code; only the abstracts of v1/v2 could
be read), so the text-query set (all instruction tokens after the image, averaged), the layer's own attention and the
top-k rule are our reading, stated above. tests/test_todre_prune.py checks a float64 NumPy loop of it on the FastV
golden's tiny Llama (GQA), batch 3 with right padding against batch-1 runs, the KV cache after the prune, one compile.
Ties break by the lower index (stable sort).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.ops import span

NAME = "todre_prune"


@dataclasses.dataclass(frozen=True)
class ToDREPruneConfig:
  layer: int                # the decoder layer whose input is pruned
  keep: int | float         # int: visual tokens kept (0: all dropped); float in [0, 1]: fraction kept

  @property
  def layers(self) -> tuple[int, ...]:
    return (self.layer,)

  def count(self, n: int) -> int:
    k = round(n * self.keep) if isinstance(self.keep, float) else self.keep
    if not 0 <= k <= n:
      raise ValueError(f"{NAME} keep={self.keep}: gives {k}, must be in [0, {n}] (the visual tokens present)")
    return k


def parse(args: dict[str, Any]) -> ToDREPruneConfig:
  unknown = set(args) - {"layer", "keep"}
  if unknown:
    raise ValueError(f"{NAME}: unknown argument(s) {sorted(unknown)}; valid: layer, keep")
  layer = args.get("layer")
  if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
    raise ValueError(f"{NAME} layer={layer!r}: must be an int >= 0 (the decoder layer whose input is pruned)")
  keep = args.get("keep")
  if isinstance(keep, bool) or not isinstance(keep, (int, float)):
    raise ValueError(f"{NAME} keep={keep!r}: must be an int count >= 0 or a float fraction in [0, 1]")
  if isinstance(keep, float) and not 0.0 <= keep <= 1.0:
    raise ValueError(f"{NAME} keep={keep}: a float keep is the fraction kept, in [0, 1]")
  if isinstance(keep, int) and keep < 0:
    raise ValueError(f"{NAME} keep={keep}: must be >= 0")
  return ToDREPruneConfig(layer=layer, keep=keep)


def apply(signals: vlm.PrefillSignals, *, config: ToDREPruneConfig) -> jax.Array:
  """-> keep [B, S - n + keep] int32, ascending slots."""
  if signals.text_attn is None:
    raise ValueError(f"{NAME} needs PrefillSignals.text_attn (layer {config.layer}'s mean text-query attention)")
  if signals.image_span is None:
    raise ValueError(f"{NAME} needs PrefillSignals.image_span (static (start, length) of the visual tokens)")
  k = config.count(signals.image_span[1])
  score = jnp.mean(signals.text_attn.astype(jnp.float32), axis=1)  # [B, S]: head mean
  return span.keep_top_in_span(score, signals.image_span, k)


vlm.register(vlm.Method(
    name=NAME, kind="prefill", parse=parse, apply=apply, out_count=lambda cfg, n: cfg.count(n),
    needs=("text_attn", "image_span"), example="todre_prune:layer=1,keep=0.25"))

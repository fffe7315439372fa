"""ToDRE stage 1: diverse visual tokens by greedy k-center after the vision encoder (Li, Yang, Lu, "ToDRE: Visual
Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models", arXiv:2505.18757 v1,
§3 stage 1).

Greedy k-center (Gonzalez's farthest-point rule) on the cosine distance d_ij = 1 - cos(x_i, x_j) of the patch
features: start from one centre j_1, then j_t = argmax_j min_{s < t} d_(j_s, j) until k centres
(`ops.diversity.greedy_max_min`, a `lax.fori_loop` with a static k).
First centre: first="cls" (default) the patch with the highest head-mean [CLS] attention at the feature layer;
       first="isolated" the patch farthest from its nearest neighbour (DivPrune's first pick).
Count: P + n -> k patches, "todre:keep=64" (a count) or "todre:keep=0.1" (a fraction, k = round(f n)).
Order: kept patches in original order. The prefix ([CLS]) is dropped (LLaVA's patch features).
Signals: x; cls_attn for first="cls".
Stage 2 (task-relevance pruning of the visual tokens inside the decoder, "information migration") acts on the
       prefill and belongs with the in-LLM ("prefill") reducers; it is not part of this method.
Parity: no public code was found; only the abstract of v1 could be read (greedy k-center on the tower output;
        v2 of the paper describes a greedy max-sum diversification instead). The distance (cosine) and the first
        centre are our choices, stated above. tests/test_vlm_visual_refs.py checks a NumPy loop of the rule.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.ops import diversity, select
from tokcomp.vlm import _common

NAME = "todre"
FIRST = ("cls", "isolated")


@dataclasses.dataclass(frozen=True)
class ToDREConfig:
  keep: int | float   # centres kept: a count, or a fraction of the patches
  first: str = "cls"  # how the first centre is chosen


def parse(args) -> ToDREConfig:
  a = _common.args(NAME, args, {"keep": None, "first": "cls"}, required=("keep",))
  if a["first"] not in FIRST:
    raise ValueError(f"{NAME} first={a['first']!r}: must be one of {FIRST}")
  return ToDREConfig(keep=_common.budget(NAME, "keep", a["keep"]), first=a["first"])


def out_count(config: ToDREConfig, n: int) -> int:
  return _common.resolve(NAME, "keep", config.keep, n)


def apply(signals: vlm.VisualSignals, *, config: ToDREConfig):
  p, n = signals.num_prefix, _common.num_patches(signals)
  k = _common.resolve(NAME, "keep", config.keep, n)
  dist = diversity.cosine_distance(signals.x[:, p:])
  if config.first == "cls":
    _common.require(NAME, signals, "cls_attn")
    if p < 1:
      raise ValueError(f"{NAME} first=cls needs a [CLS] prefix token (VisualSignals.num_prefix={p})")
    first = jnp.argmax(select.cls_attention_score(signals.cls_attn[:, -1, :, p:].astype(jnp.float32)), axis=1)
  else:
    first = jnp.argmax(diversity.nearest_other(dist), axis=1)
  picks = diversity.greedy_max_min(dist, k, first)
  return _common.keep_patches(signals, jnp.sort(picks, axis=1))


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count,
                        needs=("cls_attn",), example="todre:keep=0.25"))

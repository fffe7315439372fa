"""DivPrune: diversity-based visual token pruning (Alvar, Singh, Akbari, Zhang, CVPR 2025, arXiv:2503.02175, §3.2).

A max-min diversity problem solved greedily on the cosine distance d_ij = 1 - cos(x_i, x_j) of the patch
features: the first pick is the patch farthest from its nearest neighbour, argmax_j min_{i != j} d_ij; every
further pick is argmax_j min_{s in S} d_sj over the picked set S (`ops.diversity.greedy_max_min`, a
`lax.fori_loop` over a static k).
Count: P + n -> k patches, "divprune:keep=64" (a count) or "divprune:keep=0.098" (a fraction of the patches,
       k = round(f n), as the reference's int(round(ratio * n))). The prefix ([CLS]) is dropped, as LLaVA's
       patch features have none.
Order: kept patches in original order (the reference sorts its kept indices).
Signals: x only.
Parity: tests/goldens/divprune_*.npz (tools/goldens/make_divprune.py: vbdi/divprune @ 799e2d9
        `LlavaMetaForCausalLM.DivPrune`, and the same function in ModelTC/llmc @ 05eedff, called on the same
        patch arrays one sample at a time).
Differences: the reference runs on the LLM-input embeddings (after the projector) at batch 1; here it runs on
        the tower's feature-layer patches (what a pre-LLM reducer sees; the projector is applied to the
        survivors), batched. A picked patch is never picked again (the reference relies on its self-distance
        being ~0, so this differs only when every remaining patch duplicates a picked one).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.ops import diversity
from tokcomp.vlm import _common

NAME = "divprune"


@dataclasses.dataclass(frozen=True)
class DivPruneConfig:
  keep: int | float  # patches kept: a count, or a fraction of the patches


def parse(args) -> DivPruneConfig:
  a = _common.args(NAME, args, {"keep": None}, required=("keep",))
  return DivPruneConfig(keep=_common.budget(NAME, "keep", a["keep"]))


def out_count(config: DivPruneConfig, n: int) -> int:
  return _common.resolve(NAME, "keep", config.keep, n)


def apply(signals: vlm.VisualSignals, *, config: DivPruneConfig):
  n = _common.num_patches(signals)
  k = _common.resolve(NAME, "keep", config.keep, n)
  if n < 2:
    raise ValueError(f"{NAME} needs at least 2 patches (got {n})")
  dist = diversity.cosine_distance(signals.x[:, signals.num_prefix:])  # [B, n, n]
  first = jnp.argmax(diversity.nearest_other(dist), axis=1)
  picks = diversity.greedy_max_min(dist, k, first)
  return _common.keep_patches(signals, jnp.sort(picks, axis=1))


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count,
                        needs=(), example="divprune:keep=9"))

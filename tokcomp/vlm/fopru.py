"""FoPru: focal pruning by token significance from the vision encoder's attention (Jiang et al., "FoPru: Focal
Pruning for Efficient Large Vision-Language Models", arXiv:2411.14164, §3).

Significance: Ā = (1/H) Σ_h A_h over the patch rows and columns of the feature layer's attention [n, n];
  s_recv = column means (1/n) Σ_i Ā[i, j]   (attention each patch receives)
  s_send = row means    (1/n) Σ_j Ā[i, j]
and s is whichever of the two has the larger variance (per example).
Strategies:
  rank  keep the k patches of highest s                      "fopru:keep=64" or "fopru:keep=0.25"
  row   keep the r grid rows of highest row sum Σ_c s(r, c)   "fopru:strategy=row,rows=6" (or rows=0.25 of h),
        all w patches of each row
Reorder (the paper's last step, default on): the kept patches go back to their original order. reorder=False
        keeps them by descending significance (rank), or the rows by descending row score (row).
Count: rank: P + n -> k; row: P + h w -> r w. The prefix ([CLS]) is dropped (LLaVA's patch features).
Signals: attn (the full softmax attention of the feature layer: FoPru reads columns, not just the CLS row).
Parity: no golden. The paper's method section could not be read (abstract only); the equations follow a public
        implementation found by the code index (`focal_prunning`, repository not identified), which takes the head
        mean of the attention it is given, picks the higher-variance of the column and row means, and sorts the
        kept indices. tests/test_vlm_visual_refs.py checks a NumPy loop of the rules above.
Differences: that implementation loops over the batch and takes `rows = n_output_tokens` for the row strategy
        (a token count used as a row count); here rows is its own argument.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.vlm import _common

NAME = "fopru"
STRATEGIES = ("rank", "row")


@dataclasses.dataclass(frozen=True)
class FoPruConfig:
  strategy: str = "rank"
  keep: int | float | None = None  # rank: patches kept (count or fraction)
  rows: int | float | None = None  # row: grid rows kept (count or fraction of h)
  reorder: bool = True             # back to original order


def parse(args) -> FoPruConfig:
  a = _common.args(NAME, args, {"strategy": "rank", "keep": None, "rows": None, "reorder": True})
  if a["strategy"] not in STRATEGIES:
    raise ValueError(f"{NAME} strategy={a['strategy']!r}: must be one of {STRATEGIES}")
  if not isinstance(a["reorder"], bool):
    raise ValueError(f"{NAME} reorder={a['reorder']!r}: must be True or False")
  used, unused = ("keep", "rows") if a["strategy"] == "rank" else ("rows", "keep")
  if a[used] is None:
    raise ValueError(f"{NAME} strategy={a['strategy']}: argument {used} is required")
  if a[unused] is not None:
    raise ValueError(f"{NAME} strategy={a['strategy']}: argument {unused} does not apply (give {used})")
  return FoPruConfig(strategy=a["strategy"], reorder=a["reorder"],
                     **{used: _common.budget(NAME, used, a[used])})


def counts(config: FoPruConfig, n: int, h: int | None = None) -> int:
  if config.strategy == "rank":
    return _common.resolve(NAME, "keep", config.keep, n)
  h = h if h is not None else int(round(n ** 0.5))  # out_count only sees n: a square grid
  return _common.resolve(NAME, "rows", config.rows, h) * (n // h)


def out_count(config: FoPruConfig, n: int) -> int:
  return counts(config, n)


def significance(attn, p: int):
  """[B, n]: the higher-variance of the column and row means of the head-mean patch attention."""
  a = jnp.mean(attn[:, :, p:, p:].astype(jnp.float32), axis=1)  # [B, n, n]
  recv, send = jnp.mean(a, axis=1), jnp.mean(a, axis=2)
  return jnp.where((jnp.var(recv, axis=1) > jnp.var(send, axis=1))[:, None], recv, send)


def apply(signals: vlm.VisualSignals, *, config: FoPruConfig):
  _common.require(NAME, signals, "attn")
  p, n = signals.num_prefix, _common.num_patches(signals)
  s = significance(signals.attn, p)
  order = jnp.argsort(-s, axis=1, stable=True)
  if config.strategy == "rank":
    k = counts(config, n)
    idx = order[:, :k]
  else:
    h, w = _common.grid_of(NAME, signals)
    r = _common.resolve(NAME, "rows", config.rows, h)
    rows = jnp.argsort(-jnp.sum(s.reshape(-1, h, w), axis=2), axis=1, stable=True)[:, :r]  # [B, r]
    if config.reorder:
      rows = jnp.sort(rows, axis=1)
    idx = (rows[:, :, None] * w + jnp.arange(w)[None, None, :]).reshape(rows.shape[0], r * w)
  if config.reorder:
    idx = jnp.sort(idx, axis=1)
  return _common.keep_patches(signals, idx)


vlm.register(vlm.Method(name=NAME, kind="visual", parse=parse, apply=apply, out_count=out_count,
                        needs=("attn",), example="fopru:keep=9"))

"""DiffRate at inference: prune by CLS attention, then merge into the most similar kept token, with the per-layer
counts that DiffRate searched (Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision
Transformers", ICCV 2023, arXiv:2305.17997, §3: token sorting, pruning and merging; the counts come from the
paper's differentiable compression-rate search, which is training and not part of this file).

In block l, after the attention residual (the "mid" slot, as the reference's `DiffRateBlock`):
  1. Sort. a_n = (1/H) Σ_h softmax(q_cls k_nᵀ/√d + log s)_h (CLS attention as importance, with the
     proportional-attention bias). The reducible tokens are sorted by a_n, best first; the prefix stays first.
  2. Prune. Keep the first P_l = prune[l] tokens of that order, drop the rest.
  3. Merge. The first M_l = merge[l] tokens are kept ("important"); each of the other P_l - M_l goes to
     j*(i) = argmax_{j < M_l, j not protected} cos(x_i, x_j) on the block's features x (not the keys), and
       x'_j = (x_j + Σ_{i: j*(i)=j} x_i) / (1 + |{i: j*(i)=j}|)       (an unweighted mean, as the reference's
                                                                          `scatter_reduce(mode="mean")`)
       s'_j = s_j + Σ_{i: j*(i)=j} cos(x_i, x_j) s_i                     (size="similarity", the reference)
     or s'_j = s_j + Σ s_i (size="count", ToMe's sizes). Later blocks attend with + log s' (`prop_attn`).
Count: N -> min(N, prune[l], merge[l]) tokens, all counts including the protected prefix (the authors' files
       count the class token: 197 = 196 patches + CLS). One Step per block; every block sorts, as the reference.
Order: prefix, then the kept tokens in descending a_n order: the reference's order, slot for slot.
Parity: tests/goldens/diffrate_*.npz (tools/goldens/make_diffrate.py, OpenGVLab/DiffRate @ 91ae3e3, the
        `DiffRate.patch.deit` inference path): logits, sizes and every block's output slot by slot at 1e-5
        fp32 (the 12-block golden, whose |x| reaches ~15, at atol 1e-5 of each block's largest |x|).

Config strings (one per model; the step covers every block, so it cannot share blocks with another method):
  diffrate:schedule=PATH,model=ViT-S-DeiT,flops=2.9   counts from an authors'-format compression_rate.json
                                                      (`load_schedule`); model/flops may be left out when the
                                                      file has one choice. PATH must not contain ',' or '+'
                                                      (pass `diffrate.schedule(...)` as `reduce=` instead).
  diffrate:prune=50-43-43-30,merge=50-43-35-21        inline counts, one per block, joined by '-' (or [..]);
                                                      leave prune (or merge) out for merging (pruning) only.
  Options: clamp=True|False, size=similarity|count.
Count rules and validation: every count is an int in [P + 1, N0] (P = protected prefix, N0 = tokens entering
  the encoder; the authors' block 0 is always N0 = 197). With clamp=False each block must satisfy
  merge[l] <= prune[l] <= N_l (the count entering the block), i.e. the counts are non-increasing; a violation
  is a ValueError naming the block. With clamp=True the reference's rule applies instead: N_l' = min(N_l,
  prune[l], merge[l]) (its `x[:, :prune]` slice, its `merge < prune` test, and `ste_min` in its FLOP count).
  clamp defaults to True for schedule files, because the authors' own compression_rate.json needs it (ViT-S-DeiT
  2.5 has prune[6]=111 > merge[5]=107; several ViT-L/H-MAE entries have merge > prune), and to False for inline
  counts, so that a typo fails loudly.

Where we differ from the reference, on purpose:
  * The reference assumes exactly one class token (`attn[:, :, 0, 1:]`, similarity column 0 masked). We keep any
    protected prefix P >= 1 in place and never merge into it; P = 0 (no CLS token) is a ValueError, as there is
    no CLS attention to rank by. For P = 1 this is the reference exactly.
  * Invalid slots (mask false, from an earlier masked method) rank last, merge nowhere and never receive a merge;
    the reference has no masks at inference.
  * size="similarity" can in principle give s' <= 0 (negative cosines); the reference's log then gives -inf or
    NaN, ours `log(max(s, 1e-6))` (models/vit.py). The goldens check that this never happens there.
  * Not included: DiffRate's training (the differentiable rate search, the masks of `DiffRate.ddp`) and the
    MAE variant's size-weighted average pooling at the head (models/vit.py pools GAP unweighted).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops import merge as merge_ops
from tokcomp.ops import select
from tokcomp.tokens import Tokens, batched_scatter

SIZE_RULES = ("similarity", "count")
PRUNE_KEY, MERGE_KEY = "prune_kept_num", "merge_kept_num"  # the authors' field names


@dataclasses.dataclass(frozen=True)
class DiffRateConfig:
  prune: int | None      # tokens kept after pruning in this block, prefix included; None: no pruning
  merge: int | None      # tokens kept after merging, prefix included; None: no merging
  size: str = "similarity"
  clamp: bool = False    # min(current, prune, merge) as the reference, instead of rejecting larger counts
  layer: int = 0         # block index (for messages and the first block's N0 check)
  largest: int = 0       # the schedule's largest count: block 0 checks it against N0


class KeptCounts(NamedTuple):
  """Per-block kept-token counts (prefix included), as in the authors' compression_rate.json."""
  prune: tuple[int, ...] | None
  merge: tuple[int, ...] | None


# --- the reduction ----------------------------------------------------------------------------------------

def kept_counts(config: DiffRateConfig, n: int, protected: int) -> tuple[int, int]:
  """(after pruning, after merging) for a block entered by n tokens; ValueError when the counts cannot apply."""
  if protected < 1:
    raise ValueError("diffrate ranks tokens by CLS attention: the model needs a class token (num_protected >= 1)")
  where = f"diffrate block {config.layer}"
  for field, v in (("prune", config.prune), ("merge", config.merge)):
    if v is not None and not protected < v:
      raise ValueError(f"diffrate {field}[{config.layer}]={v} must be > {protected} (the protected prefix), so "
                       "that one reducible token is kept")
  prune = n if config.prune is None else config.prune
  merge = prune if config.merge is None else config.merge
  if config.clamp:
    prune = min(n, prune)
    return prune, min(prune, merge)
  if prune > n:
    raise ValueError(f"{where}: prune={prune} exceeds the {n} tokens entering the block (counts must be "
                     "non-increasing and within N; clamp=True takes min(N, count) as the reference does)")
  if merge > prune:
    raise ValueError(f"{where}: merge={merge} exceeds prune={prune} (merge <= prune <= N is required; "
                     "clamp=True takes min(N, prune, merge) as the reference does)")
  return prune, merge


def reduce(tokens: Tokens, signals: Signals, *, config: DiffRateConfig) -> Tokens:
  if signals.cls_attn is None:
    raise ValueError("diffrate needs signals.cls_attn (the CLS attention row); the model has no CLS token?")
  if config.size not in SIZE_RULES:
    raise ValueError(f"diffrate size={config.size!r}: must be one of {SIZE_RULES}")
  p = tokens.num_protected
  prune, merge = kept_counts(config, tokens.n, p)
  ranked = select.rank_reducible(tokens, select.cls_attention_score(signals.cls_attn))  # [B, N - P]
  order = select.keep_with_prefix(tokens, ranked)  # [B, N]: new position -> slot
  if merge == prune:  # sort and prune only
    return tokens.gather(order[:, :prune])

  # Sorted positions < merge are kept ("dst"); merge <= position < prune merge into their nearest dst.
  x_sorted = merge_ops.normalize(jnp.take_along_axis(tokens.x, order[:, :prune, None], axis=1))
  valid_sorted = jnp.take_along_axis(tokens.mask, order[:, :prune], axis=1)
  blocked = (jnp.arange(merge) < p)[None, :] | ~valid_sorted[:, :merge]
  similarity, partner = merge_ops.best_match(x_sorted[:, merge:], x_sorted[:, :merge], blocked)  # [B, P_l - M_l]
  src_ok = valid_sorted[:, merge:] & jnp.isfinite(similarity)
  b = tokens.batch
  dest_sorted = jnp.concatenate([
      jnp.broadcast_to(jnp.arange(merge, dtype=jnp.int32), (b, merge)),
      jnp.where(src_ok, partner, -1),
      jnp.full((b, tokens.n - prune), -1, jnp.int32)], axis=1)  # by sorted position
  dest = batched_scatter(jnp.zeros((b, tokens.n), jnp.int32), order, dest_sorted)  # by slot
  out = tokens.reassign(dest, merge, weight=jnp.ones_like(tokens.size))  # unweighted mean, sizes add
  if config.size == "count":
    return out
  # The reference's similarity-weighted sizes: a merged token adds cos(x_i, x_j) s_i to its destination.
  factor_sorted = jnp.concatenate([jnp.ones((b, merge)), jnp.where(src_ok, similarity, 0.0),
                                   jnp.zeros((b, tokens.n - prune))], axis=1)
  factor = batched_scatter(jnp.zeros((b, tokens.n)), order, factor_sorted)
  weighted = jnp.where(tokens.mask, tokens.size * factor, 0.0)
  size = batched_scatter(jnp.zeros((b, merge), tokens.size.dtype), jnp.where(dest < 0, merge, dest), weighted,
                         "add", mode="drop")
  return out.replace(size=size)


# --- schedules --------------------------------------------------------------------------------------------

def _ints(field: str, values: Any) -> tuple[int, ...] | None:
  """"197-196-180", [197, 196], "[197,196]" (the authors' string form), an int, or None/"None" -> ints."""
  if values is None or (isinstance(values, str) and values.strip().lower() in ("none", "")):
    return None
  if isinstance(values, str):
    text = values.strip()
    try:
      values = ast.literal_eval(text) if text.startswith("[") else [int(t) for t in text.split("-")]
    except (ValueError, SyntaxError):
      raise ValueError(f"diffrate {field}={values!r}: must be ints joined by '-' (e.g. 197-180-150) "
                       "or a list") from None
  if isinstance(values, int) and not isinstance(values, bool):
    values = [values]
  if not isinstance(values, (list, tuple)):
    raise ValueError(f"diffrate {field}={values!r}: must be ints joined by '-' or a list of ints")
  for l, v in enumerate(values):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"diffrate {field}[{l}]={v!r}: must be an int >= 1 (tokens kept, prefix included)")
  return tuple(values)


def check_counts(counts: KeptCounts, depth: int, clamp: bool) -> None:
  """Lengths, and (unless clamp) merge[l] <= prune[l] <= merge[l-1]: non-increasing counts."""
  if counts.prune is None and counts.merge is None:
    raise ValueError("diffrate: give prune and/or merge counts, or schedule=PATH to an authors'-format "
                     "compression_rate.json")
  for field, values in (("prune", counts.prune), ("merge", counts.merge)):
    if values is not None and len(values) != depth:
      raise ValueError(f"diffrate {field} has {len(values)} counts: must have one per block, depth={depth}")
  if clamp:
    return
  left = None  # tokens left after the previous block, where the counts say
  for l in range(depth):
    prune = counts.prune[l] if counts.prune is not None else None
    merge = counts.merge[l] if counts.merge is not None else None
    if prune is not None and left is not None and prune > left:
      raise ValueError(f"diffrate prune[{l}]={prune} > {left} tokens left by block {l - 1}: counts must be "
                       "non-increasing (or pass clamp=True for the reference's min(N, count) rule)")
    if merge is not None and prune is not None and merge > prune:
      raise ValueError(f"diffrate merge[{l}]={merge} > prune[{l}]={prune}: merge <= prune is required "
                       "(or pass clamp=True for the reference's min(N, prune, merge) rule)")
    if merge is not None and left is not None and merge > left:
      raise ValueError(f"diffrate merge[{l}]={merge} > {left} tokens left by block {l - 1}: counts must be "
                       "non-increasing (or pass clamp=True)")
    left = next((v for v in (merge, prune) if v is not None), left)


def schedule(counts: KeptCounts | Sequence, *, size: str = "similarity", clamp: bool = False,
             depth: int | None = None) -> schedules.Schedule:
  """A ready schedule (one Step per block) for `ViT(reduce=...)`, from `KeptCounts` or (prune, merge).
  `depth` (default: the counts' length) checks the number of counts."""
  prune, merge = counts
  counts = KeptCounts(_ints("prune", prune), _ints("merge", merge))
  if size not in SIZE_RULES:
    raise ValueError(f"diffrate size={size!r}: must be one of {SIZE_RULES}")
  if not isinstance(clamp, bool):
    raise ValueError(f"diffrate clamp={clamp!r}: must be True or False")
  if depth is None:
    depth = len(counts.prune if counts.prune is not None else counts.merge or ())
  check_counts(counts, depth, clamp)
  largest = max((v for vs in counts if vs is not None for v in vs), default=0)
  pick = lambda vs, l: None if vs is None else vs[l]
  return tuple(schedules.Step("diffrate", DiffRateConfig(pick(counts.prune, l), pick(counts.merge, l), size,
                                                         clamp, l, largest))
               for l in range(depth))


def load_schedule(path: str | os.PathLike, model: str | None = None, flops: Any = None) -> KeptCounts:
  """Reads an authors'-format compression_rate.json (OpenGVLab/DiffRate):

    {"ViT-S-DeiT": {"2.9": {"prune_kept_num": "[197,196,190,...]", "merge_kept_num": "[197,194,176,...]"}, ...}}

  `model` picks the top-level key and `flops` (GFLOPs, str or number) the entry; either may be left out when
  there is a single choice. A file (or model) that is one entry, {"prune_kept_num": ..., "merge_kept_num": ...},
  works too. Counts may be lists or the authors' list strings; "None" means no pruning (their CAFormer entries).
  """
  with open(path) as f:
    data = json.load(f)
  where = f"diffrate schedule {os.fspath(path)!r}"
  entry = data
  if not _is_entry(entry):
    entry, model = _pick(entry, model, "model", where)
    where += f" model {model!r}"
  if not _is_entry(entry):
    entry, flops = _pick(entry, flops, "flops", where)
    where += f" flops {flops!r}"
  if not _is_entry(entry):
    raise ValueError(f"{where}: expected an entry with {PRUNE_KEY!r} and {MERGE_KEY!r}, got keys {sorted(entry)}")
  try:
    return KeptCounts(_ints("prune", entry[PRUNE_KEY]), _ints("merge", entry[MERGE_KEY]))
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None


def _is_entry(obj: Any) -> bool:
  return isinstance(obj, dict) and PRUNE_KEY in obj and MERGE_KEY in obj


def _pick(table: Any, key: Any, field: str, where: str) -> tuple[Any, str]:
  if not isinstance(table, dict) or not table:
    raise ValueError(f"{where}: expected a JSON object of {field} names, got {type(table).__name__}")
  if key is None:
    if len(table) != 1:
      raise ValueError(f"{where}: pass {field}= one of {sorted(table)}")
    key = next(iter(table))
  name = str(key)
  if name not in table:  # flops=3 finds "3.0"
    name = next((k for k in table if _same_number(k, key)), name)
  if name not in table:
    raise ValueError(f"{where}: {field}={key!r} not in the file; valid: {sorted(table)}")
  return table[name], name


def _same_number(a: Any, b: Any) -> bool:
  try:
    return float(a) == float(b)
  except (TypeError, ValueError):
    return False


def _build(args, depth):
  args = reducers.check_args("diffrate", args, {"schedule": None, "model": None, "flops": None, "prune": None,
                                                "merge": None, "clamp": None, "size": "similarity"})
  if args["schedule"] is not None:
    if args["prune"] is not None or args["merge"] is not None:
      raise ValueError("diffrate: give either schedule=PATH or prune=/merge= counts, not both")
    counts = load_schedule(str(args["schedule"]), args["model"], args["flops"])
    clamp = True if args["clamp"] is None else args["clamp"]
  else:
    if args["model"] is not None or args["flops"] is not None:
      raise ValueError("diffrate: model= and flops= pick an entry of a schedule file: also pass schedule=PATH")
    counts = KeptCounts(args["prune"], args["merge"])
    clamp = False if args["clamp"] is None else args["clamp"]
  return schedule(counts, size=args["size"], clamp=clamp, depth=depth)


def _resolve(config: DiffRateConfig, n: int, protected: int) -> DiffRateConfig:
  if config.layer == 0 and config.largest > n:
    raise ValueError(f"the schedule has a count of {config.largest} but only {n} tokens enter the encoder: "
                     "counts must be within N (is the schedule for another model or image size?)")
  prune, merge = kept_counts(config, n, protected)
  return dataclasses.replace(config, prune=prune, merge=merge)  # every block sorts, as the reference


reducers.register(reducers.Method(
    name="diffrate", reduce=reduce, signals=("cls_attn",), build=_build,
    out_count=lambda c, n, p: kept_counts(c, n, p)[1], resolve=_resolve, prop_attn=lambda c: True,
    # size=count: the contract test checks that sizes count tokens; the default (similarity) sizes do not.
    example="diffrate:prune=33-29-25-21,merge=29-25-21-17,size=count"))

"""FasterVLM and VTC-CLS: keep the patches with the highest [CLS] attention in the vision tower.

FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning",
arXiv:2412.01818, §3.2): s_n = (1/H) Σ_h A^(f)_h[cls, n] at the feature layer f (LLaVA's select_layer -2).
VTC-CLS (Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", arXiv:2412.05819,
§3): the same head-mean row summed over the layers start..f, s_n = Σ_{l=start}^{f} (1/H) Σ_h A^(l)_h[cls, n]
(the reference's `attentions[start:-1]` with the tower's last layer unused). VTC-CLS with start = f is FasterVLM,
so both live here and share the score.
The k patches of highest s are kept (stable sort: the lower index wins a tie; the references use torch.topk).
Count: P + n -> k patches: "fastervlm:keep=144" (a count) or "fastervlm:keep=0.25" (a fraction of the patches,
       k = round(f n); FasterVLM's scripts set the count, llmc computes round(n (1 - rate))).
       "vtc_cls:keep=36,start=10": start is a tower layer index in [0, L-1] or negative from the end of the
       L layers run (-1 = the feature layer); ValueError outside.
Order: kept patches in original order (both references restore it). The prefix ([CLS]) is dropped, as LLaVA's
       select_feature="patch".
Signals: cls_attn (the last layer, or layers start..L-1).
Parity: tests/goldens/fastervlm_*.npz (tools/goldens/make_fastervlm.py: Theia-4869/FasterVLM @ f5d5f12
        `encode_images` + `feature_select`, and THU-MIG/VTC-CLS @ e41ac9b `cls_token_only` + `encode_images`, on
        the same attention arrays, one sample at a time: VTC-CLS squeezes the batch axis).
Differences: batched; the attention row is an O(N) side product of the tower, not the full N x N matrix.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tokcomp import vlm
from tokcomp.vlm import _common


@dataclasses.dataclass(frozen=True)
class ClsAttentionConfig:
  keep: int | float  # patches kept: a count, or a fraction of the patches
  start: int = -1    # first tower layer of the score (VTC-CLS); -1: the feature layer only (FasterVLM)


def cls_score(cls_attn, num_prefix: int, start: int, method: str):
  """[B, n] Σ over layers start..L-1 of the head-mean CLS attention row over the patches (fp32)."""
  layers = cls_attn.shape[1]
  if not -layers <= start < layers:
    raise ValueError(f"{method} start={start}: must be a tower layer in [0, {layers - 1}] or [-{layers}, -1] "
                     f"(cls_attn holds the {layers} layers run)")
  rows = cls_attn[:, start % layers:, :, num_prefix:].astype(jnp.float32)  # [B, l, H, n]
  return jnp.sum(jnp.mean(rows, axis=2), axis=1)


def _method(name: str, with_start: bool, example: str):
  def parse(args) -> ClsAttentionConfig:
    allowed = {"keep": None, **({"start": None} if with_start else {})}
    a = _common.args(name, args, allowed, required=tuple(allowed))
    start = -1
    if with_start:
      start = a["start"]
      if isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"{name} start={start!r}: must be an int tower layer index (negative: from the end)")
    return ClsAttentionConfig(keep=_common.budget(name, "keep", a["keep"]), start=start)

  def out_count(config: ClsAttentionConfig, n: int) -> int:
    return _common.resolve(name, "keep", config.keep, n)

  def apply(signals: vlm.VisualSignals, *, config: ClsAttentionConfig):
    _common.require(name, signals, "cls_attn")
    if signals.num_prefix < 1:
      raise ValueError(f"{name} needs a [CLS] prefix token (VisualSignals.num_prefix={signals.num_prefix})")
    k = _common.resolve(name, "keep", config.keep, _common.num_patches(signals))
    score = cls_score(signals.cls_attn, signals.num_prefix, config.start, name)
    return _common.keep_patches(signals, _common.topk_ascending(score, k))

  return vlm.register(vlm.Method(name=name, kind="visual", parse=parse, apply=apply, out_count=out_count,
                                 needs=("cls_attn",), example=example))


FASTERVLM = _method("fastervlm", False, "fastervlm:keep=0.25")
VTC_CLS = _method("vtc_cls", True, "vtc_cls:keep=9,start=1")

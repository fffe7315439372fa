"""Top-k by CLS attention, no fusion: the EViT ablation without the fused token (Liang et al. 2022, Table 7).

Score a_n = head-mean CLS attention; the k = ceil(ρ (N - P)) best reducible tokens are kept, the rest dropped.
Count: N -> P + k.  Order: prefix, then kept tokens in ascending slot order.
"""
from __future__ import annotations

from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops import select
from tokcomp.reducers import keep
from tokcomp.tokens import Tokens


def reduce(tokens: Tokens, signals: Signals, *, config: keep.KeepConfig) -> Tokens:
  if signals.cls_attn is None:
    raise ValueError("topk needs signals.cls_attn (the CLS attention row); the model has no CLS token?")
  k = keep.kept_count(config, tokens.n, tokens.num_protected)
  idx, _ = select.topk_reducible(tokens, select.cls_attention_score(signals.cls_attn), k)
  return tokens.gather(select.keep_with_prefix(tokens, idx))


reducers.register(reducers.Method(
    name="topk", reduce=reduce, signals=("cls_attn",), build=keep.build("topk", {}),
    out_count=keep.out_count, resolve=keep.resolve, example="topk:keep=0.5,layers=1"))

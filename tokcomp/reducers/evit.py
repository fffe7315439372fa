"""EViT: attentive token keeping plus one fused inattentive token (Liang et al., ICLR 2022, arXiv:2202.07800, §3.2).

Attentiveness a_n = (1/H) Σ_h softmax(q_cls k_nᵀ/√d)_h over the reducible tokens. The k = ceil(ρ (N - P))
most attentive are kept; with fusion the rest fold into one token x_f = Σ_{n dropped} a_n x_n (eq. 4; as the
reference, not renormalised by the dropped mass), appended last. Later blocks treat it as an ordinary token.
Count: N -> P + k (+1 fused). Nothing happens when k = N - P.
Order: prefix, kept tokens in ascending slot order (the reference emits descending score: a set, so logits
       agree), then the fused token.
Parity: tests/goldens/evit_*.npz (tools/goldens/make_evit.py, youweiliang/evit @ 5ca95a7).
"""
from __future__ import annotations

import jax.numpy as jnp

from tokcomp import reducers
from tokcomp.attention import Signals
from tokcomp.ops import select
from tokcomp.reducers import keep
from tokcomp.tokens import Tokens, batched_scatter


def reduce(tokens: Tokens, signals: Signals, *, config: keep.KeepConfig) -> Tokens:
  if signals.cls_attn is None:
    raise ValueError("evit needs signals.cls_attn (the CLS attention row); the model has no CLS token?")
  score = select.cls_attention_score(signals.cls_attn)  # [B, N]
  k = keep.kept_count(config, tokens.n, tokens.num_protected)
  idx, dropped = select.topk_reducible(tokens, score, k)
  kept = select.keep_with_prefix(tokens, idx)  # [B, P + k]
  if not config.fuse:
    return tokens.gather(kept)
  # One scatter: kept slots move unchanged to their place, dropped slots add a_n x_n into the last slot.
  m = kept.shape[1]
  dest = batched_scatter(jnp.where(dropped, m, -1), kept, jnp.arange(m, dtype=jnp.int32))
  weight = jnp.where(dropped, score, 1.0)
  return tokens.reassign(dest, m + 1, weight=weight, normalize=False)


reducers.register(reducers.Method(
    name="evit", reduce=reduce, signals=("cls_attn",), build=keep.build("evit", {"fuse": True}),
    out_count=keep.out_count, resolve=keep.resolve, example="evit:keep=0.7,layers=1"))

"""Llama-style decoder (Touvron et al. 2023, arXiv:2302.13971; GQA: Ainslie et al. 2023, arXiv:2305.13245) with a
static-size KV cache and a hook for in-LLM visual-token reducers (FastV, PyramidDrop: `tokcomp.vlm`, kind "prefill").

API (what a VLM calls; every shape static, every count a Python int):

  model = Llama(LlamaConfig(...), reduce="fastv:k=2,keep=20")   # reduce=None: plain decoder
  embeds = model.apply(params, ids, method=Llama.embed)            # [B, S] int -> [B, S, D]
  logits_last, cache, aux = prefill(model, params, embeds, positions, mask, image_span=(5, 49), max_new_tokens=8)
  logits, cache = decode_step(model, params, cache, token=ids_b)   # or embeds=[B, D]; logits [B, V]
  tokens = greedy_generate(model, params, embeds, positions, mask, steps=8, image_span=...)   # [B, steps]
  logits_all, aux = model.apply(params, embeds, positions, mask, image_span=...)  # full forward, no cache

  embeds     [B, S, D]  input embeddings (or token ids [B, S] through `tokens=` / `embed`)
  positions  [B, S]     explicit RoPE position ids (a pruned sequence keeps its original ones)
  mask       [B, S]     bool, true on real tokens. Any padding layout works (slots are masked, never assumed to be
                        a prefix); the usual one is RIGHT padding. The "last token" (logits_last, FastV's query) is
                        each example's last real slot.
  image_span static (start, length) of the visual tokens, the same for every example (the VLM places them at a
             fixed offset); needed only with `reduce`.
  aux        {"hidden": final-normed hidden states [B, S', D], "positions"/"mask" [B, S'], "keep": {layer: the
             kept ORIGINAL sequence indices [B, S'_l]}, "signals": {layer: PrefillSignals handed to the reducer}}

Attention: the main product is `jax.nn.dot_product_attention` (fused; GQA native) under a causal AND key-padding
mask. The reducer's `last_attn` (the previous layer's softmax row of the last real query over all keys, per head,
fp32) is a separate one-row product from q_last and the keys, so the main attention never leaves the kernel.

KV cache (`KVCache`, a pytree): per layer k/v buffers [B, C_l, kv_heads, head_dim] with C_l = S_l + max_new_tokens,
where S_l is the sequence length that layer ran at in prefill (S before an in-LLM prune, S' after it), a per-slot
validity mask [B, C_l], the next write slot `index[l]` (= S_l after prefill, the same for every example, so a
write is one dynamic_update_slice), and `position` [B], the RoPE position of the next token (last real position + 1).
Padding slots stay masked forever; decoding past capacity is refused by `greedy_generate` (decode_step cannot check
inside jit: a write past C_l is clamped by dynamic_update_slice and would overwrite the last slot).

Reducer hook: `reduce` names a registered prefill method; its config's `layers` (tuple of int) says where it acts.
Before layer l in `layers` the decoder builds `PrefillSignals` (hidden entering l, positions, last_attn from layer
l-1, image_mask, the current image_span, layer=l, image_len0; on request (`Method.needs`) layer_attn / text_attn,
layer l's own attention rows before the prune: `own_attention`), calls `method.apply` -> keep [B, S'] (ascending
slots), gathers hidden states, positions, mask and image mask, and every later layer runs and caches only S' slots.
Contract: a prefill method keeps every non-image slot, so the image tokens stay contiguous at the same start and the
new span is (start, S' - (S - length)).

Numerics follow HF `LlamaForCausalLM`: RMSNorm in fp32 then cast, weight times normed; RoPE with the rotate-half
layout (cos/sin of position * theta^(-2i/d) in fp32, concatenated twice); SwiGLU MLP down(silu(gate x) * up x);
no biases unless the config asks (Qwen2-style qkv bias). Parameter names mirror HF (`embed_tokens`, `layers_{i}/
{input_layernorm, self_attn/{q,k,v,o}_proj, post_attention_layernorm, mlp/{gate,up,down}_proj}`, `norm`,
`lm_head`), see `tokcomp.checkpoints.hf_llama`.
Parity: tests/goldens/llama_tiny.npz (tools/goldens/make_llama.py, transformers 4.46.3 LlamaForCausalLM).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from tokcomp.attention import Implementation, masked_softmax


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 128
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None          # None: hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  qkv_bias: bool = False               # Qwen2; HF Llama's attention_bias sets both
  o_bias: bool = False
  mlp_bias: bool = False
  dtype: Any = jnp.float32             # compute dtype; params stay fp32
  implementation: Implementation = None  # jax.nn.dot_product_attention backend

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"LlamaConfig.num_heads={self.num_heads} must divide hidden_size={self.hidden_size} "
                       f"(or set head_dim)")
    if self.dim_per_head % 2:
      raise ValueError(f"LlamaConfig head_dim={self.dim_per_head} must be even for RoPE")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


@struct.dataclass
class KVCache:
  """Per-layer static-size key/value buffers. k[l], v[l]: [B, C_l, kv_heads, head_dim]; mask[l]: [B, C_l] (slot
  holds a real token); index[l]: int32 scalar, the next write slot; position: [B] int32, the next RoPE position."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: tuple[jax.Array, ...]
  index: tuple[jax.Array, ...]
  position: jax.Array

  @property
  def capacity(self) -> tuple[int, ...]:
    return tuple(k.shape[1] for k in self.k)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, HF's rotate-half layout: x [B, S, H, d], positions [B, S] -> x cos + rotate_half(x) sin."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [d/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, d/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, S, 1, d]
  cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
  x1, x2 = x[..., : d // 2], x[..., d // 2:]
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def last_slot(mask: jax.Array) -> jax.Array:
  """[B, S] bool -> [B] int32: the last true slot of each row (0 if none)."""
  s = mask.shape[1]
  return (s - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32)


def take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [B, S, ...], idx [B, S'] -> [B, S', ...] (per-example gather, no batch row index)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (scale * h.astype(self.dtype)).astype(self.dtype)


class LlamaAttention(nn.Module):
  config: LlamaConfig

  def setup(self):
    c = self.config
    d = c.dim_per_head
    dense = lambda n, bias, name: nn.Dense(n, use_bias=bias, dtype=c.dtype, name=name)
    self.q_proj = dense(c.num_heads * d, c.qkv_bias, "q_proj")
    self.k_proj = dense(c.num_kv_heads * d, c.qkv_bias, "k_proj")
    self.v_proj = dense(c.num_kv_heads * d, c.qkv_bias, "v_proj")
    self.o_proj = dense(c.hidden_size, c.o_bias, "o_proj")

  def qkv(self, x: jax.Array, positions: jax.Array):
    c = self.config
    b, s, _ = x.shape
    d = c.dim_per_head
    q = self.q_proj(x).reshape(b, s, c.num_heads, d)
    k = self.k_proj(x).reshape(b, s, c.num_kv_heads, d)
    v = self.v_proj(x).reshape(b, s, c.num_kv_heads, d)
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

  def attend(self, q, k, v, mask4) -> jax.Array:
    """q [B, T, H, d], k/v [B, S, KVH, d], mask4 [B, 1, T, S] -> o_proj output [B, T, D]."""
    b, t = q.shape[:2]
    # A query with no visible key (a padding slot) sees slot 0, so its row stays finite.
    mask4 = mask4 | (~jnp.any(mask4, axis=-1, keepdims=True) & (jnp.arange(mask4.shape[-1]) == 0))
    y = jax.nn.dot_product_attention(q, k, v, mask=mask4, implementation=self.config.implementation)
    return self.o_proj(y.reshape(b, t, -1))

  def __call__(self, x, positions, mask, last: jax.Array | None = None):
    """Prefill: x [B, S, D], positions [B, S], mask [B, S] -> (out [B, S, D], (k, v), last_attn [B, H, S] | None).
    last [B]: the slot of each example's last real query, for the one-row side product."""
    s = x.shape[1]
    q, k, v = self.qkv(x, positions)
    causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
    mask4 = (causal[None] & mask[:, None, :])[:, None]  # [B, 1, S, S]
    out = self.attend(q, k, v, mask4)
    row = None if last is None else self.query_rows(q, k, mask, last[:, None])[:, :, 0]
    return out, (k, v), row

  def query_rows(self, q, k, mask, queries) -> jax.Array:
    """Softmax rows of the query slots queries [B, T] over all keys, per head, fp32 -> [B, H, T, S]: a separate
    small product (q [B, S, H, d], k [B, S, KVH, d] after RoPE); a query sees the real keys up to its own slot."""
    c = self.config
    b, s = mask.shape
    qt = take_rows(q, queries).astype(jnp.float32)  # [B, T, H, d]
    qt = qt.reshape(b, -1, c.num_kv_heads, c.num_heads // c.num_kv_heads, qt.shape[-1])  # kv head j serves j*r..
    logits = jnp.einsum("btgrd,bsgd->bgrts", qt, k.astype(jnp.float32)).reshape(b, c.num_heads, -1, s)
    visible = mask[:, None, :] & (jnp.arange(s)[None, None, :] <= queries[:, :, None])  # [B, T, S]
    return masked_softmax(logits / math.sqrt(c.dim_per_head), visible[:, None])


class DecoderLayer(nn.Module):
  config: LlamaConfig

  def setup(self):
    c = self.config
    self.input_layernorm = RMSNorm(c.rms_norm_eps, c.dtype)
    self.self_attn = LlamaAttention(c)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, c.dtype)
    dense = lambda n, name: nn.Dense(n, use_bias=c.mlp_bias, dtype=c.dtype, name=name)
    self.gate_proj = dense(c.intermediate_size, "gate_proj")
    self.up_proj = dense(c.intermediate_size, "up_proj")
    self.down_proj = dense(c.hidden_size, "down_proj")

  def mlp(self, x):
    return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))

  def __call__(self, x, positions, mask, last=None):
    a, kv, row = self.self_attn(self.input_layernorm(x), positions, mask, last)
    x = x + a
    return x + self.mlp(self.post_attention_layernorm(x)), kv, row

  def query_attn(self, x, positions, mask, queries):
    """This layer's own softmax rows of the query slots queries [B, T] over its input x [B, S, D] (input norm, q/k
    projections and RoPE only; nothing else of the layer runs) -> [B, H, T, S] fp32."""
    q, k, _ = self.self_attn.qkv(self.input_layernorm(x), positions)
    return self.self_attn.query_rows(q, k, mask, queries)

  def step(self, x, position, k_buf, v_buf, slot_mask, index):
    """One decode token: x [B, 1, D], position [B]; writes its k/v at slot `index` and attends to every real slot."""
    attn = self.self_attn
    q, k, v = attn.qkv(self.input_layernorm(x), position[:, None])
    zero = jnp.zeros((), jnp.int32)
    k_buf = jax.lax.dynamic_update_slice(k_buf, k.astype(k_buf.dtype), (zero, index, zero, zero))
    v_buf = jax.lax.dynamic_update_slice(v_buf, v.astype(v_buf.dtype), (zero, index, zero, zero))
    slot_mask = slot_mask | (jnp.arange(slot_mask.shape[1]) == index)[None, :]
    x = x + attn.attend(q, k_buf, v_buf, slot_mask[:, None, None, :])
    return x + self.mlp(self.post_attention_layernorm(x)), k_buf, v_buf, slot_mask


class Llama(nn.Module):
  """Decoder-only LM. `__call__` is the full forward (all logits, no cache); `prefill` / `decode_step` use the
  cache. `reduce`: a prefill-reducer spec resolved through `tokcomp.vlm.get` (None: no pruning)."""
  config: LlamaConfig
  reduce: str | None = None

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, name="embed_tokens")
    self.layers = [DecoderLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, c.dtype)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, name="lm_head")

  def embed(self, ids: jax.Array) -> jax.Array:
    return self.embed_tokens(ids)

  def init_all(self, ids: jax.Array):
    """Touches every parameter (for `init`): embed, full forward without a reducer."""
    mask = jnp.ones(ids.shape, bool)
    aux, _ = self._run(self.embed(ids), default_positions(mask), mask, None, want_kv=False, reduce=False)
    return self.logits(aux["hidden"])

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states [..., D] -> logits [..., V] (fp32)."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def _method(self):
    if self.reduce is None or self.reduce.strip() in ("", "none"):
      return None, None, ()
    from tokcomp import vlm
    method, cfg = vlm.get(self.reduce)
    if method.kind != "prefill":
      raise ValueError(f"Llama reduce={self.reduce!r}: {method.name!r} is a {method.kind!r} reducer; the decoder "
                       f"takes only 'prefill' ones ({', '.join(vlm.names('prefill'))})")
    layers = tuple(getattr(cfg, "layers", ()))
    bad = [l for l in layers if not 0 <= l < self.config.num_layers]
    if not layers or bad:
      raise ValueError(f"Llama reduce={self.reduce!r}: layers {layers} must be non-empty and in "
                       f"[0, {self.config.num_layers - 1}]")
    return method, cfg, layers

  def _run(self, embeds, positions, mask, image_span, want_kv: bool, reduce: bool = True):
    b, s, _ = embeds.shape
    if positions.shape != (b, s) or mask.shape != (b, s):
      raise ValueError(f"Llama positions {positions.shape} and mask {mask.shape} must both be [B, S] = {(b, s)}")
    method, cfg, layers = self._method() if reduce else (None, None, ())
    mask = mask.astype(bool)
    image_mask = None
    if method is not None:
      if image_span is None:
        raise ValueError(f"Llama reduce={self.reduce!r} needs image_span=(start, length) (static)")
      start, length = map(int, image_span)
      if not (0 <= start and 0 < length and start + length <= s):
        raise ValueError(f"Llama image_span={image_span}: must lie inside the sequence of length {s}")
      image_span = (start, length)
      slots = jnp.arange(s)
      image_mask = jnp.broadcast_to((slots >= start) & (slots < start + length), (b, s))
    x = embeds.astype(self.config.dtype)
    origin = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    kvs, masks, aux = [], [], {"keep": {}, "signals": {}}
    row = None
    for l, layer in enumerate(self.layers):
      if l in layers:
        from tokcomp.vlm import PrefillSignals
        sig = PrefillSignals(hidden=x, positions=positions, last_attn=row, image_mask=image_mask,
                             image_span=image_span, layer=l, image_len0=length,
                             **own_attention(layer, method.needs, x, positions, mask, image_span))
        keep = method.apply(sig, config=cfg)
        n = x.shape[1]
        if keep.ndim != 2 or keep.shape[0] != b or not 0 < keep.shape[1] <= n:
          raise ValueError(f"{method.name} returned keep {keep.shape}: must be [B={b}, S'] with 0 < S' <= {n}")
        new_len = keep.shape[1] - (n - image_span[1])
        if not 0 <= new_len <= image_span[1]:
          raise ValueError(f"{method.name} kept {keep.shape[1]} of {n} slots: it must keep all "
                           f"{n - image_span[1]} non-image slots (image_span={image_span})")
        keep = keep.astype(jnp.int32)
        x, positions, mask = take_rows(x, keep), take_rows(positions, keep), take_rows(mask, keep)
        image_mask, origin = take_rows(image_mask, keep), take_rows(origin, keep)
        image_span = (image_span[0], new_len)
        aux["keep"][l], aux["signals"][l] = origin, sig
      last = last_slot(mask) if (l + 1) in layers else None
      x, kv, row = layer(x, positions, mask, last)
      kvs.append(kv)
      masks.append(mask)
    aux.update(hidden=self.norm(x), positions=positions, mask=mask)
    return aux, (kvs, masks) if want_kv else None

  def __call__(self, embeds, positions, mask, image_span=None):
    """Full forward: -> (logits [B, S', V] fp32, aux)."""
    aux, _ = self._run(embeds, positions, mask, image_span, want_kv=False)
    return self.logits(aux["hidden"]), aux

  def prefill(self, embeds, positions, mask, image_span=None, max_new_tokens: int = 0):
    """-> (logits of each example's last real token [B, V], KVCache with max_new_tokens free slots, aux)."""
    aux, (kvs, masks) = self._run(embeds, positions, mask, image_span, want_kv=True)
    grow = lambda a: jnp.pad(a, [(0, 0), (0, max_new_tokens)] + [(0, 0)] * (a.ndim - 2))
    last = last_slot(aux["mask"])
    pos = jnp.where(aux["mask"], aux["positions"], jnp.iinfo(jnp.int32).min).max(axis=1)
    cache = KVCache(k=tuple(grow(k) for k, _ in kvs), v=tuple(grow(v) for _, v in kvs),
                    mask=tuple(grow(m) for m in masks), index=tuple(jnp.int32(m.shape[1]) for m in masks),
                    position=(pos + 1).astype(jnp.int32))
    hidden_last = take_rows(aux["hidden"], last[:, None])[:, 0]
    return self.logits(hidden_last), cache, aux

  def decode_step(self, cache: KVCache, token=None, embeds=None):
    """One token per example: token [B] int or embeds [B, D] -> (logits [B, V], updated cache)."""
    if (token is None) == (embeds is None):
      raise ValueError("decode_step takes exactly one of token= [B] or embeds= [B, D]")
    x = (self.embed_tokens(token) if embeds is None else embeds)[:, None, :].astype(self.config.dtype)
    ks, vs, ms = [], [], []
    for l, layer in enumerate(self.layers):
      x, k, v, m = layer.step(x, cache.position, cache.k[l], cache.v[l], cache.mask[l], cache.index[l])
      ks.append(k), vs.append(v), ms.append(m)
    new = KVCache(k=tuple(ks), v=tuple(vs), mask=tuple(ms), index=tuple(i + 1 for i in cache.index),
                  position=cache.position + 1)
    return self.logits(self.norm(x[:, 0])), new


def own_attention(layer: DecoderLayer, needs, x, positions, mask, image_span) -> dict:
  """The PrefillSignals a method computes with the pruned layer's OWN attention weights on the hidden states
  entering it (before the prune), only those named in `needs`: layer_attn (the last real query's row, PyramidDrop)
  and text_attn (the mean row of the real text queries after the image span, ToDRE stage 2). Side products of
  one or T query rows; the layer's main attention stays fused."""
  out = {}
  if "layer_attn" in needs:
    out["layer_attn"] = layer.query_attn(x, positions, mask, last_slot(mask)[:, None])[:, :, 0]
  if "text_attn" in needs:
    b, s = mask.shape
    end = image_span[0] + image_span[1]
    if end >= s:
      raise ValueError(f"text_attn: no text after the image span {image_span} (sequence length {s})")
    rows = layer.query_attn(x, positions, mask, jnp.broadcast_to(jnp.arange(end, s, dtype=jnp.int32), (b, s - end)))
    w = mask[:, None, end:, None].astype(jnp.float32)  # [B, 1, T, 1]: real text queries
    out["text_attn"] = jnp.sum(rows * w, axis=2) / jnp.maximum(jnp.sum(w, axis=2), 1.0)
  return out


def init_params(model: Llama, rng: jax.Array, seq_len: int = 4):
  """Random parameters for every submodule (embedding, layers, head) of `model`."""
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32), method=Llama.init_all)


def default_positions(mask: jax.Array) -> jax.Array:
  """Right-padded [B, S] mask -> positions 0..S-1 (padding slots get positions too; they are masked anyway)."""
  return jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)


def prefill(model: Llama, params, embeds=None, positions=None, mask=None, *, tokens=None, image_span=None,
            max_new_tokens: int = 0):
  """Functional form of `Llama.prefill`; `tokens` [B, S] instead of embeds embeds them first. Jit it with the
  model, image_span and max_new_tokens static (e.g. functools.partial)."""
  if (tokens is None) == (embeds is None):
    raise ValueError("prefill takes exactly one of embeds= [B, S, D] or tokens= [B, S]")
  if embeds is None:
    embeds = model.apply(params, tokens, method=Llama.embed)
  if mask is None:
    mask = jnp.ones(embeds.shape[:2], bool)
  if positions is None:
    positions = default_positions(mask)
  return model.apply(params, embeds, positions, mask, image_span, max_new_tokens, method=Llama.prefill)


def decode_step(model: Llama, params, cache: KVCache, token=None, embeds=None):
  return model.apply(params, cache, token, embeds, method=Llama.decode_step)


@functools.partial(jax.jit, static_argnames=("model", "steps", "image_span"))
def greedy_generate(model: Llama, params, embeds, positions, mask, *, steps: int, image_span=None):
  """Greedy decoding: prefill, then `steps - 1` cached decode steps under lax.scan -> tokens [B, steps]."""
  if steps < 1:
    raise ValueError(f"greedy_generate steps={steps}: must be >= 1")
  logits, cache, _ = model.apply(params, embeds, positions, mask, image_span, steps - 1, method=Llama.prefill)
  first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def body(carry, _):
    tok, cache = carry
    logits, cache = model.apply(params, cache, tok, method=Llama.decode_step)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (nxt, cache), nxt

  _, rest = jax.lax.scan(body, (first, cache), None, length=steps - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1)

"""Visual-token reducers for vision-language models: the signals they read and a registry by name.

Two kinds, both static-shape, batched (B > 1) and selectable by a config string ("visionzip:dominant=54,
contextual=10", "fastv:k=2,keep=0.5"):

  * pre-LLM ("visual"): act on the vision tower's output before the projector.
      reduce(signals: VisualSignals, *, config) -> Tokens   (x [B, M, D] with a static M; `index` maps every
      original tower token (prefix + patches) to its output slot, or -1 if dropped, as in `tokcomp.tokens`)
  * in-LLM ("prefill"): act inside the decoder's prefill at one or more layers; they choose which sequence
    positions survive, and the decoder gathers its hidden states, RoPE position ids and KV cache.
      select(signals: PrefillSignals, *, config) -> keep [B, S'] int32, ascending positions (static S')
    The config has `layers: tuple[int, ...]`, the decoder layers before which `apply` runs (one call per layer,
    `signals.layer` says which), and every non-image slot is kept (the decoder derives the new image span).

Every method file registers a `Method`; modules in this package are imported on first use of `get`.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import jax
from flax import struct

from tokcomp.reducers import parse_args


@struct.dataclass
class VisualSignals:
  """What the vision tower hands to a pre-LLM reducer. Fields nobody asked for are None.

  x         [B, N, D]     the feature layer's output (LLaVA's `select_layer`, e.g. -2), prefix first; N = P + h*w
  cls_attn  [B, L, H, N]  the CLS row of the softmax attention of every tower layer that ran (fp32; L = number of
                          layers run, so cls_attn[:, -1] is the feature layer's); computed as an O(N) side product
  cls_logits [B, L, H, N] the same CLS rows BEFORE the softmax (q_cls k^T / sqrt(d), per head, fp32); optional
                          (GlobalCom²'s official scores are their head mean); the tower fills it like cls_attn
  keys      [B, N, d]     the feature layer's keys (k projection incl. bias, before query scaling), head-mean
  attn      [B, H, N, N]  the feature layer's full softmax attention (fp32); only for methods that need columns
  text      [B, T, E]     text / query embeddings (query-aware methods), with text_mask [B, T]
  thumbnail               a second VisualSignals for AnyRes inputs (GlobalCom²): the global thumbnail view,
                          while this one holds the crops stacked on the token axis
  num_prefix              static: prefix tokens (1 for CLIP's CLS, 0 for SigLIP)
  grid                    static: (h, w) patch grid of one view
  """
  x: jax.Array
  cls_attn: jax.Array | None = None
  keys: jax.Array | None = None
  cls_logits: jax.Array | None = None
  attn: jax.Array | None = None
  text: jax.Array | None = None
  text_mask: jax.Array | None = None
  thumbnail: "VisualSignals | None" = None
  num_prefix: int = struct.field(pytree_node=False, default=1)
  grid: tuple[int, int] | None = struct.field(pytree_node=False, default=None)


@struct.dataclass
class PrefillSignals:
  """What the decoder hands to an in-LLM reducer at the layer where it runs.

  hidden     [B, S, D]  the hidden states entering the layer
  positions  [B, S]     their RoPE position ids (original positions survive earlier prunes)
  last_attn  [B, H, S]  the attention of the last (text) query over all keys at the previous layer, fp32,
                        computed as a separate one-row product so the main attention stays fused
  layer_attn [B, H, S]  the last real query's row computed with THIS layer's own input norm, q/k and RoPE on
                        `hidden` (before the prune), fp32; filled only if the method's `needs` names it (PyramidDrop)
  text_attn  [B, H, S]  the same layer's rows of the real text queries after the image span, averaged over them,
                        fp32; only on request (ToDRE stage 2). Both are side products (`llm.own_attention`)
  image_mask [B, S]     which positions hold visual tokens
  image_span            static (start, length) of the visual tokens in the current sequence
  image_len0            static: the visual tokens before any prune (the first image_span's length)
  layer                 static: the decoder layer index
  """
  hidden: jax.Array
  positions: jax.Array
  last_attn: jax.Array | None = None
  image_mask: jax.Array | None = None
  layer_attn: jax.Array | None = None
  text_attn: jax.Array | None = None
  image_span: tuple[int, int] | None = struct.field(pytree_node=False, default=None)
  layer: int = struct.field(pytree_node=False, default=0)
  image_len0: int | None = struct.field(pytree_node=False, default=None)


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  kind: str                                    # "visual" (pre-LLM) or "prefill" (in-LLM)
  parse: Callable[[dict[str, Any]], Any]       # parsed key=value args -> a frozen config (ValueError on bad input)
  apply: Callable[..., Any]                    # visual: (VisualSignals, *, config) -> Tokens;
                                               # prefill: (PrefillSignals, *, config) -> keep [B, S']
  out_count: Callable[[Any, int], int]         # config, input count (patches for visual, image tokens for
                                               # prefill) -> tokens out (static)
  needs: tuple[str, ...] = ()                  # VisualSignals / PrefillSignals fields it reads
  example: str = ""                            # a small valid spec for the contract tests


_REGISTRY: dict[str, Method] = {}
_IMPORTED = False


def register(method: Method) -> Method:
  if method.kind not in ("visual", "prefill"):
    raise ValueError(f"vlm.Method.kind={method.kind!r}: must be 'visual' or 'prefill'")
  if method.name in _REGISTRY:
    raise ValueError(f"VLM reducer {method.name!r} is registered twice")
  _REGISTRY[method.name] = method
  return method


def _import_methods() -> None:
  global _IMPORTED
  if not _IMPORTED:
    _IMPORTED = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
      importlib.import_module(f"{__name__}.{info.name}")


def names(kind: str | None = None) -> list[str]:
  _import_methods()
  return sorted(n for n, m in _REGISTRY.items() if kind is None or m.kind == kind)


def get(spec: str) -> tuple[Method, Any]:
  """"visionzip:dominant=54,contextual=10" -> (Method, config)."""
  _import_methods()
  name, args = parse_args(spec)
  if name not in _REGISTRY:
    raise ValueError(f"unknown VLM reducer {name!r} in {spec!r}; registered: {', '.join(names())}")
  method = _REGISTRY[name]
  return method, method.parse(args)

"""A LLaVA-style vision-language test bed: CLIP vision tower -> pre-LLM reducer -> projector -> Llama decoder.

CLIP vision tower (Radford et al., ICML 2021, arXiv:2103.00020; HF `CLIPVisionModel` numerics): a bias-free conv
patch embedding, a learned CLS token and learned position embeddings over CLS + patches, `pre_layrnorm`, then
pre-LN blocks (LayerNorm eps 1e-5, quick_gelu MLP x*sigmoid(1.702x) for OpenAI weights). The blocks are the
foundation ViT's `Encoder1DBlock` (models/vit.py) with `ln_eps`/`mlp_act` set, not a second transformer.
`post_layernorm` acts only on HF's pooled output, which LLaVA never reads, so it is not part of the tower.

Feature layer (LLaVA, Liu et al., NeurIPS 2023, arXiv:2304.08485 and LLaVA-1.5, arXiv:2310.03744 §3):
`select_layer` indexes HF's `hidden_states` tuple (index 0 = the embeddings after pre_layrnorm, i = the output of
layer i), so -2 is the output of the second-to-last layer. Only the layers up to it run. The tower returns
`tokcomp.vlm.VisualSignals` with x = that layer's output (CLS first) and, when asked by `signals=`:
  cls_attn [B, L, H, N]  the CLS row of the softmax attention of every layer run (an O(N) side product)
  keys     [B, N, d]     the feature layer's k projection (incl. bias, before query scaling), mean over heads
  attn     [B, H, N, N]  the feature layer's full softmax attention (an O(N^2) side product; only when asked)
The main attention product stays fused (`jax.nn.dot_product_attention`) in every case.

Parity: `tests/test_clip_tower.py` against `tests/goldens/clip_tiny` (HF transformers 4.46.3 CLIPVisionModel,
written by tools/goldens/make_clip.py): hidden_states[-2] and [-1], every layer's CLS attention row, the feature
layer's full attention and head-mean keys at 1e-5.

`VLM` (LLaVA-1.5's layout): tower -> optional pre-LLM reducer (a "visual" spec through `tokcomp.vlm.get`; it gets
exactly the signals its `needs` lists) -> projector (mlp2x_gelu: Linear, exact GELU, Linear) -> input embeddings
[system ids, M image tokens, user ids] with a STATIC image span (M = the reducer's out_count; without a reducer
LLaVA's "patch" feature select drops CLS) -> `models.llm.Llama` prefill (its `reduce` is the in-LLM "prefill"
spec) -> greedy decoding. One jit per (VLM, input shapes, steps): the specs are static fields. Not modelled:
AnyRes (LLaVA-NeXT crops + thumbnail; reducers that need `thumbnail` are refused), image newline tokens, the
tokenizer / chat template (the caller passes ids), and HF's pooled output.
Tests: tests/test_vlm.py (B=3 equals three B=1 runs; one compile per spec pair; image-token count = out_count for
every registered visual reducer; the projected reducer output sits in the span; bad specs).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp import vlm as vlm_registry
from tokcomp.attention import Implementation
from tokcomp.models import llm as llm_lib
from tokcomp.models.llm import Llama
from tokcomp.models.vit import Encoder1DBlock, patch_grid
from tokcomp.tokens import Tokens
from tokcomp.vlm import VisualSignals

TOWER_SIGNALS = ("cls_attn", "keys", "attn")  # VisualSignals fields the tower can fill besides x


def feature_layers(select_layer: int, depth: int) -> int:
  """How many tower layers run for LLaVA's `select_layer` (an index into HF's hidden_states, depth + 1 long)."""
  if not -depth <= select_layer <= depth or select_layer == 0:
    raise ValueError(f"CLIPVisionTower.select_layer={select_layer}: must index hidden_states of a {depth}-layer "
                     f"tower past the embeddings, i.e. in [-{depth}, -1] or [1, {depth}] (LLaVA uses -2)")
  return select_layer if select_layer > 0 else depth + 1 + select_layer


class CLIPVisionTower(nn.Module):
  """images [B, H, W, C] (already CLIP-normalised) -> VisualSignals of the feature layer.

  depth is the checkpoint's layer count (select_layer counts from it); only `num_layers` blocks have params.
  """
  patch_size: Sequence[int] = (14, 14)
  width: int = 1024
  depth: int = 24
  mlp_dim: int = 4096
  num_heads: int = 16
  select_layer: int = -2
  mlp_act: str = "quick_gelu"
  ln_eps: float = 1e-5
  attn_impl: Implementation = None
  dtype: Any = jnp.float32

  num_prefix = 1  # CLS

  @property
  def num_layers(self) -> int:
    return feature_layers(self.select_layer, self.depth)

  def grid(self, image_hw: Sequence[int]) -> tuple[int, int]:
    return patch_grid(image_hw, self.patch_size, "CLIPVisionTower")

  def num_tokens(self, image_hw: Sequence[int]) -> int:
    gh, gw = self.grid(image_hw)
    return self.num_prefix + gh * gw

  @nn.compact
  def __call__(self, images: jax.Array, *, signals: Sequence[str] = ("cls_attn", "keys")) -> VisualSignals:
    signals = tuple(signals)
    unknown = sorted(set(signals) - set(TOWER_SIGNALS))
    if unknown:
      raise ValueError(f"CLIPVisionTower signals={unknown} unknown; valid: {TOWER_SIGNALS}")
    if self.width % self.num_heads:
      raise ValueError(f"CLIPVisionTower.num_heads={self.num_heads} must divide width={self.width}")
    if images.ndim != 4:
      raise ValueError(f"CLIPVisionTower input shape {images.shape}: must be [B, H, W, C]")
    n_layers = self.num_layers
    gh, gw = self.grid(images.shape[1:3])
    b = images.shape[0]
    x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                use_bias=False, dtype=self.dtype, name="embedding")(images)
    x = x.reshape(b, gh * gw, self.width)
    cls = self.param("cls", nn.initializers.normal(self.width ** -0.5), (1, 1, self.width))
    n_pos = 1 + gh * gw
    if self.has_variable("params", "pos_embedding") and (
        self.get_variable("params", "pos_embedding").shape[1] != n_pos):
      raise ValueError(f"pos_embedding has {self.get_variable('params', 'pos_embedding').shape[1]} positions but a "
                       f"{images.shape[1]}x{images.shape[2]} image needs {n_pos}: load the checkpoint with "
                       f"image_size= (tokcomp.checkpoints.hf_clip.load resamples it)")
    posemb = self.param("pos_embedding", nn.initializers.normal(0.02), (1, n_pos, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
    x = x + posemb.astype(x.dtype)
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="pre_norm")(x)

    tokens = Tokens.create(x, self.num_prefix, grid=(gh, gw))
    rows, last = [], None
    for i in range(n_layers):
      wanted = ("cls_attn",) if "cls_attn" in signals else ()
      if i == n_layers - 1:
        wanted += (("keys_mean",) if "keys" in signals else ()) + (("attn",) if "attn" in signals else ())
      block = Encoder1DBlock(self.num_heads, self.mlp_dim, attn_impl=self.attn_impl, dtype=self.dtype,
                             ln_eps=self.ln_eps, mlp_act=self.mlp_act, return_signals=wanted,
                             name=f"encoderblock_{i}")
      if wanted:
        tokens, last = block(tokens)
        if last.cls_attn is not None:
          rows.append(last.cls_attn)
      else:
        tokens = block(tokens)
    return VisualSignals(
        x=tokens.x,
        cls_attn=jnp.stack(rows, axis=1) if rows else None,  # [B, L, H, N]
        keys=last.keys_mean if "keys" in signals else None,
        attn=last.attn if "attn" in signals else None,
        num_prefix=self.num_prefix, grid=(gh, gw))


# ----------------------------------------------------------------------------------------------------------------
# The LLaVA-style assembly.

class Projector(nn.Module):
  """LLaVA-1.5's `mlp2x_gelu` projector: Linear -> GELU (exact erf, torch nn.GELU) -> Linear."""
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.out_dim, dtype=self.dtype, name="Dense_0")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="Dense_1")(x)


@dataclasses.dataclass(frozen=True)
class VLM:
  """CLIP tower -> optional pre-LLM reducer -> projector -> [system text, image tokens, user text] -> Llama.

  tower   the CLIPVisionTower (its select_layer picks the feature layer)
  llm     the Llama decoder; its `reduce` is the in-LLM (prefill) reducer spec, e.g. "fastv:k=2,keep=0.5"
  visual  the pre-LLM reducer spec ("visionzip:dominant=54,contextual=10"), or None
  select_feature  without a reducer: "patch" drops CLS (LLaVA's default), "cls_patch" keeps it. With a reducer the
          reducer's output is used as is (VisionZip keeps CLS, as its reference bypasses LLaVA's feature select;
          DivPrune and FasterVLM return patches only), so it must stay "patch".

  params = {"vision_tower": ..., "projector": ..., "language_model": ...} (each a module's "params" collection).
  Sequence layout, the same for every example: system ids [B, Ts] at 0..Ts-1, the M image tokens at Ts..Ts+M-1
  (a static span, M = the reducer's out_count), the user ids [B, Tu] after them, right-padded with `user_mask`.
  RoPE positions are the slot indices (a reducer's masked image slot, if any, keeps its position and is masked).
  The tower computes only the signals the pre-LLM reducer lists in `needs`; `text` (query-aware methods) is the
  LLM's input embeddings of the user ids with `text_mask` = user_mask.
  """
  tower: CLIPVisionTower
  llm: Llama
  visual: str | None = None
  select_feature: str = "patch"

  def __post_init__(self):
    if self.select_feature not in ("patch", "cls_patch"):
      raise ValueError(f"VLM.select_feature={self.select_feature!r}: must be 'patch' or 'cls_patch'")
    method, cfg = self.visual_method()
    if method is not None:
      if self.select_feature != "patch":
        raise ValueError(f"VLM.select_feature={self.select_feature!r} with visual={self.visual!r}: the reducer "
                         f"decides which tokens (and whether CLS) go on; leave select_feature='patch'")
      unknown = sorted(set(method.needs) - set(TOWER_SIGNALS) - {"text", "text_mask"})
      if unknown:
        raise ValueError(f"VLM visual={self.visual!r} needs VisualSignals {unknown}, which this test bed does not "
                         f"provide (a single-view CLIP tower: {TOWER_SIGNALS + ('text',)})")
    if self.llm.reduce is not None and self.llm.reduce.strip() not in ("", "none"):
      pm, _ = vlm_registry.get(self.llm.reduce)
      if pm.kind != "prefill":
        raise ValueError(f"VLM llm.reduce={self.llm.reduce!r}: {pm.name!r} is a {pm.kind!r} reducer; the decoder "
                         f"takes 'prefill' ones ({', '.join(vlm_registry.names('prefill'))})")

  def visual_method(self):
    if self.visual is None or self.visual.strip() in ("", "none"):
      return None, None
    method, cfg = vlm_registry.get(self.visual)
    if method.kind != "visual":
      raise ValueError(f"VLM visual={self.visual!r}: {method.name!r} is a {method.kind!r} reducer; the pre-LLM "
                       f"slot takes 'visual' ones ({', '.join(vlm_registry.names('visual'))})")
    return method, cfg

  def num_image_tokens(self, image_hw: Sequence[int]) -> int:
    """Static count of image tokens entering the LLM for an image size."""
    n = self.tower.num_tokens(image_hw) - self.tower.num_prefix  # patches
    method, cfg = self.visual_method()
    if method is None:
      return n + (self.tower.num_prefix if self.select_feature == "cls_patch" else 0)
    return method.out_count(cfg, n)

  def init(self, rng: jax.Array, image_hw: Sequence[int] = (56, 56), channels: int = 3) -> dict[str, Any]:
    r1, r2, r3 = jax.random.split(rng, 3)
    tower = self.tower.init(r1, jnp.zeros((1, *image_hw, channels)), signals=())["params"]
    proj = Projector(self.llm.config.hidden_size, dtype=self.llm.config.dtype).init(
        r2, jnp.zeros((1, 1, self.tower.width)))["params"]
    llm_params = llm_lib.init_params(self.llm.clone(reduce=None), r3)["params"]
    return {"vision_tower": tower, "projector": proj, "language_model": llm_params}

  def encode_image(self, params, images: jax.Array, text: jax.Array | None = None,
                   text_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Tokens | None]:
    """images [B, H, W, C] -> (image embeddings [B, M, D_llm], their mask [B, M], the reducer's Tokens or None)."""
    method, cfg = self.visual_method()
    wanted = () if method is None else tuple(s for s in TOWER_SIGNALS if s in method.needs)
    signals = self.tower.apply({"params": params["vision_tower"]}, images, signals=wanted)
    tokens = None
    if method is None:
      x = signals.x[:, self.tower.num_prefix:] if self.select_feature == "patch" else signals.x
      mask = jnp.ones(x.shape[:2], bool)
    else:
      if "text" in method.needs:
        signals = signals.replace(text=text, text_mask=text_mask)
      tokens = method.apply(signals, config=cfg)
      n = signals.x.shape[1] - signals.num_prefix
      expected = method.out_count(cfg, n)
      if tokens.x.shape[1] != expected:
        raise ValueError(f"VLM visual={self.visual!r}: the reducer returned {tokens.x.shape[1]} tokens but its "
                         f"out_count says {expected} (for {n} patches)")
      x, mask = tokens.x, tokens.mask
    embeds = Projector(self.llm.config.hidden_size, dtype=self.llm.config.dtype).apply(
        {"params": params["projector"]}, x)
    return embeds, mask, tokens

  def inputs(self, params, images, system_ids, user_ids, user_mask=None) -> dict[str, Any]:
    """-> {embeds [B, S, D], positions [B, S], mask [B, S], image_span (static), tokens (the reducer's)}."""
    b = images.shape[0]
    system_ids, user_ids = _batched_ids(system_ids, b, "system_ids"), _batched_ids(user_ids, b, "user_ids")
    user_mask = jnp.ones(user_ids.shape, bool) if user_mask is None else jnp.asarray(user_mask, bool)
    if user_mask.shape != user_ids.shape:
      raise ValueError(f"VLM user_mask shape {user_mask.shape}: must match user_ids {user_ids.shape}")
    embed = lambda ids: self.llm.apply({"params": params["language_model"]}, ids, method=Llama.embed)
    user = embed(user_ids)
    image, image_mask, tokens = self.encode_image(params, images, text=user, text_mask=user_mask)
    system = embed(system_ids)
    embeds = jnp.concatenate([system, image.astype(system.dtype), user], axis=1)
    mask = jnp.concatenate([jnp.ones(system_ids.shape, bool), image_mask, user_mask], axis=1)
    positions = llm_lib.default_positions(mask)
    return dict(embeds=embeds, positions=positions, mask=mask, image_span=(system_ids.shape[1], image.shape[1]),
                tokens=tokens)

  def prefill(self, params, images, system_ids, user_ids, user_mask=None, *, max_new_tokens: int = 0):
    """-> (logits of each example's last real token [B, V], KVCache, aux of the decoder + "image_span")."""
    inp = self.inputs(params, images, system_ids, user_ids, user_mask)
    logits, cache, aux = self.llm.apply({"params": params["language_model"]}, inp["embeds"], inp["positions"],
                                        inp["mask"], inp["image_span"], max_new_tokens, method=Llama.prefill)
    return logits, cache, {**aux, "image_span": inp["image_span"]}

  def generate(self, params, images, system_ids, user_ids, user_mask=None, *, steps: int) -> jax.Array:
    """Greedy decoding of `steps` tokens -> [B, steps] int32. Jitted: one compile per (VLM, shapes, steps)."""
    return _generate(self, params, images, system_ids, user_ids, user_mask, steps=steps)


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _generate(model: VLM, params, images, system_ids, user_ids, user_mask, *, steps: int) -> jax.Array:
  if steps < 1:
    raise ValueError(f"VLM.generate steps={steps}: must be >= 1")
  inp = model.inputs(params, images, system_ids, user_ids, user_mask)
  return llm_lib.greedy_generate(model.llm, {"params": params["language_model"]}, inp["embeds"], inp["positions"],
                                 inp["mask"], steps=steps, image_span=inp["image_span"])


def _batched_ids(ids, b: int, what: str) -> jax.Array:
  ids = jnp.asarray(ids, jnp.int32)
  if ids.ndim == 1:
    ids = jnp.broadcast_to(ids, (b, ids.shape[0]))
  if ids.ndim != 2 or ids.shape[0] != b or ids.shape[1] < 1:
    raise ValueError(f"VLM {what} shape {ids.shape}: must be [T] or [B={b}, T] with T >= 1")
  return ids

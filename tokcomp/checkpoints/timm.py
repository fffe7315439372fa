"""timm / DeiT ViT state dicts (`timm.models.vision_transformer.VisionTransformer`) -> tokcomp ViT params.

Transposed or reshaped keys (torch Linear is [out, in]; flax Dense is [in, out]):
  patch_embed.proj.weight [D, C, p, p] -> embedding/kernel [p, p, C, D]
  blocks.i.attn.qkv.weight [3D, D]     -> query|key|value/kernel [D, H, d]  (rows q;k;v, heads major)
  blocks.i.attn.proj.weight [D, D]     -> out/kernel [H, d, D]
  every other Linear .weight [o, i]    -> kernel [i, o]

DynamicViT checkpoints (raoyongming/DynamicViT: the same keys plus `score_predictor.<k>.*`) load into the
`dynamicvit` modules of the model's schedule, the k-th predictor into the k-th DynamicViT block; pass the
schedule as `reduce="dynamicvit:keep=ρ,layers=..."` (a checkpoint does not record ρ or the layers).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from tokcomp.checkpoints.common import heads_for, resample_posemb, square_side, unflatten
from tokcomp.models import vit

PROBE = "patch_embed.proj.weight"
# timm features tokcomp's ViT does not have; loading them would silently change the numbers.
UNSUPPORTED = {
    r"\.ls[12]\.gamma$": "LayerScale (ls1/ls2)",
    r"\.attn\.[qk]_norm\.": "qk-norm",
    r"^norm_pre\.": "a pre-norm (CLIP-style norm_pre)",
    r"\.attn\.norm\.": "a post-attention norm",
    r"^attn_pool\.": "an attention-pool (MAP) head",
    r"\.mlp\.norm\.": "an MLP norm",
}


def _block_ids(arrays: Mapping[str, np.ndarray]) -> list[int]:
  ids = {int(m.group(1)) for k in arrays if (m := re.match(r"blocks\.(\d+)\.", k))}
  if ids != set(range(len(ids))):
    raise ValueError(f"timm checkpoint: block indices {sorted(ids)} are not 0..{len(ids) - 1}")
  return sorted(ids)


def convert(arrays: Mapping[str, np.ndarray], *, num_heads: int | None = None,
            image_size: int | tuple[int, int] | None = None, **overrides: Any) -> tuple[vit.ViT, dict]:
  """A timm state dict -> (ViT, params). The model config is read off the shapes."""
  for pattern, what in UNSUPPORTED.items():
    hits = [k for k in arrays if re.search(pattern, k)]
    if hits:
      raise ValueError(f"timm checkpoint uses {what} ({hits[0]}), which tokcomp's ViT does not implement")
  a = dict(arrays)
  w_embed = a.pop("patch_embed.proj.weight")  # [D, C, p, p]
  width, _, ph, pw = w_embed.shape
  depth = len(_block_ids(a))
  heads = heads_for(width, num_heads)
  hd = width // heads
  class_token, distilled = "cls_token" in a, "dist_token" in a
  num_registers = a["reg_token"].shape[1] if "reg_token" in a else 0
  fc_norm = "fc_norm.weight" in a
  num_prefix = int(class_token) + int(distilled) + num_registers
  pos = a.pop("pos_embed")  # [1, n, D]
  posemb_prefix = square_side_or_none(pos.shape[1]) is None  # timm's no_embed_class: patches only
  n_patches = pos.shape[1] - (num_prefix if posemb_prefix else 0)
  side = square_side(n_patches, "timm pos_embed")
  num_classes = a["head.weight"].shape[0] if "head.weight" in a else 0
  if num_classes == 0:
    raise ValueError("timm checkpoint has no classifier (head.weight); tokcomp's ViT needs one")
  config = dict(num_classes=num_classes, patch_size=(ph, pw), width=width, depth=depth,
                mlp_dim=a["blocks.0.mlp.fc1.weight"].shape[0], num_heads=heads, class_token=class_token,
                distilled=distilled, num_registers=num_registers, pool="gap" if (fc_norm or not class_token) else
                "token", posemb_prefix=posemb_prefix, fc_norm=fc_norm)
  model = vit.ViT(**{**config, **overrides})

  lin = lambda k: (np.ascontiguousarray(a.pop(k + ".weight").T), a.pop(k + ".bias"))
  out: dict[str, np.ndarray] = {}

  def dense(name, key):
    out[name + "/kernel"], out[name + "/bias"] = lin(key)

  def norm(name, key):
    out[name + "/scale"], out[name + "/bias"] = a.pop(key + ".weight"), a.pop(key + ".bias")

  out["embedding/kernel"] = np.ascontiguousarray(w_embed.transpose(2, 3, 1, 0))
  out["embedding/bias"] = a.pop("patch_embed.proj.bias")
  for key, name in (("cls_token", "cls"), ("dist_token", "dist"), ("reg_token", "reg")):
    if key in a:
      out[name] = a.pop(key)
  if image_size is not None:
    new = vit.ViT(**{**config, **overrides}).grid(_pair(image_size))
    pos = resample_posemb(pos, (side, side), new, num_prefix if posemb_prefix else 0)
  out["pos_embedding"] = pos
  for i in range(depth):
    t, s = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    norm(s + "LayerNorm_0", t + "norm1")
    norm(s + "LayerNorm_1", t + "norm2")
    qkv_w, qkv_b = a.pop(t + "attn.qkv.weight"), a.pop(t + "attn.qkv.bias")  # [3D, D], [3D]
    # These are sliced and reshaped before the model check, so a bad shape must be named here.
    _expect_shape(t + "attn.qkv.weight", qkv_w, (3 * width, width))
    _expect_shape(t + "attn.qkv.bias", qkv_b, (3 * width,))
    _expect_shape(t + "attn.proj.weight", a[t + "attn.proj.weight"], (width, width))
    for j, name in enumerate(("query", "key", "value")):
      out[f"{s}MultiHeadDotProductAttention_0/{name}/kernel"] = np.ascontiguousarray(
          qkv_w[j * width:(j + 1) * width].T.reshape(width, heads, hd))
      out[f"{s}MultiHeadDotProductAttention_0/{name}/bias"] = qkv_b[j * width:(j + 1) * width].reshape(heads, hd)
    proj_w, proj_b = lin(t + "attn.proj")
    out[s + "MultiHeadDotProductAttention_0/out/kernel"] = proj_w.reshape(heads, hd, width)
    out[s + "MultiHeadDotProductAttention_0/out/bias"] = proj_b
    dense(s + "MlpBlock_0/Dense_0", t + "mlp.fc1")
    dense(s + "MlpBlock_0/Dense_1", t + "mlp.fc2")
  if fc_norm:
    norm("fc_norm", "fc_norm")
    if "norm.weight" in a:  # timm keeps an Identity `norm` when fc_norm is used; drop a stray one loudly
      raise ValueError("timm checkpoint has both norm and fc_norm weights; expected one")
  else:
    norm("Transformer/encoder_norm", "norm")
  dense("head", "head")
  if distilled:
    dense("head_dist", "head_dist")
  _dynamicvit_predictors(a, model, out)
  if a:
    raise ValueError(f"timm checkpoint: keys tokcomp does not know how to load: {sorted(a)[:10]}")
  return model, unflatten(out)


def _dynamicvit_predictors(a: dict, model: vit.ViT, out: dict) -> None:
  """Moves DynamicViT's `score_predictor.<k>` (PredictorLG) weights to the k-th dynamicvit block of the model."""
  from tokcomp import reducers
  ids = sorted({int(m.group(1)) for k in a if (m := re.match(r"score_predictor\.(\d+)\.", k))})
  if not ids:
    return
  blocks = [i for i, st in enumerate(reducers.build_schedule(model.reduce, model.depth))
            if st is not None and st.method == "dynamicvit"]
  if len(blocks) != len(ids) or ids != list(range(len(ids))):
    raise ValueError(f"timm checkpoint has {len(ids)} DynamicViT predictors (score_predictor.*) but the model's "
                     f"reduce={model.reduce!r} has {len(blocks)} dynamicvit blocks: pass "
                     f"reduce='dynamicvit:keep=<rho>,layers=<{len(ids)} block indices>' (DynamicViT's DeiT: 3-6-9)")
  lin = lambda k: (np.ascontiguousarray(a.pop(k + ".weight").T), a.pop(k + ".bias"))
  for k, block in zip(ids, blocks):
    t, s = f"score_predictor.{k}.", f"Transformer/encoderblock_{block}/dynamicvit/predictor/"
    out[s + "in_norm/scale"], out[s + "in_norm/bias"] = a.pop(t + "in_conv.0.weight"), a.pop(t + "in_conv.0.bias")
    for name, key in (("in_dense", "in_conv.1"), ("out_dense_0", "out_conv.0"), ("out_dense_1", "out_conv.2"),
                      ("out_dense_2", "out_conv.4")):
      out[s + name + "/kernel"], out[s + name + "/bias"] = lin(t + key)


def _expect_shape(key: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
  if tuple(np.shape(array)) != shape:
    raise ValueError(f"checkpoint does not fit the model:\n  shape {key}: checkpoint {tuple(np.shape(array))} "
                     f"vs model {shape}")


def square_side_or_none(n: int) -> int | None:
  side = int(round(n ** 0.5))
  return side if side * side == n else None


def _pair(s):
  return (s, s) if isinstance(s, int) else tuple(s)

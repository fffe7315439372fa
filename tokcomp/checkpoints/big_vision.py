"""big_vision and AugReg (google-research/vision_transformer, "vit_jax") .npz -> tokcomp ViT params.

tokcomp's module names are big_vision's, so big_vision files map one to one. The older vit_jax layout (the
AugReg releases that timm loads) differs only in names and in where the position embedding lives:
  vit_jax                                           tokcomp / big_vision
  Transformer/posembed_input/pos_embedding [1,1+hw,D] pos_embedding (covers CLS: posemb_prefix=True)
  .../MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3   .../MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0
Keys may sit under `params/` (big_vision) or `opt/target/` (vit_jax training checkpoints).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from tokcomp.checkpoints.common import heads_for, resample_posemb, square_side, unflatten
from tokcomp.models import vit

PREFIXES = ("", "params/", "opt/target/")
RENAMES = (("MultiHeadDotProductAttention_1/", "MultiHeadDotProductAttention_0/"),
           ("LayerNorm_2/", "LayerNorm_1/"), ("MlpBlock_3/", "MlpBlock_0/"))


def find_prefix(arrays: Mapping[str, np.ndarray]) -> str | None:
  for p in PREFIXES:
    if p + "embedding/kernel" in arrays:
      return p
  return None


def convert(arrays: Mapping[str, np.ndarray], *, num_heads: int | None = None,
            image_size: int | tuple[int, int] | None = None, **overrides: Any) -> tuple[vit.ViT, dict]:
  prefix = find_prefix(arrays)
  a = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  for bad, what in (("pre_logits/kernel", "a pre-logits representation layer"), ("MAPHead_0/", "a MAP head")):
    if any(k.startswith(bad) for k in a):
      raise ValueError(f"big_vision checkpoint has {what} ({bad}), which tokcomp's ViT does not implement")
  out: dict[str, np.ndarray] = {}
  for k, v in a.items():
    if k == "Transformer/posembed_input/pos_embedding":
      k = "pos_embedding"
    for old, new in RENAMES:
      k = k.replace(old, new)
    out[k] = v
  ph, pw, _, width = out["embedding/kernel"].shape
  depth = len({m.group(1) for k in out if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
  heads = out["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"].shape[1]
  if num_heads is not None and num_heads != heads:
    raise ValueError(f"num_heads={num_heads}, but the checkpoint's attention kernels have {heads} heads")
  heads_for(width, heads)
  class_token = "cls" in out
  num_prefix = int(class_token)
  pos = out["pos_embedding"]
  side_all = int(round(pos.shape[1] ** 0.5))
  posemb_prefix = class_token and side_all * side_all != pos.shape[1]  # vit_jax: covers CLS; big_vision: not
  side = square_side(pos.shape[1] - (num_prefix if posemb_prefix else 0), "big_vision pos_embedding")
  config = dict(num_classes=out["head/kernel"].shape[1], patch_size=(ph, pw), width=width, depth=depth,
                mlp_dim=out["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1], num_heads=heads,
                class_token=class_token, pool="token" if class_token else "gap", posemb_prefix=posemb_prefix)
  model = vit.ViT(**{**config, **overrides})
  if image_size is not None:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    out["pos_embedding"] = resample_posemb(pos, (side, side), model.grid(size), num_prefix if posemb_prefix else 0)
  return model, unflatten(out)

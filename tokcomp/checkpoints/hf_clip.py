"""HF `CLIPVisionModel` / `CLIPModel` safetensors (+ config.json) -> tokcomp's CLIPVisionTower, without torch.

  tower, params = hf_clip.load("clip-vit-large-patch14-336/")           # a directory: *.safetensors + config.json
  tower, params = hf_clip.load("model.safetensors", select_layer=-2)     # config.json beside the file
  signals = tower.apply(params, images)                                  # images NHWC, CLIP-normalised

Only keys under the vision prefix (`vision_model.`, or `<anything>.vision_model.` as in llava-hf checkpoints) are
read; a CLIPModel's text tower, projections and logit scale are outside it and ignored. Inside it every key must
be known: the layers past the feature layer (`select_layer`) and `post_layernorm` (HF's pooled output, unused by
LLaVA) are skipped on purpose, `embeddings.position_ids` is a buffer; anything else is an error naming the key.

Key mapping (torch Linear is [out, in]; flax Dense is [in, out]):
  embeddings.patch_embedding.weight [D, C, p, p] -> embedding/kernel [p, p, C, D]   (no bias in CLIP)
  embeddings.class_embedding [D]                 -> cls [1, 1, D]
  embeddings.position_embedding.weight [N+1, D]  -> pos_embedding [1, N+1, D]
  pre_layrnorm                                   -> pre_norm
  encoder.layers.i.layer_norm1 / layer_norm2     -> encoderblock_i/LayerNorm_0 / LayerNorm_1
  encoder.layers.i.self_attn.{q,k,v}_proj        -> encoderblock_i/MultiHeadDotProductAttention_0/{query,key,value}
                                                    (kernel [D, H, d], bias [H, d]; HF scales q after the bias,
                                                    which equals scaling the logits)
  encoder.layers.i.self_attn.out_proj            -> .../out (kernel [H, d, D])
  encoder.layers.i.mlp.fc1 / fc2                 -> encoderblock_i/MlpBlock_0/Dense_0 / Dense_1
config.json: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, patch_size, hidden_act
("quick_gelu" or "gelu"), layer_norm_eps; a CLIPModel's nested `vision_config` is used when present.
image_size= other than the checkpoint's resamples the patch position embeddings bilinearly
(`common.resample_posemb`; HF's `interpolate_pos_encoding` is bicubic, so such numbers differ from HF's).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from tokcomp.checkpoints.common import check_against_model, read_arrays, resample_posemb, square_side, unflatten
from tokcomp.models.vlm import CLIPVisionTower, feature_layers

ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF name -> MlpBlock.act ("gelu" is HF's exact erf)
PROBE = "embeddings.patch_embedding.weight"


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """config.json (a file or the directory holding it) -> the vision config dict."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"HF CLIP config {path!r} does not exist (pass config= instead)")
  with open(path) as f:
    config = json.load(f)
  return vision_config(config)


def vision_config(config: Mapping[str, Any]) -> dict[str, Any]:
  config = dict(config)
  if "vision_config" in config:  # CLIPModel / LlavaConfig nest the tower's config
    config = dict(config["vision_config"])
  return config


def find_prefix(arrays: Mapping[str, np.ndarray]) -> str:
  """The key prefix of the vision tower, e.g. "vision_model." or "vision_tower.vision_model."."""
  hits = sorted(k[:-len(PROBE)] for k in arrays if k.endswith(PROBE))
  if len(hits) != 1:
    raise ValueError(f"HF CLIP checkpoint: expected one '*{PROBE}' key, found {hits or 'none'}; "
                     f"first keys: {sorted(arrays)[:5]}")
  return hits[0]


def convert(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], *, select_layer: int = -2,
            image_size: int | tuple[int, int] | None = None, **overrides: Any) -> tuple[CLIPVisionTower, dict]:
  """HF arrays (original names and layouts) + the vision config -> (CLIPVisionTower, params)."""
  config = vision_config(config)
  for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if field not in config:
      raise ValueError(f"HF CLIP config lacks {field!r}")
  act = config.get("hidden_act", "quick_gelu")  # CLIPVisionConfig's default
  if act not in ACTIVATIONS:
    raise ValueError(f"HF CLIP config hidden_act={act!r}: supported {sorted(ACTIVATIONS)}")
  prefix = find_prefix(arrays)
  a = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  width, heads, depth = config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]
  if width % heads:
    raise ValueError(f"HF CLIP config num_attention_heads={heads} must divide hidden_size={width}")
  hd = width // heads
  layer_ids = {int(m.group(1)) for k in a if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
  if layer_ids != set(range(depth)):
    raise ValueError(f"HF CLIP checkpoint has layers {sorted(layer_ids)} but config num_hidden_layers={depth}")
  n_run = feature_layers(select_layer, depth)

  w_embed = a.pop("embeddings.patch_embedding.weight")  # [D, C, p, p]
  _expect(f"{prefix}embeddings.patch_embedding.weight", w_embed, (width, w_embed.shape[1]) + w_embed.shape[2:])
  ph, pw = w_embed.shape[2:]
  if "patch_size" in config and config["patch_size"] != ph:
    raise ValueError(f"HF CLIP config patch_size={config['patch_size']} but patch_embedding is {ph}x{pw}")
  model = CLIPVisionTower(**{**dict(patch_size=(ph, pw), width=width, depth=depth,
                                    mlp_dim=config["intermediate_size"], num_heads=heads, select_layer=select_layer,
                                    mlp_act=ACTIVATIONS[act], ln_eps=float(config.get("layer_norm_eps", 1e-5))),
                             **overrides})

  out: dict[str, np.ndarray] = {}
  out["embedding/kernel"] = np.ascontiguousarray(w_embed.transpose(2, 3, 1, 0))
  out["cls"] = a.pop("embeddings.class_embedding").reshape(1, 1, -1)
  pos = a.pop("embeddings.position_embedding.weight")[None]  # [1, 1 + h*w, D]
  side = square_side(pos.shape[1] - 1, "HF CLIP position_embedding")
  if "image_size" in config and config["image_size"] != side * ph:
    raise ValueError(f"HF CLIP config image_size={config['image_size']} but position_embedding has a "
                     f"{side}x{side} grid of {ph}-pixel patches")
  if image_size is not None:
    new = model.grid((image_size, image_size) if isinstance(image_size, int) else image_size)
    pos = resample_posemb(pos, (side, side), new, 1)
  out["pos_embedding"] = pos
  a.pop("embeddings.position_ids", None)  # a buffer (older transformers saved it)

  def norm(name, key):
    out[name + "/scale"], out[name + "/bias"] = a.pop(key + ".weight"), a.pop(key + ".bias")

  def linear(key, shape_in):
    w, b = a.pop(key + ".weight"), a.pop(key + ".bias")
    _expect(prefix + key + ".weight", w, (w.shape[0], shape_in))
    return np.ascontiguousarray(w.T), b

  norm("pre_norm", "pre_layrnorm")
  for i in range(depth):
    t = f"encoder.layers.{i}."
    if i >= n_run:  # past the feature layer: never runs
      for k in [k for k in a if k.startswith(t)]:
        del a[k]
      continue
    s = f"encoderblock_{i}/"
    norm(s + "LayerNorm_0", t + "layer_norm1")
    norm(s + "LayerNorm_1", t + "layer_norm2")
    for name, key in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      w, b = linear(t + "self_attn." + key, width)
      _expect(prefix + t + "self_attn." + key + ".weight", w, (width, width))
      out[f"{s}MultiHeadDotProductAttention_0/{name}/kernel"] = w.reshape(width, heads, hd)
      out[f"{s}MultiHeadDotProductAttention_0/{name}/bias"] = b.reshape(heads, hd)
    w, b = linear(t + "self_attn.out_proj", width)
    _expect(prefix + t + "self_attn.out_proj.weight", w, (width, width))
    out[s + "MultiHeadDotProductAttention_0/out/kernel"] = w.reshape(heads, hd, width)
    out[s + "MultiHeadDotProductAttention_0/out/bias"] = b
    out[s + "MlpBlock_0/Dense_0/kernel"], out[s + "MlpBlock_0/Dense_0/bias"] = linear(t + "mlp.fc1", width)
    out[s + "MlpBlock_0/Dense_1/kernel"], out[s + "MlpBlock_0/Dense_1/bias"] = linear(
        t + "mlp.fc2", config["intermediate_size"])
  a.pop("post_layernorm.weight", None)  # HF's pooled-output norm: LLaVA never reads it
  a.pop("post_layernorm.bias", None)
  if a:
    raise ValueError(f"HF CLIP checkpoint: keys tokcomp does not know how to load: "
                     f"{[prefix + k for k in sorted(a)][:10]}")
  params = unflatten(out)
  gh, gw = (side, side) if image_size is None else model.grid(
      (image_size, image_size) if isinstance(image_size, int) else image_size)
  check_against_model(model, params, (gh * ph, gw * pw))
  return model, params


def load(path: str | os.PathLike, *, config: Mapping[str, Any] | None = None, select_layer: int = -2,
         image_size: int | tuple[int, int] | None = None, **overrides: Any) -> tuple[CLIPVisionTower, dict]:
  """A directory (every *.safetensors in it, config.json) or one .safetensors file (config.json beside it, or
  config=) -> (CLIPVisionTower, params). fp16 weights are read as fp32; bf16 has no numpy dtype (convert first)."""
  path = os.fspath(path)
  files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
  if not files:
    raise FileNotFoundError(f"no *.safetensors in {path!r}")
  if config is None:
    config = read_config(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
  arrays: dict[str, np.ndarray] = {}
  for f in files:
    arrays.update(read_arrays(f))
  return convert(arrays, config, select_layer=select_layer, image_size=image_size, **overrides)


def _expect(key: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
  if tuple(np.shape(array)) != tuple(shape):
    raise ValueError(f"checkpoint does not fit the model:\n  shape {key}: checkpoint {tuple(np.shape(array))} "
                     f"vs model {tuple(shape)}")

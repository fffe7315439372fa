"""HF `LlamaForCausalLM` checkpoints (safetensors + config.json) -> tokcomp's Llama (`tokcomp.models.llm`), no torch.

  model, params = hf_llama.load("path/to/llama_dir")              # config.json + model.safetensors (or shards)
  model, params = hf_llama.load(dir, reduce="fastv:k=2,keep=288")  # overrides go to Llama(...)
  model, params = hf_llama.convert(arrays, config_dict)            # arrays: {HF key: numpy array}

Key map (torch Linear weights are [out, in] and are transposed to flax kernels [in, out]):
  model.embed_tokens.weight                    -> embed_tokens/embedding
  model.layers.i.self_attn.{q,k,v,o}_proj.*    -> layers_i/self_attn/{q,k,v,o}_proj/{kernel,bias}
  model.layers.i.mlp.{gate,up,down}_proj.*     -> layers_i/{gate,up,down}_proj/{kernel,bias}
  model.layers.i.{input,post_attention}_layernorm.weight -> layers_i/..._layernorm/scale
  model.norm.weight -> norm/scale;  lm_head.weight -> lm_head/kernel (absent or ignored when tied)
config.json fields read: vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, head_dim, rms_norm_eps, rope_theta, tie_word_embeddings, attention_bias, mlp_bias,
hidden_act (must be silu), rope_scaling (must be absent: scaled RoPE is not implemented). model_type llama,
mistral (no sliding window) or qwen2 (q/k/v bias). Every array is checked against the model's own shapes;
unknown or missing keys are errors that name them. bf16 files are not readable through numpy: convert to fp32.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from tokcomp.checkpoints.common import check_shapes, read_arrays, unflatten
from tokcomp.models import llm

MODEL_TYPES = ("llama", "mistral", "qwen2")
IGNORED = (r"\.rotary_emb\.inv_freq$",)  # buffers some old checkpoints saved


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> llm.LlamaConfig:
  model_type = hf.get("model_type", "llama")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type={model_type!r}: must be one of {MODEL_TYPES}")
  if hf.get("rope_scaling") not in (None, {}) and hf["rope_scaling"].get("rope_type", hf["rope_scaling"].get(
      "type")) != "default":
    raise ValueError(f"config.json rope_scaling={hf['rope_scaling']}: scaled RoPE is not implemented")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is implemented")
  if model_type != "llama" and hf.get("use_sliding_window", model_type == "mistral") and hf.get("sliding_window"):
    raise ValueError(f"config.json sliding_window={hf['sliding_window']}: sliding-window attention is not "
                     f"implemented")
  bias = bool(hf.get("attention_bias", False))
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(hf.get("rope_theta", 10000.0)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=bias or model_type == "qwen2", o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
  return llm.LlamaConfig(**{**fields, **overrides})


def convert(arrays: Mapping[str, np.ndarray], hf_config: Mapping[str, Any], *, reduce: str | None = None,
            **config_overrides: Any) -> tuple[llm.Llama, dict]:
  """{HF key: array} + config.json dict -> (Llama, params). config_overrides go to LlamaConfig (e.g. dtype)."""
  config = config_from_hf(hf_config, **config_overrides)
  a = {k: np.asarray(v) for k, v in arrays.items() if not any(re.search(p, k) for p in IGNORED)}
  if config.tie_word_embeddings:
    a.pop("lm_head.weight", None)
  out: dict[str, np.ndarray] = {}
  rules = [
      (r"model\.embed_tokens\.weight", lambda m: "embed_tokens/embedding", False),
      (r"model\.norm\.weight", lambda m: "norm/scale", False),
      (r"lm_head\.weight", lambda m: "lm_head/kernel", True),
      (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.weight", lambda m: f"layers_{m[1]}/self_attn/{m[2]}/kernel",
       True),
      (r"model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.bias", lambda m: f"layers_{m[1]}/self_attn/{m[2]}/bias",
       False),
      (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", lambda m: f"layers_{m[1]}/{m[2]}/kernel",
       True),
      (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias", lambda m: f"layers_{m[1]}/{m[2]}/bias",
       False),
      (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
       lambda m: f"layers_{m[1]}/{m[2]}/scale", False),
  ]
  unknown = []
  for key, value in a.items():
    for pattern, name, transpose in rules:
      m = re.fullmatch(pattern, key)
      if m:
        out[name(m)] = np.ascontiguousarray(value.T) if transpose else value
        break
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"HF Llama checkpoint: keys tokcomp's Llama does not have: {sorted(unknown)[:8]}")
  model = llm.Llama(config, reduce=reduce)
  params = unflatten(out)
  check_against_model(model, params)
  return model, params


def check_against_model(model: llm.Llama, params: Mapping[str, Any]) -> None:
  expected = jax.eval_shape(lambda r: llm.init_params(model, r), jax.random.key(0))
  check_shapes(expected["params"], params["params"], "HF Llama checkpoint does not fit the config")


def read_dir(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A HF model dir -> (arrays, config.json). Reads model.safetensors or the shards its index lists."""
  path = os.fspath(path)
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"HF Llama dir {path!r} has no config.json")
  with open(cfg_path) as f:
    hf_config = json.load(f)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"HF Llama dir {path!r}: no model.safetensors or model.safetensors.index.json "
                            f"(pickle .bin files are not read)")
  arrays: dict[str, np.ndarray] = {}
  for name in files:
    arrays.update(read_arrays(os.path.join(path, name)))
  return arrays, hf_config


def load(path: str | os.PathLike, **overrides: Any) -> tuple[llm.Llama, dict]:
  """A HF model dir (config.json + safetensors) -> (Llama, params); overrides: reduce=, dtype=, ..."""
  arrays, hf_config = read_dir(path)
  return convert(arrays, hf_config, **overrides)

"""Load official TiTok / One-D-Piece checkpoints (bytedance/1d-tokenizer, turingmotors/One-D-Piece) without torch.

  model, params = titok.load("tokenizer_titok_l32_imagenet/")                # config.json + model.safetensors
  model, params = titok.load("config.json", "model.safetensors")
  model, params = titok.load(directory, num_heads=3)                          # a size the config cannot name

The Hub repositories (e.g. yucornetto/tokenizer_titok_l32_imagenet) are written by the reference's
`PyTorchModelHubMixin.save_pretrained`: `config.json` is the OmegaConf tree the model was built from
(`model.vq_model.{codebook_size, token_size, use_l2_norm, commitment_cost, vit_enc_model_size, vit_dec_model_size,
vit_enc_patch_size, vit_dec_patch_size, num_latent_tokens, finetune_decoder, is_legacy, quantize_mode}` and
`dataset.preprocessing.crop_size`; a tree wrapped as {"config": {...}} is unwrapped) and `model.safetensors` the
state dict. Files are read with `common.read_arrays` (safetensors or npz, never pickle). A `.bin`/`.pth` state
dict must be converted to safetensors in a torch environment first.

What is read from where: patch sizes, K, token_size, codebook size, channels, width, depth, image size and the
head kind are read off the weights and checked against the config (a disagreement is a ValueError naming both);
`use_l2_norm`, `commitment_cost` come from the config; heads cannot be read off the weights, so they come from the
size name (small 8, base 12, large 16) when the weights have that size's width and depth, else from `num_heads`.
`is_legacy` defaults to True when the config lacks it, as in the reference. `model.type: one_d_piece` (or
`tokenizer="one_d_piece"`) builds a `OneDPiece`, whose weights are TiTok's legacy layout.

`finetune_decoder: True` checkpoints (all released legacy ones) also hold the MaskGIT VQGAN pixel decoder
(`pixel_decoder.*`) and its codebook (`pixel_quantize.embedding.weight`): they load into
`tokenizers/maskgit_vqgan.PixelDecoder` (sizes read off the shapes; `pixel_decoder_arrays`) and the model
decodes to pixels. `skip_pixel_decoder=True` drops them; the model then decodes to the 1024 VQGAN logits. The
config's `finetune_decoder` must agree with the presence of those keys.

Layout map (torch -> flax): Conv [O, I, kh, kw] -> [kh, kw, I, O]; 1x1 convs and Linear -> Dense kernels [I, O];
nn.MultiheadAttention in_proj [3W, W] -> query/key/value [W, H, W/H], out_proj -> out [H, W/H, W];
ln_1/ln_2 -> LayerNorm_0/1; mlp.c_fc/c_proj -> MlpBlock_0/Dense_0/1; `latent_tokens` -> encoder/latent_tokens;
`quantize.embedding.weight` -> quantize/codebook. Every array is checked against the model's own shapes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tokcomp.checkpoints.common import check_shapes, read_arrays, square_side
from tokcomp.tokenizers import one_d_piece, titok

PIXEL_DECODER = re.compile(r"^(pixel_decoder|pixel_quantize)\.")
WEIGHT_FILES = ("model.safetensors", "model.npz")
REQUIRED = ("encoder.patch_embed.weight", "encoder.positional_embedding", "encoder.conv_out.weight", "latent_tokens",
            "decoder.decoder_embed.weight", "decoder.positional_embedding", "quantize.embedding.weight",
            "encoder.transformer.0.mlp.c_fc.weight")


def read_config(path: str | os.PathLike) -> dict:
  with open(path) as f:
    config = json.load(f)
  if "model" not in config and isinstance(config.get("config"), dict):
    config = config["config"]
  try:
    config["model"]["vq_model"], config["dataset"]["preprocessing"]["crop_size"]
  except (KeyError, TypeError) as e:
    raise ValueError(f"{path}: not a TiTok config (needs model.vq_model and dataset.preprocessing.crop_size; "
                     f"missing {e})") from e
  return config


def _files(path, weights) -> tuple[str, str]:
  path = os.fspath(path)
  if weights is not None:
    return path, os.fspath(weights)
  if not os.path.isdir(path):
    raise ValueError(f"titok.load({path!r}): give a directory holding config.json and model.safetensors, "
                     f"or the two paths")
  for name in WEIGHT_FILES:
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, "config.json"), os.path.join(path, name)
  raise FileNotFoundError(f"{path}: no {' or '.join(WEIGHT_FILES)} (a pytorch_model.bin must be converted to "
                          f"safetensors first; tokcomp never unpickles)")


def load(path: str | os.PathLike, weights: str | os.PathLike | Mapping[str, np.ndarray] | None = None, *,
         num_heads: int | tuple[int, int] | None = None, tokenizer: str | None = None,
         skip_pixel_decoder: bool = False, **overrides: Any):
  """-> (TiTok or OneDPiece module, params). `weights`: a file, or an already read {key: array} state dict.
  num_heads: int or (encoder, decoder), for widths that are not a named size. overrides go to the module."""
  if isinstance(weights, Mapping):
    config, arrays = read_config(path), dict(weights)
  else:
    config_path, weights_path = _files(path, weights)
    config, arrays = read_config(config_path), read_arrays(weights_path)
  return convert(config, arrays, num_heads=num_heads, tokenizer=tokenizer, skip_pixel_decoder=skip_pixel_decoder,
                 **overrides)


def _size(part: str, name: str, width: int, depth: int, heads: int | None) -> dict:
  """The module's {part}_width/depth/heads; heads from the size name when the weights have that size."""
  key = titok.SIZE_NAMES.get(name, name)
  if heads is None:
    if titok.SIZES.get(key, (None, None))[:2] != (width, depth):
      raise ValueError(f"checkpoint {part}: width {width}, depth {depth} is not the size its config names "
                       f"({name!r} = {titok.SIZES.get(key)}); pass num_heads=")
    heads = titok.SIZES[key][2]
  return {f"{part}_size": None, f"{part}_width": width, f"{part}_depth": depth, f"{part}_heads": heads}


def _depth(arrays, prefix: str) -> int:
  ids = {int(m.group(1)) for k in arrays if (m := re.match(re.escape(prefix) + r"transformer\.(\d+)\.", k))}
  if not ids or ids != set(range(len(ids))):
    raise ValueError(f"checkpoint: {prefix}transformer block indices {sorted(ids)} are not 0..n-1")
  return len(ids)


def _agree(field: str, config_value, weights_value) -> None:
  if config_value is not None and config_value != weights_value:
    raise ValueError(f"checkpoint: config {field}={config_value!r} but the weights say {weights_value!r}")


def convert(config: Mapping, arrays: Mapping[str, np.ndarray], *, num_heads=None, tokenizer=None,
            skip_pixel_decoder: bool = False, **overrides):
  vq = dict(config["model"]["vq_model"])
  if vq.get("quantize_mode", "vq") != "vq":
    raise ValueError(f"checkpoint: quantize_mode={vq['quantize_mode']!r}; tokcomp loads only 'vq' TiTok models")
  a = dict(arrays)
  pixel = {k: a.pop(k) for k in sorted(a) if PIXEL_DECODER.match(k)}
  finetune = bool(pixel) and not skip_pixel_decoder
  if not skip_pixel_decoder:
    _agree("model.vq_model.finetune_decoder (pixel_decoder.* keys present)", vq.get("finetune_decoder", True),
           bool(pixel))
  heads = num_heads if isinstance(num_heads, (tuple, list)) else (num_heads, num_heads)
  needed = [k for k in REQUIRED if k not in a]
  if needed:
    raise ValueError(f"checkpoint: missing keys {needed} (not a TiTok / One-D-Piece state dict?)")

  patch = a["encoder.patch_embed.weight"].shape  # [W, C, p, p]
  enc_width, channels, enc_patch = patch[0], patch[1], patch[2]
  grid = square_side(a["encoder.positional_embedding"].shape[0] - 1, "encoder.positional_embedding")
  legacy = "decoder.ffn.2.weight" in a
  dec_width = a["decoder.decoder_embed.weight"].shape[0]
  dec_grid = square_side(a["decoder.positional_embedding"].shape[0] - 1, "decoder.positional_embedding")
  crop = config["dataset"]["preprocessing"]["crop_size"]
  shape_config = dict(num_latent_tokens=a["latent_tokens"].shape[0], token_size=a["encoder.conv_out.weight"].shape[0],
                      codebook_size=a["quantize.embedding.weight"].shape[0], vit_enc_patch_size=enc_patch,
                      vit_dec_patch_size=grid * enc_patch // dec_grid, is_legacy=legacy)
  for field, value in shape_config.items():
    _agree(f"model.vq_model.{field}", vq.get(field, True if field == "is_legacy" else None), value)
  _agree("dataset.preprocessing.crop_size", crop, grid * enc_patch)
  if not legacy and "decoder.conv_out.weight" not in a:
    raise ValueError("checkpoint: no decoder head (decoder.ffn.2.weight for legacy, decoder.conv_out.weight else)")

  kind = tokenizer or ("one_d_piece" if config["model"].get("type") == "one_d_piece" else "titok")
  cls = {"titok": titok.TiTok, "one_d_piece": one_d_piece.OneDPiece}.get(kind)
  if cls is None:
    raise ValueError(f"tokenizer={kind!r}: must be 'titok' or 'one_d_piece'")
  fields = dict(image_size=crop, channels=channels, patch_size=enc_patch,
                decoder_patch_size=shape_config["vit_dec_patch_size"],
                num_latent_tokens=shape_config["num_latent_tokens"], token_size=shape_config["token_size"],
                codebook_size=shape_config["codebook_size"], use_l2_norm=bool(vq.get("use_l2_norm", False)),
                commitment_cost=float(vq.get("commitment_cost", 0.25)), is_legacy=legacy,
                mlp_ratio=a["encoder.transformer.0.mlp.c_fc.weight"].shape[0] / enc_width,
                **_size("encoder", vq["vit_enc_model_size"], enc_width, _depth(a, "encoder."), heads[0]),
                **_size("decoder", vq["vit_dec_model_size"], dec_width, _depth(a, "decoder."), heads[1]))
  pixel_flat = {}
  if finetune:
    codebook = pixel.pop("pixel_quantize.embedding.weight", None)
    if codebook is None:
      raise ValueError("checkpoint: pixel_decoder.* without pixel_quantize.embedding.weight (the VQGAN codebook)")
    vqgan, pixel_flat = pixel_decoder_arrays(pixel, "pixel_decoder.")
    pixel_flat = {"pixel_decoder/" + k: v for k, v in pixel_flat.items()}
    pixel_flat["pixel_codebook"] = codebook
    fields.update(finetune_decoder=True, vqgan_z_channels=codebook.shape[1],
                  **{f"vqgan_{k}": v for k, v in vqgan.items()})
  model = cls(**{**fields, **overrides})
  params = _convert_arrays(a, model, fields)
  params["params"].update(traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in pixel_flat.items()}))
  check(model, params)
  return model, params


def pixel_decoder_arrays(arrays: Mapping[str, np.ndarray], prefix: str = "") -> tuple[dict, dict]:
  """The MaskGIT VQGAN decoder's state dict (keys under `prefix`) -> ({hidden_channels, channel_mult,
  res_blocks}, {flax path: array}) for `maskgit_vqgan.PixelDecoder`. Only the products hidden x mult are
  observable, so hidden_channels is their gcd. Every key must be consumed."""
  a = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  extra = sorted(k for k in arrays if not k.startswith(prefix))
  levels = sorted({int(m.group(1)) for k in a if (m := re.match(r"up\.(\d+)\.", k))})
  blocks = sorted({int(m.group(1)) for k in a if (m := re.match(r"mid\.(\d+)\.", k))})
  if extra or not levels or levels != list(range(len(levels))) or blocks != list(range(len(blocks))):
    raise ValueError(f"MaskGIT VQGAN decoder checkpoint: levels {levels}, mid blocks {blocks} must be 0..n-1"
                     + (f"; keys outside {prefix!r}: {extra[:5]}" if extra else ""))
  widths = [a[f"up.{i}.block.0.conv1.weight"].shape[0] for i in levels]
  hidden = int(np.gcd.reduce(widths))
  out = {}
  for key in sorted(a):
    module, _, leaf = key.rpartition(".")
    module = re.sub(r"^up\.(\d+)\.block\.(\d+)\.", r"up_\1_block_\2/", module)
    module = re.sub(r"^up\.(\d+)\.upsample_conv$", r"up_\1_upsample_conv", module)
    module = re.sub(r"^mid\.(\d+)\.", r"mid_\1/", module)
    value = a[key]
    if leaf == "bias":
      out[module + "/bias"] = value
    elif leaf == "weight" and "norm" in module.rsplit("/", 1)[-1]:
      out[module + "/scale"] = value
    elif leaf == "weight" and value.ndim == 4:
      out[module + "/kernel"] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    else:
      raise ValueError(f"MaskGIT VQGAN decoder checkpoint: unexpected key {prefix + key!r} {value.shape}")
  config = dict(hidden_channels=hidden, channel_mult=tuple(w // hidden for w in widths), res_blocks=len(blocks))
  return config, out


def _convert_arrays(a: dict, model, fields: dict) -> dict:
  out: dict[str, np.ndarray] = {}

  def take(key):
    if key not in a:
      raise ValueError(f"checkpoint: missing key {key!r}")
    return a.pop(key)

  def dense(name, key):  # Linear [O, I] or 1x1 conv [O, I, 1, 1] -> [I, O]
    w = take(key + ".weight")
    out[name + "/kernel"] = np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    out[name + "/bias"] = take(key + ".bias")

  def conv(name, key):
    out[name + "/kernel"] = np.ascontiguousarray(take(key + ".weight").transpose(2, 3, 1, 0))
    out[name + "/bias"] = take(key + ".bias")

  def norm(name, key):
    out[name + "/scale"], out[name + "/bias"] = take(key + ".weight"), take(key + ".bias")

  def blocks(name, key, depth, heads):
    for i in range(depth):
      s, t = f"{name}/transformer/encoderblock_{i}/", f"{key}.transformer.{i}."
      norm(s + "LayerNorm_0", t + "ln_1")
      norm(s + "LayerNorm_1", t + "ln_2")
      w_in, b_in = take(t + "attn.in_proj_weight"), take(t + "attn.in_proj_bias")  # [3W, W], [3W]
      width = w_in.shape[1]
      if w_in.shape != (3 * width, width) or width % heads:
        raise ValueError(f"checkpoint {t}attn.in_proj_weight {w_in.shape}: must be [3W, W] with W divisible "
                         f"by {heads} heads")
      hd = width // heads
      attn = s + "MultiHeadDotProductAttention_0/"
      for j, qkv in enumerate(("query", "key", "value")):
        out[attn + qkv + "/kernel"] = np.ascontiguousarray(w_in[j * width:(j + 1) * width].T.reshape(width, heads, hd))
        out[attn + qkv + "/bias"] = b_in[j * width:(j + 1) * width].reshape(heads, hd)
      w_out = take(t + "attn.out_proj.weight")
      out[attn + "out/kernel"] = np.ascontiguousarray(w_out.T.reshape(heads, hd, width))
      out[attn + "out/bias"] = take(t + "attn.out_proj.bias")
      dense(s + "MlpBlock_0/Dense_0", t + "mlp.c_fc")
      dense(s + "MlpBlock_0/Dense_1", t + "mlp.c_proj")

  conv("encoder/patch_embed", "encoder.patch_embed")
  out["encoder/latent_tokens"] = take("latent_tokens")
  for part in ("encoder", "decoder"):
    for name in ("class_embedding", "positional_embedding", "latent_token_positional_embedding"):
      out[f"{part}/{name}"] = take(f"{part}.{name}")
    norm(f"{part}/ln_pre", f"{part}.ln_pre")
    norm(f"{part}/ln_post", f"{part}.ln_post")
    blocks(part, part, fields[f"{part}_depth"], fields[f"{part}_heads"])
  dense("encoder/conv_out", "encoder.conv_out")
  dense("decoder/decoder_embed", "decoder.decoder_embed")
  out["decoder/mask_token"] = take("decoder.mask_token").reshape(1, -1)
  dense("decoder/ffn_0", "decoder.ffn.0")
  if fields["is_legacy"]:
    dense("decoder/ffn_2", "decoder.ffn.2")
  else:
    conv("decoder/conv_out", "decoder.conv_out")
  out["quantize/codebook"] = take("quantize.embedding.weight")
  if a:
    raise ValueError(f"checkpoint: unexpected keys tokcomp does not know how to load: {sorted(a)[:10]}"
                     + (f" (+{len(a) - 10} more)" if len(a) > 10 else ""))
  return {"params": traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})}


def check(model, params: Mapping[str, Any]) -> None:
  """`params` has exactly the model's keys and shapes; names every missing, unexpected or misshapen one."""
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, model.channels), jnp.float32)
  expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]
  check_shapes(expected, params["params"], "checkpoint does not fit the TiTok model")

"""Golden fixtures for TiTok and One-D-Piece from the official PyTorch references.

References (Apache-2.0; imported from a checkout given on the command line, nothing is copied into tokcomp):
  bytedance/1d-tokenizer @ 942a96fbdd873780179d1b78d5462911528bf8c8: `modeling/titok.py: TiTok(config)` with
    `encode`, `decode`, `decode_tokens` (`modeling/modules/blocks.py: TiTokEncoder, TiTokDecoder`,
    `modeling/quantizer/quantizer.py: VectorQuantizer`).
  turingmotors/One-D-Piece @ 473665d1ec5d4f96e07f1c379166f668ee17b961: `modeling/one_d_piece.py: OneDPiece`
    with `decode(z, length=L)` and `decode_tokens(ids, length=L)`, eval mode.

Adaptations, all at run time (the reference files are not edited):
  * `modeling` and `modeling.modules` are registered as empty packages, so their `__init__`s (which import the
    training losses, LPIPS, torchvision weights, ...) are skipped; `accelerate.utils.operations.gather` (used only
    by the clustering VQ in training) is a stub. Needs einops and omegaconf in the torch venv.
  * The model sizes are dict literals inside `TiTokEncoder.__init__` / `TiTokDecoder.__init__` ("small" = 512
    wide, 8 layers, 8 heads). The constants 512 and 8 of those two code objects are replaced (width WIDTH; the
    single constant 8 is both the layer and the head count of "small", so both become HEADS), then the layer
    list is cut to DEPTH and `num_layers` set to DEPTH. Everything else runs as written.
  * Both repositories name their package `modeling`: `sys.modules` is cleared between the two imports.

Model: 32 px, encoder/decoder patch 8 (4x4 grid), width 24, 3 heads, 2 layers, K = 8 latent tokens, token_size
12, codebook 64, l2-normalised VQ, finetune_decoder False, batch 3. The reference's own init, then N(0, 0.2)
noise on every parameter (seed 6, the first of seeds 0..7 whose VQ margins are all > 1e-3 and whose code rows
all differ): with the init's std 0.02 the latent tokens ignore the image and every sample gets the same codes.
Width 24 (not 96) keeps the legacy fixture (its head is 2W x 1024 and its outputs 3 x 16 x 1024 logits, twice)
under 1 MB. Margins at seed 6: non-legacy 1.37e-2, legacy 3.55e-2.

Cases (tests/goldens/):
  titok_nonlegacy.npz   is_legacy False: transposed encoder output; pixel head (1x1 conv -> p^2*3, pixel
                        shuffle, 3x3 conv) -> images [B, 32, 32, 3].
  titok_legacy.npz      is_legacy True: the raw-reshape encoder output; 1024-logit head -> [B, 4, 4, 1024].
  one_d_piece_legacy.npz  One-D-Piece's OneDPiece loaded with titok_legacy's state dict (strict): full-length
                        decode, and decode / decode_tokens at length 5 of 8. Holds no weights (see titok_legacy).
  maskgit_vqgan_decoder.npz  `modeling/modules/maskgit_vqgan.py: Decoder` alone (the finetune_decoder stage's
                        pixel decoder), tiny config VQGAN_TINY (hidden 32, channel_mult [2, 1], 1 ResBlock per
                        level, z 8): z [3, 8, 8, 8] (NHWC) -> decoded [3, 16, 16, 3]; the reference's init plus
                        N(0, 0.1) on every parameter (seed 6).

Arrays (our layouts: NHWC images, tokens [B, K, C]): param/<state dict key> (reference layout), images [B,32,32,3]
in [0, 1] (fed to the reference as NCHW), z [B, K, 12] (encoder output before quantisation; the reference's
[B, 12, 1, K]), ids [B, K], z_q [B, K, 12] (straight-through output), decoded (decode(encode(x))), decoded_tokens
(decode_tokens(ids)), vq_margin (min over tokens of (d2 - d1) / d2, the relative gap between the nearest and the
second-nearest code distance, float64), config (JSON: the reference config tree plus the tiny width/depth/heads).
one_d_piece_legacy: images, ids, decoded_full, decoded_l5, decoded_tokens_l5, length.

Command (repo root, torch venv):
  /work/venv-torch/bin/python tools/goldens/make_titok.py --titok-repo /work/refs/titok \
      --odp-repo /work/refs/onedpiece --out tests/goldens
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

TITOK_COMMIT = "942a96fbdd873780179d1b78d5462911528bf8c8"
ODP_COMMIT = "473665d1ec5d4f96e07f1c379166f668ee17b961"
WIDTH, HEADS, DEPTH = 24, 3, 2
NOISE_STD, SEED, BATCH, PREFIX = 0.2, 6, 3, 5


def vq_config(is_legacy: bool) -> dict:
  return {"model": {"vq_model": {
      "codebook_size": 64, "token_size": 12, "use_l2_norm": True, "commitment_cost": 0.25,
      "vit_enc_model_size": "small", "vit_dec_model_size": "small", "vit_enc_patch_size": 8,
      "vit_dec_patch_size": 8, "num_latent_tokens": 8, "finetune_decoder": False, "is_legacy": is_legacy,
      "strict_length_assertion": False}},  # One-D-Piece's switch for shorter lengths; TiTok ignores it
      "dataset": {"preprocessing": {"crop_size": 32}}}


def import_reference(repo: str):
  """Imports `modeling` from `repo` with the package __init__s skipped; returns the `modeling` namespace."""
  for name in [n for n in sys.modules if n == "modeling" or n.startswith("modeling.")]:
    del sys.modules[name]
  repo = common.add_repo_to_path(repo)
  sys.path.remove(repo)
  sys.path.insert(0, repo)
  for name in ("modeling", "modeling.modules"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [os.path.join(repo, *name.split("."))]
    sys.modules[name] = pkg
  for name in ("accelerate", "accelerate.utils", "accelerate.utils.operations"):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules["accelerate.utils.operations"].gather = lambda x: x
  import importlib
  blocks = importlib.import_module("modeling.modules.blocks")
  shrink(blocks.TiTokEncoder)
  shrink(blocks.TiTokDecoder)
  return importlib


def shrink(cls) -> None:
  """Replaces the "small" size constants (512 wide; 8 layers and 8 heads) in cls.__init__'s code object."""
  code = cls.__init__.__code__
  consts = list(code.co_consts)
  assert consts.count(512) == 1 and consts.count(8) == 1, (cls.__name__, consts)
  consts[consts.index(512)] = WIDTH
  consts[consts.index(8)] = HEADS
  cls.__init__.__code__ = code.replace(co_consts=tuple(consts))


def cut_layers(model) -> None:
  for part in (model.encoder, model.decoder):
    assert part.width == WIDTH and part.num_heads == HEADS
    part.transformer = torch.nn.ModuleList(list(part.transformer)[:DEPTH])
    part.num_layers = DEPTH


def vq_margin(z: np.ndarray, codebook: np.ndarray) -> float:
  """min over tokens of the relative gap between the two smallest code distances (l2-normalised, float64)."""
  z = z.reshape(-1, z.shape[-1]).astype(np.float64)
  e = codebook.astype(np.float64)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  e = e / np.linalg.norm(e, axis=-1, keepdims=True)
  d = np.sort(((z[:, None] - e[None]) ** 2).sum(-1), axis=-1)
  return float(((d[:, 1] - d[:, 0]) / d[:, 1]).min())


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1).astype(np.float32)


def tokens_last(z: torch.Tensor) -> np.ndarray:
  """[B, C, 1, K] -> [B, K, C]."""
  return z.detach().numpy()[:, :, 0, :].transpose(0, 2, 1).astype(np.float32)


def run_titok(repo: str, is_legacy: bool, images: torch.Tensor):
  importlib = import_reference(repo)
  TiTok = importlib.import_module("modeling.titok").TiTok
  config = vq_config(is_legacy)
  common.set_deterministic(SEED)
  model = TiTok(config)
  cut_layers(model)
  common.perturb_parameters(model, NOISE_STD, SEED)
  model.eval()
  with torch.no_grad():
    z = model.encoder(pixel_values=images, latent_tokens=model.latent_tokens)
    z_q, result = model.quantize(z)
    decoded = model.decode(z_q)
    ids = result["min_encoding_indices"][:, 0, :]  # [B, 1, K] -> [B, K]
    decoded_tokens = model.decode_tokens(ids)
    z_q2, _ = model.encode(images)
  assert torch.equal(z_q, z_q2)
  state = common.state_dict_arrays(model)
  margin = vq_margin(tokens_last(z), state["quantize.embedding.weight"])
  n_distinct = len({tuple(r) for r in ids.numpy().tolist()})
  print(f"[titok legacy={is_legacy}] vq margin {margin:.4g}; distinct code rows {n_distinct}/{BATCH}; "
        f"ids {ids.numpy().tolist()}")
  common.check_margin(f"titok legacy={is_legacy}", margin, threshold=1e-3)
  assert n_distinct == BATCH, "codes must depend on the image"
  out = {f"param/{k}": v for k, v in state.items()}
  out.update(images=nhwc(images), z=tokens_last(z), ids=ids.numpy(), z_q=tokens_last(z_q), decoded=nhwc(decoded),
             decoded_tokens=nhwc(decoded_tokens), vq_margin=np.float64(margin))
  return model.state_dict(), out, margin


def run_one_d_piece(repo: str, state_dict, images: torch.Tensor):
  importlib = import_reference(repo)
  OneDPiece = importlib.import_module("modeling.one_d_piece").OneDPiece
  common.set_deterministic(SEED)
  model = OneDPiece(vq_config(True))
  cut_layers(model)
  model.load_state_dict(state_dict, strict=True)
  model.eval()
  with torch.no_grad():
    z_q, result = model.encode(images)
    ids = result["min_encoding_indices"][:, 0, :]
    full = model.decode(z_q)
    prefix = model.decode(z_q, length=PREFIX)
    prefix_tokens = model.decode_tokens(ids, length=PREFIX)
  assert not torch.allclose(full, prefix, atol=1e-3), "the prefix must change the output"
  return dict(images=nhwc(images), ids=ids.numpy(), decoded_full=nhwc(full), decoded_l5=nhwc(prefix),
              decoded_tokens_l5=nhwc(prefix_tokens), length=np.int64(PREFIX))


VQGAN_TINY = {"channel_mult": [2, 1], "num_resolutions": 2, "dropout": 0.0, "hidden_channels": 32,
              "num_channels": 3, "num_res_blocks": 1, "resolution": 16, "z_channels": 8}


def run_vqgan_decoder(repo: str):
  """The MaskGIT VQGAN pixel decoder alone, tiny: z [3, 8, 8, 8] -> [3, 3, 16, 16]. channel_mult [2, 1] makes
  the level-0 ResBlock go 32 -> 64 channels, so its nin_shortcut (applied to the block output) runs."""
  importlib = import_reference(repo)
  from omegaconf import OmegaConf
  Decoder = importlib.import_module("modeling.modules.maskgit_vqgan").Decoder
  common.set_deterministic(SEED)
  model = Decoder(OmegaConf.create(VQGAN_TINY))
  common.perturb_parameters(model, 0.1, SEED)
  model.eval()
  assert "up.0.block.0.nin_shortcut.weight" in model.state_dict()
  z = torch.randn(BATCH, VQGAN_TINY["z_channels"], 8, 8, generator=torch.Generator().manual_seed(99))
  with torch.no_grad():
    out = model(z)
  arrays = {f"param/{k}": v for k, v in common.state_dict_arrays(model).items()}
  arrays.update(z=nhwc(z), decoded=nhwc(out))
  return arrays


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--titok-repo", default="/work/refs/titok")
  ap.add_argument("--odp-repo", default="/work/refs/onedpiece")
  ap.add_argument("--out", default="tests/goldens")
  args = ap.parse_args()
  gen = torch.Generator().manual_seed(1234)
  images = torch.rand(BATCH, 3, 32, 32, generator=gen)
  meta = dict(titok_commit=common.git_commit_of(args.titok_repo, TITOK_COMMIT), width=WIDTH, heads=HEADS,
              depth=DEPTH, noise_std=NOISE_STD, seed=SEED, torch_version=torch.__version__)
  legacy_state = None
  for is_legacy in (False, True):
    state_dict, arrays, margin = run_titok(args.titok_repo, is_legacy, images)
    name = "titok_legacy" if is_legacy else "titok_nonlegacy"
    common.save_golden(os.path.join(args.out, name + ".npz"), arrays,
                       {**vq_config(is_legacy), **meta, "min_margin": margin})
    if is_legacy:
      legacy_state = state_dict
  odp = run_one_d_piece(args.odp_repo, legacy_state, images)
  common.save_golden(os.path.join(args.out, "one_d_piece_legacy.npz"), odp,
                     {**vq_config(True), **meta, "odp_commit": common.git_commit_of(args.odp_repo, ODP_COMMIT),
                      "weights": "titok_legacy.npz", "length": PREFIX})
  common.save_golden(os.path.join(args.out, "maskgit_vqgan_decoder.npz"), run_vqgan_decoder(args.titok_repo),
                     {**VQGAN_TINY, "titok_commit": meta["titok_commit"], "noise_std": 0.1, "seed": SEED})


if __name__ == "__main__":
  main()

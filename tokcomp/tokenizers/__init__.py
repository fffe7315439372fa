"""1D image tokenizers (TiTok, One-D-Piece, FlexTok) and their quantizers (VQ, FSQ).

`get(name)` picks a tokenizer class for train.py / eval.py (`config.task = "reconstruct"`,
`config.model_name`). Every tokenizer takes its config as keyword arguments and offers the same interface
(images NHWC in [0, 1]; K = `num_latent_tokens`; `length` = tokens kept, None for all, an int or a traced int
array [] or [B], given to the model as a prefix mask so one compile serves every length):

  encode(images, train=False)                -> (z_q [B, K, C], aux: ids, quantizer losses and metrics)
  decode(z_q, length=None, train=False)      -> images
  decode_tokens(ids, length=None)            -> images
  __call__(images, length=None, train=False) -> {"recon": images or None, "losses": {...}, "metrics": {...}}
  reconstruct(images, length=None)           -> images (deterministic)

Training draws the kept length from the rng stream "token_drop" and flow noise from "noise".
"""
import importlib

TOKENIZERS = {"titok": ("titok", "TiTok"), "one_d_piece": ("one_d_piece", "OneDPiece"),
              "flextok": ("flextok", "FlexTok")}


def get(name: str):
  if name not in TOKENIZERS:
    raise ValueError(f"config.model_name={name!r}: not a tokenizer; must be one of {sorted(TOKENIZERS)}")
  module, cls = TOKENIZERS[name]
  return getattr(importlib.import_module(f"tokcomp.tokenizers.{module}"), cls)

"""One-D-Piece: TiTok trained with Tail Token Drop, so it decodes at any length 1..K (Miwa et al., "One-D-Piece:
Image Tokenizer Meets Quality-Controllable Compression", arXiv:2501.10064, §3.2).

Tail Token Drop: in training the decoder sees only the first n of the K latent tokens,
  n ~ U{1, ..., K}   (one draw per batch, as the reference; `drop_per_sample=True` draws one per example),
so the early tokens must carry the coarse content and later ones refine it. Inference decodes the first
`length` tokens. Everything else is TiTok (titok.py): the encoder always produces all K tokens, the quantizer
sees all K, and the decoder's prefix is a key mask over the K latent slots (static shapes; one compile serves
every n and every `length`). n is drawn from the rng stream "token_drop"; `train=False` is deterministic.
With both (training and a given `length`) the decoder keeps min(n, length), as the reference's
`decode(z, length)` in training mode (drop, then slice).

Parity: tests/goldens/one_d_piece_legacy.npz (tools/goldens/make_titok.py, turingmotors/One-D-Piece
@ 473665d1ec5d4f96e07f1c379166f668ee17b961, `modeling/one_d_piece.py: OneDPiece`, eval mode) with the weights of
tests/goldens/titok_legacy.npz: decode at the full length and at length 5 of 8, decode_tokens at 5, at 1e-5.

Deliberate differences from the reference:
  * The drop is a mask over K slots, not a slice: shapes stay static.
  * The released One-D-Piece models are TiTok's legacy layout (raw-reshape encoder, 1024-logit head, MaskGIT
    VQGAN pixel decoder); here `is_legacy` is a choice, and the default is the pixel head (see titok.py).
  * The optional per-sample draw is ours (the reference draws once per batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tokcomp.tokenizers.titok import TiTok
from tokcomp.tokenizers.transformer import prefix_mask


class OneDPiece(TiTok):
  """TiTok + Tail Token Drop (`decode(..., train=True)` and `__call__(..., train=True)` draw the kept length)."""
  drop_per_sample: bool = False

  def kept_mask(self, length, batch: int, train: bool) -> jax.Array:
    if not train:
      return prefix_mask(length, self.num_latent_tokens, batch)
    k = self.num_latent_tokens
    shape = (batch,) if self.drop_per_sample else ()
    kept = jax.random.randint(self.make_rng("token_drop"), shape, 1, k + 1)
    if length is not None:
      prefix_mask(length, k, batch)  # range-checks a Python int and the shape of an array
      kept = jnp.minimum(kept, jnp.clip(jnp.asarray(length), 1, k))
    return prefix_mask(kept, k, batch)

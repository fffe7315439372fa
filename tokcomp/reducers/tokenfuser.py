"""TokenFuser: maps S learned tokens back to the N positions after a block (Ryoo et al., NeurIPS 2021,
arXiv:2106.11297 v2, §2, and the reference's `TokenFuser`). A linen building block, not a registered reducer.

With Y [S, C] the block's output on the S learned tokens and X [N, C] the block's input (before TokenLearner):
  Y' = LN2( (LN1(Y)ᵀ W_mix)ᵀ )                       W_mix [S, S]: mixes the tokens, per channel
  B  = sigmoid( MLP(LN(X)) )                         MLP: C -> bottleneck -> S, tanh-GELU between     B [N, S]
  out_n = Σ_s B[n, s] Y'_s                           [N, C]; the reference's encoder then adds X (a residual)
`use_normalization=False` drops LN1 and LN2 (the reference's switch, for v1's sum pooling).
Parameters: named as the reference's (`fuser_mix_norm1`, `Dense_0`, `fuser_mix_norm2`, `LayerNorm_0`,
`token_masking/Dense_0`, `token_masking/Dense_1`), so its weights drop in.
Parity: tests/goldens/tokenlearner_fuser_*.npz (tools/goldens/make_tokenlearner.py), scenic's `TokenFuser` on
the same weights, google-research/scenic @ 4a38d47. Dropout (the reference's rate, the identity at inference) is
left out as in tokenlearner.py.

Why it is not a reducer: the reference's `EncoderModFuser` runs, at every block from `tokenlearner_loc` on,
TokenLearner -> the block on S tokens -> TokenFuser(block output, block input) + block input, so the sequence
is N long again between blocks. A reducer step sees one token state at one point of a block ("pre", "mid",
"post") and its output count is what every later block sees; the fuser needs the block's input and output
together, and its blocks run at S while the schedule's count stays N. Wiring it needs a slot that wraps the
block (run the learner before it, keep its input, fuse after it) and a count rule for "S inside, N after";
both are changes to `tokcomp/models/vit.py` and `tokcomp/schedules.py` left to the lead. Meanwhile this module
is parity-tested on its own and used as `TokenFuser()(learned, original)` on the patch tokens (a prefix, if
any, would bypass it, as in tokenlearner.py).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp.reducers.tokenlearner import TokenMasking


class TokenFuser(nn.Module):
  """(learned [B, S, C], original [B, N, C]) -> fused [B, N, C], without the residual. See the docstring."""
  bottleneck: int = 64
  use_normalization: bool = True

  @nn.compact
  def __call__(self, learned: jax.Array, original: jax.Array) -> jax.Array:
    if learned.ndim != 3 or original.ndim != 3 or learned.shape[::2] != original.shape[::2]:
      raise ValueError(f"TokenFuser: learned {learned.shape} and original {original.shape} must be [B, S, C] "
                       f"and [B, N, C] with the same B and C")
    num_tokens = learned.shape[1]
    y = learned
    if self.use_normalization:
      y = nn.LayerNorm(epsilon=1e-6, name="fuser_mix_norm1")(y)
    y = jnp.swapaxes(nn.Dense(num_tokens, kernel_init=nn.initializers.zeros, name="Dense_0")(jnp.swapaxes(y, 1, 2)),
                     1, 2)  # mixes the S tokens per channel
    if self.use_normalization:
      y = nn.LayerNorm(epsilon=1e-6, name="fuser_mix_norm2")(y)
    gate = nn.sigmoid(TokenMasking(self.bottleneck, num_tokens, name="token_masking")(
        nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(original)))  # [B, N, S]
    return jnp.einsum("bns,bsc->bnc", gate, y)

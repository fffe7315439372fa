"""Vision Transformer (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929) with reducer slots in every block.

Numerics follow timm and big_vision so that their weights give their numbers: pre-LN blocks, LayerNorm eps 1e-6,
exact (erf) GELU, qkv bias, a CLS token or global average pooling, optional DeiT distillation token (Touvron et
al. 2021) and register tokens (Darcet et al. 2024). Module names follow big_vision (`embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`, `head`).

Each block has two reducer slots: "pre" (before the block, DynamicViT's placement) and "mid" (after the
attention residual and before the MLP, ToMe's and EViT's). A learned reducer's module sits in its block under
the method's name; `train=True` lets it train at full length with a keep policy (see `tokcomp.tokens`). `reduce` is a config string or a schedule
(`tokcomp.reducers.build_schedule`). The forward returns `(logits, aux)`; `aux["tokens"]` is the final token
state, whose `index` maps every original token to its slot.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Attention, Implementation, Signals
from tokcomp.tokens import Tokens

# width, depth, mlp_dim, heads (Dosovitskiy et al. 2021, Table 1; Ti and S from Touvron et al. 2021, Table 1;
# H from Zhai et al. 2022).
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str | None) -> dict[str, Any]:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=(16, 16)). "B" has no patch."""
  if variant is None:
    return {}
  name, _, patch = variant.partition("/")
  if name not in VARIANTS:
    raise ValueError(f"ViT variant={variant!r}: size must be one of {list(VARIANTS)}, e.g. 'S/16'")
  width, depth, mlp_dim, heads = VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
  if patch:
    if not patch.isdigit() or int(patch) < 1:
      raise ValueError(f"ViT variant={variant!r}: patch size must be a positive int, e.g. 'S/16'")
    out["patch_size"] = (int(patch), int(patch))
  return out


def patch_grid(image_hw: Sequence[int], patch_size: Sequence[int], owner: str) -> tuple[int, int]:
  """(h // ph, w // pw), or a ValueError naming `owner`.patch_size when the image is not a positive multiple."""
  ph, pw = patch_size
  h, w = int(image_hw[0]), int(image_hw[1])
  if h < ph or w < pw or h % ph or w % pw:
    raise ValueError(f"image size {h}x{w}: must be a positive multiple of {owner}.patch_size={tuple(patch_size)}")
  return h // ph, w // pw


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32
  act: str = "gelu"  # "gelu" (exact erf, timm) or "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    if self.act == "gelu":
      x = nn.gelu(x, approximate=False)  # timm uses exact GELU
    elif self.act == "quick_gelu":
      x = x * jax.nn.sigmoid(1.702 * x)
    else:
      raise ValueError(f"MlpBlock.act={self.act!r}: must be 'gelu' or 'quick_gelu'")
    return nn.Dense(width, dtype=self.dtype, name="Dense_1")(x)


class Encoder1DBlock(nn.Module):
  """Pre-LN block: x += Attn(LN x); [mid reducer]; x += MLP(LN x). A "pre" reducer runs before it all.

  A "wrap" step (TokenLearner + TokenFuser) turns the tokens into its own before the block and maps the
  block's output back after it (`module.fuse(out, original)`).
  Two more slots for MCTF (Lee et al. 2024): "post" runs after the MLP with this block's attention signals;
  "ahead" runs before the block with the signals of this block's own attention on the incoming tokens (the
  attention "one step ahead"), called as `reduce(tokens, signals, config=..., fuse_attention=True)` and returning
  (tokens, probs): the block then applies `probs` [B, H, N', N'] to the reduced tokens' values, or recomputes
  its attention when probs is None.
  """
  num_heads: int
  mlp_dim: int
  step: schedules.Step | None = None
  prop_attn: bool = False  # add log(size) to the attention logits (ToMe's proportional attention)
  attn_sparsity: float | None = None  # GTP-ViT's attention sparsification θ < 1 (`attention.sparsify_probs`)
  attn_impl: Implementation = None
  dtype: Any = jnp.float32
  ln_eps: float = 1e-6  # HF CLIP: 1e-5
  mlp_act: str = "gelu"  # see MlpBlock.act
  # Attention signals to compute besides the reducer's; when non-empty the block returns (tokens, signals)
  # (the CLIP tower of models/vlm.py reads every layer's CLS row this way).
  return_signals: tuple[str, ...] = ()

  def _reduce(self, step: schedules.Step, tokens: Tokens, signals: Signals, train: bool) -> Tokens:
    if reducers.is_learned(step):  # a linen module with parameters, named after its method
      return reducers.module(step, name=step.method)(tokens, signals, train=train)
    return reducers.apply(step, tokens, signals)

  @nn.compact
  def __call__(self, tokens: Tokens, encoder_input: Tokens | None = None, train: bool = False) -> Tokens:
    step = self.step
    ln0 = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_0")
    attention = Attention(self.num_heads, implementation=self.attn_impl, dtype=self.dtype,
                          sparsity=self.attn_sparsity, name="MultiHeadDotProductAttention_0")
    probs = None  # attention probabilities an "ahead" reducer hands back for this block to apply
    wrap, original = None, tokens
    if step is not None and step.slot == "wrap":  # the block runs on the step's tokens, mapped back after it
      wrap = reducers.module(step, name=step.method)
      tokens = wrap(tokens, Signals(), train=train)
    elif step is not None and step.slot == "pre":
      tokens = self._reduce(step, tokens, Signals(), train)
    elif step is not None and step.slot == "ahead":  # reads this block's own attention on the incoming tokens
      bias = jnp.log(jnp.maximum(tokens.size, 1e-6)) if self.prop_attn else None
      _, ahead = attention(ln0(tokens.x), tokens.mask, bias, signals=reducers.needed_signals(step))
      tokens, probs = reducers.get(step.method).reduce(tokens, ahead, config=step.config, fuse_attention=True)
    mid = step if step is not None and step.slot == "mid" else None
    post = step if step is not None and step.slot == "post" else None
    y = ln0(tokens.x)
    bias = jnp.log(jnp.maximum(tokens.size, 1e-6)) if self.prop_attn else None
    wanted = tuple(reducers.needed_signals(mid or post)) + tuple(
        s for s in self.return_signals if s not in reducers.needed_signals(mid or post))
    y, signals = attention(y, tokens.mask, bias, signals=tuple(s for s in wanted if s != "encoder_input"),
                           probs=probs, policy=tokens.policy)
    if "encoder_input" in wanted:  # not an attention product: the encoder's input state, handed through
      signals = signals.replace(encoder_input=encoder_input)
    tokens = tokens.replace(x=tokens.x + y)
    if mid is not None:
      tokens = self._reduce(mid, tokens, signals, train)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="LayerNorm_1")(tokens.x)
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, act=self.mlp_act, name="MlpBlock_0")(y)
    tokens = tokens.replace(x=tokens.x + y)
    if post is not None:
      tokens = self._reduce(post, tokens, signals, train)
    if wrap is not None:
      tokens = wrap.fuse(tokens, original)
    if self.return_signals:
      return tokens, signals
    return tokens


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def remat_policy(name: str):
  """`jax.checkpoint` policy for ViT.remat: "full" saves nothing (recompute the whole block in the backward
  pass), "dots_saveable" / "dots_with_no_batch_dims_saveable" keep the matmul outputs, "everything_saveable" keeps
  all (a no-op, for measuring)."""
  if name not in REMAT_POLICIES or name == "none":
    raise ValueError(f"ViT.remat={name!r}: must be one of {REMAT_POLICIES}")
  return jax.checkpoint_policies.nothing_saveable if name == "full" else getattr(jax.checkpoint_policies, name)


class Encoder(nn.Module):
  """The blocks, then the final norm.

  scan=False (default): blocks `encoderblock_{i}`, one traced copy each (big_vision / timm names).
  scan=True: one stacked parameter tree `encoderblock` with a leading [depth] axis (big_vision's scan layout; see
    `stack_blocks` / `unstack_blocks`), whatever the schedule, so one checkpoint serves every reducer. Each run
    of consecutive blocks without a reducer step (equal token counts) is one `lax.scan` over its slice of the
    stack, so a deep dense model compiles one block instead of `depth`; blocks with a step run alone on their
    slice. Training-free reducers only: a learned reducer keeps its parameters inside its block. A block with
    a step slices its weights out of the stack, a copy (measured on CPU: forward temp memory 31 -> 112 MiB for
    ViT-S EViT), so scan is for training and deep models, not for inference with a reducer in many blocks.
  remat: "none", or a `REMAT_POLICIES` name: each block is rematerialised in the backward pass (nn.remat, or
    jax.checkpoint around the scanned body), trading compute for activation memory in training. Measured on
    XLA:CPU it saves memory inside a scan only (ViT-S dense step: 1060 -> 166 MiB with "full");
    benchmarks/scan_remat has the table.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  steps: tuple = ()
  final_norm: bool = True
  attn_impl: Implementation = None
  dtype: Any = jnp.float32
  scan: bool = False
  remat: str = "none"

  def _blocks(self) -> list[tuple[schedules.Step | None, bool]]:
    """(step, prop_attn) per block. Proportional attention starts in the block after the first merge that asks
    for it; an "ahead" merge comes before its block's attention, so there it starts in that block."""
    out, prop = [], False
    for i in range(self.depth):
      step = self.steps[i] if self.steps else None
      ahead = step is not None and step.slot == "ahead" and reducers.get(step.method).prop_attn(step.config)
      out.append((step, prop or ahead))
      prop = prop or (step is not None and reducers.get(step.method).prop_attn(step.config))
    return out

  @nn.compact
  def __call__(self, tokens: Tokens, *, train: bool = False) -> Tokens:
    sparsity = reducers.attention_sparsity(self.steps)  # an attention change of every block (GTP-ViT's θ)
    encoder_input = tokens  # reducers that ask for "encoder_input" get this state (GTP-ViT's graph)
    policy = None if self.remat == "none" else remat_policy(self.remat)
    block_kw = dict(attn_sparsity=sparsity, attn_impl=self.attn_impl, dtype=self.dtype)
    if self.scan:
      tokens = self._scanned(tokens, encoder_input, block_kw, policy, train)
    else:
      block_cls = Encoder1DBlock if policy is None else nn.remat(Encoder1DBlock, static_argnums=(3,), policy=policy)
      for i, (step, prop) in enumerate(self._blocks()):
        tokens = block_cls(self.num_heads, self.mlp_dim, step=step, prop_attn=prop, name=f"encoderblock_{i}",
                           **block_kw)(tokens, encoder_input, train)
    if self.final_norm:
      tokens = tokens.replace(x=nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(tokens.x))
    return tokens

  def _scanned(self, tokens: Tokens, encoder_input: Tokens, block_kw: dict, policy, train: bool) -> Tokens:
    blocks = self._blocks()
    learned = sorted({s.method for s, _ in blocks if s is not None and (reducers.is_learned(s) or s.slot == "wrap")})
    if learned:
      raise ValueError(f"ViT.scan=True runs training-free reducers only, but {learned} keep parameters inside "
                       "their blocks: use scan=False")

    def block(step, prop):  # an unbound block, applied on a slice of the stacked parameters
      return Encoder1DBlock(self.num_heads, self.mlp_dim, step=step, prop_attn=prop, parent=None, **block_kw)

    def apply(module, params, t):
      fn = lambda p, t: module.apply({"params": p}, t, encoder_input, train)
      return (fn if policy is None else jax.checkpoint(fn, policy=policy))(params, t)

    plain = block(None, False)
    stacked = self.param("encoderblock", lambda rng: jax.vmap(
        lambda key: plain.init(key, tokens, encoder_input)["params"])(jax.random.split(rng, self.depth)))
    i = 0
    while i < self.depth:
      step, prop = blocks[i]
      j = i + 1
      if step is None:  # the run of step-free blocks with this prop flag: equal token counts, one scan
        while j < self.depth and blocks[j] == (None, prop):
          j += 1
      if j - i == 1:
        tokens = apply(block(step, prop), jax.tree_util.tree_map(lambda a: a[i], stacked), tokens)
      else:
        module = block(None, prop)
        tokens, _ = jax.lax.scan(lambda t, p: (apply(module, p, t), None), tokens,
                                 jax.tree_util.tree_map(lambda a: a[i:j], stacked))
      i = j
    return tokens


def stack_blocks(params: dict, depth: int | None = None) -> dict:
  """ViT params with `Transformer/encoderblock_{i}` -> the scan layout `Transformer/encoderblock` (leading
  [depth] axis), for `ViT(scan=True)`. The blocks must share one structure (no learned reducer inside)."""
  enc = dict(params["Transformer"])
  names = [k for k in enc if k.startswith("encoderblock_")]
  depth = len(names) if depth is None else depth
  if sorted(names) != sorted(f"encoderblock_{i}" for i in range(depth)):
    raise ValueError(f"stack_blocks: expected Transformer/encoderblock_0..{depth - 1}, found {sorted(names)}")
  per_block = [enc.pop(f"encoderblock_{i}") for i in range(depth)]
  structure = jax.tree_util.tree_structure(per_block[0])
  for i, p in enumerate(per_block):
    if jax.tree_util.tree_structure(p) != structure:
      raise ValueError(f"stack_blocks: encoderblock_{i} differs in structure from encoderblock_0 (a learned "
                       "reducer's parameters?); the scan layout needs identical blocks")
  enc["encoderblock"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_block)
  return {**params, "Transformer": enc}


def unstack_blocks(params: dict) -> dict:
  """The inverse of `stack_blocks`: the scan layout -> `Transformer/encoderblock_{i}` (timm / big_vision names)."""
  enc = dict(params["Transformer"])
  if "encoderblock" not in enc:
    raise ValueError("unstack_blocks: no Transformer/encoderblock (params are not in the scan layout)")
  stacked = enc.pop("encoderblock")
  depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
  for i in range(depth):
    enc[f"encoderblock_{i}"] = jax.tree_util.tree_map(lambda a: a[i], stacked)
  return {**params, "Transformer": enc}


def unscanned(model: "ViT", variables: dict) -> tuple["ViT", dict]:
  """(model, variables) with per-block names, for tools that capture each block's output by name
  (`vis.stage_tokens`, ATS's effective counts); a scan model and its stacked params are converted."""
  if not getattr(model, "scan", False):
    return model, variables
  return model.clone(scan=False), {**variables, "params": unstack_blocks(variables["params"])}


def match_block_layout(params: dict, like: dict) -> dict:
  """`params` in the block layout of `like` (scan or per-block), converting when they differ."""
  if "Transformer" not in params and "params" in params and "params" in like:  # variables: match their params
    return {**params, "params": match_block_layout(dict(params["params"]), dict(like["params"]))}
  if "Transformer" not in params or "Transformer" not in like:  # not ViT parameter trees: nothing to match
    return params
  have, want = "encoderblock" in params["Transformer"], "encoderblock" in like["Transformer"]
  if have == want:
    return params
  return stack_blocks(params) if want else unstack_blocks(params)


class ViT(nn.Module):
  """ViT classifier: images [B, H, W, C] -> (logits [B, classes], aux).

  pool: "token" (classify the final-normed CLS token) or "gap" (mean over the valid patch tokens).
  posemb_prefix: the position embedding covers the prefix tokens too (timm's default) rather than the patches
    only (big_vision, and timm's `no_embed_class` register models).
  fc_norm: with "gap", normalise after pooling instead of before (timm's `global_pool="avg"`).
  """
  num_classes: int = 1000
  patch_size: Sequence[int] = (16, 16)
  width: int = 384
  depth: int = 12
  mlp_dim: int = 1536
  num_heads: int = 6
  class_token: bool = True
  distilled: bool = False
  num_registers: int = 0
  pool: str = "token"
  posemb_prefix: bool = True
  fc_norm: bool = False
  reduce: Any = None  # a config string ("tome:r=13") or a schedule tuple; None for the dense model
  attn_impl: Implementation = None
  dtype: Any = jnp.float32
  scan: bool = False    # see Encoder: stacked block params, one lax.scan per run of step-free blocks
  remat: str = "none"   # see Encoder / REMAT_POLICIES: rematerialise each block in training

  @property
  def num_prefix(self) -> int:
    return int(self.class_token) + int(self.distilled) + self.num_registers

  def check(self):
    if self.pool not in ("token", "gap"):
      raise ValueError(f"ViT.pool={self.pool!r}: must be 'token' or 'gap'")
    if self.pool == "token" and not self.class_token:
      raise ValueError("ViT.pool='token' needs class_token=True")
    if self.distilled and not self.class_token:
      raise ValueError("ViT.distilled=True needs class_token=True (DeiT puts CLS, then the distill token)")
    if self.fc_norm and self.pool != "gap":
      raise ValueError("ViT.fc_norm=True is only meaningful with pool='gap'")
    if self.width % self.num_heads:
      raise ValueError(f"ViT.num_heads={self.num_heads} must divide ViT.width={self.width}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ViT.remat={self.remat!r}: must be one of {REMAT_POLICIES}")

  def grid(self, image_hw: Sequence[int]) -> tuple[int, int]:
    """The patch grid for an image size; a clear error when the size does not fit the patch."""
    return patch_grid(image_hw, self.patch_size, "ViT")

  def plan(self, image_hw: Sequence[int]) -> tuple[schedules.Schedule, tuple[schedules.LayerCounts, ...]]:
    """The resolved per-block schedule and static token counts for an image size (no params needed)."""
    gh, gw = self.grid(image_hw)
    steps = reducers.build_schedule(self.reduce, self.depth)
    return schedules.resolve(steps, self.num_prefix + gh * gw, self.num_prefix)

  def flops(self, image_hw: Sequence[int], in_channels: int = 3) -> float:
    """Analytic forward FLOPs per image (see `schedules.vit_flops`), plus the own layers of learned reducers
    that declare them (`Method.flops`)."""
    gh, gw = self.grid(image_hw)
    steps, counts = self.plan(image_hw)
    flops = schedules.vit_flops(counts, self.width, self.mlp_dim, tuple(self.patch_size), gh * gw,
                                self.num_classes, in_channels)
    n = self.num_prefix + gh * gw
    for step in steps:  # learned reducers' own layers (STViT's generation layers), counted where they run
      if step is not None:
        method = reducers.get(step.method)
        if method.flops is not None:
          flops += method.flops(step.config, n, self.num_prefix, self.width)
        if step.slot != "wrap":  # a wrapping step gives the sequence back at its length
          n = method.out_count(step.config, n, self.num_prefix)
    return flops

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    self.check()
    if images.ndim != 4:
      raise ValueError(f"ViT input shape {images.shape}: must be [B, H, W, C]")
    steps, _ = self.plan(images.shape[1:3])
    gh, gw = self.grid(images.shape[1:3])
    x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size), padding="VALID",
                dtype=self.dtype, name="embedding")(images)
    b = x.shape[0]
    x = x.reshape(b, gh * gw, self.width)  # [B, N, D]

    prefix = []
    if self.class_token:
      prefix.append(self.param("cls", nn.initializers.zeros, (1, 1, self.width)))
    if self.distilled:
      prefix.append(self.param("dist", nn.initializers.zeros, (1, 1, self.width)))
    if self.num_registers:
      prefix.append(self.param("reg", nn.initializers.normal(1e-6), (1, self.num_registers, self.width)))
    prefix = [jnp.broadcast_to(p, (b,) + p.shape[1:]).astype(x.dtype) for p in prefix]

    n_pos = gh * gw + (self.num_prefix if self.posemb_prefix else 0)
    if self.has_variable("params", "pos_embedding") and (
        self.get_variable("params", "pos_embedding").shape[1] != n_pos):  # weights of another resolution
      raise ValueError(f"pos_embedding has {self.get_variable('params', 'pos_embedding').shape[1]} positions but a {images.shape[1]}x{images.shape[2]} "
                       f"image needs {n_pos}: resample it with tokcomp.checkpoints.resample_posemb")
    posemb = self.param("pos_embedding", nn.initializers.normal(0.02), (1, n_pos, self.width))
    posemb = posemb.astype(x.dtype)
    if self.posemb_prefix:
      x = jnp.concatenate(prefix + [x], axis=1) + posemb
    else:
      x = jnp.concatenate(prefix + [x + posemb], axis=1)

    tokens = Tokens.create(x, self.num_prefix, grid=(gh, gw))
    tokens = Encoder(self.depth, self.num_heads, self.mlp_dim, steps=steps,
                     final_norm=not self.fc_norm, attn_impl=self.attn_impl, dtype=self.dtype, scan=self.scan,
                     remat=self.remat, name="Transformer")(tokens, train=train)

    aux: dict[str, Any] = {"tokens": tokens}
    if self.pool == "token":
      pre = tokens.x[:, 0]
    else:
      w = tokens.keep_weight()[:, self.num_prefix:, None]  # the mask, times a training policy if any
      pre = jnp.sum(jnp.where(w > 0, w * tokens.x[:, self.num_prefix:], 0), axis=1) / jnp.maximum(
          jnp.sum(w, axis=1), 1e-6)
      if self.fc_norm:
        pre = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="fc_norm")(pre)
    aux["pre_logits"] = pre
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="head")(pre)
    if self.distilled:
      logits_dist = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                             name="head_dist")(tokens.x[:, 1])
      aux["logits_cls"], aux["logits_dist"] = logits, logits_dist
      logits = (logits + logits_dist) / 2  # DeiT's inference rule
    return logits.astype(jnp.float32), aux


def make(variant: str | None = None, **kwargs) -> ViT:
  """ViT from a variant string plus overrides: `make("S/16", num_classes=10, reduce="tome:r=13")`."""
  return ViT(**{**decode_variant(variant), **kwargs})

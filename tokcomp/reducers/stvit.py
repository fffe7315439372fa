"""STViT: a few semantic tokens replace the image tokens (Chang et al., "Making Vision Transformers Efficient from
A Token Sparsification View", CVPR 2023, arXiv:2303.08685, §3.2 semantic token generation module, §3.4 STViT-R).

Config: `stvit:tokens=16,layer=4[,heads=6,shortcut=1,global=1,layer_scale=1e-5,mlp_ratio=4]`.
  tokens       M semantic tokens: a perfect square (16 -> a 4 x 4 pooling grid) or "HxW" ("4x4")
  layer        the block they are generated before (one block index; required)
  heads        attention heads of the generation layers (default: width // 64 when 64 divides the width, DeiT's
               head size, else 1)
  shortcut     1: the first layer adds its attention to the pooled tokens (P + Attn); 0: the output is the
               attention alone (the reference's default SHORTCUT=False, meant for training from scratch)
  global       1: learned global cluster centres G are added to the second layer's queries (USE_GLOBAL)
  layer_scale  the initial value of both layer scales in each generation layer (the reference's 1e-5)

Semantic token generation (the reference's SemanticAttentionBlock, then Block(s + G, [s, x])), on the patch
tokens X [N, D] of an h x w grid; LN, MHA and MLP are each layer's own (pre-LN, layer-scaled, as the reference):
  P  = AdaptiveMaxPool_{h x w -> H x W}(X)                                   (initial cluster centres, M = H W)
  S1 = [P] + γ1 · MHA(q = LN(P), kv = LN([P; X])),          S1 += γ2 · MLP(LN(S1))     ([P] if shortcut)
  S2 = T + γ1' · MHA(q = LN(T), kv = LN([S1; X])),   T = S1 + G,   S2 += γ2' · MLP(LN(S2))   (G = 0 if not global)
The reducer returns [prefix; S2]: the prefix (CLS, ...) passes through untouched and every later block works on
p + M tokens. Training uses the same static path (max pooling and attention are differentiable).
Slot: "pre" of block `layer`: both generation layers run before that block, with their own parameters.
Count rule: out = protected + M, for any N (M <= the patches; the grid must be at least H x W).
Token state after the reduction (the semantic tokens are new tokens, not a subset or merge): mask all true, grid
None; the assignment of patch n to slot m is the first layer's attention of query m on key X_n, averaged over
heads and normalised over the M slots per patch; `size` is the summed assignment (sizes conserved exactly,
`tokcomp.ops.transform.transform_matrix`) and `index` the slot of the largest share (`dominant_slot`).
The block's input tokens (prefix included) are sown as `intermediates/.../stvit/image_tokens` (a no-op unless the
caller asks for the "intermediates" collection), for STViT-R's recovery.

STViT-R recovery (`Recovery`, the reference's Block(x, semantic_token)), on the saved image tokens X and the
semantic tokens S of the final state:
  X' = X + γ1 · MHA(q = LN(X), kv = LN(S)),   X' += γ2 · MLP(LN(X'))    -> the dense map [B, h, w, D]
Order: prefix first, then the M semantic tokens in raster order of the pooling grid.
Parity: tests/goldens/stvit_*.npz (tools/goldens/make_stvit.py) against the official code changsn/STViT-R @
b4a27a0 (models/layers.py SemanticAttentionBlock and Block, models/multi_scale.py), the global case: a 10 x 10
patch grid with window_size 10, so the reference's one window and its 10 x 10 unfold cover the whole grid.
Deliberate differences from the reference:
  - The reference's STViT code is its Swin variant (semantic tokens per 7 x 7 window, keys from 10 x 10 windows
    with stride 4); the DeiT variant (global semantic tokens, the issue's case) is not in the public code. We
    implement the global variant: one pooling over the whole patch grid and keys from all patches. With one
    window the reference's modules compute exactly this (the golden's setting).
  - The generation layers are inserted before block `layer` with fresh parameters, where the paper's STGM layers
    are layers of the backbone (DeiT's 12 include them): a dense checkpoint keeps all its blocks and the
    reducer starts from pooled tokens (shortcut, layer scale 1e-5). Their cost (`generation_flops`) is in
    `ViT.flops` through `Method.flops`.
  - No extra position embedding: the tokens carry the ViT's absolute one (the reference's optional PosCNN,
    USE_CONV_POS, is off by default). The prefix takes no part in the generation (the Swin reference has none).
  - shortcut defaults to 1 (the paper's residual form; the reference's flag defaults to off) and global to 1.
  - LayerNorm eps 1e-6 (the ViT's; the reference's Swin passes torch's default 1e-5).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tokcomp import reducers, schedules
from tokcomp.attention import Signals, masked_softmax
from tokcomp.ops.transform import dominant_slot, transform_matrix
from tokcomp.tokens import Tokens, _compose

LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Config:
  grid: tuple[int, int]        # (H, W) of the pooling grid; M = H W semantic tokens
  heads: int | None = None     # None: width // 64 if 64 divides the width, else 1
  shortcut: bool = True
  global_centres: bool = True
  layer_scale: float = 1e-5
  mlp_ratio: float = 4.0

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]


def parse_grid(tokens: Any) -> tuple[int, int]:
  """16 -> (4, 4); "4x3" -> (4, 3)."""
  if isinstance(tokens, str) and "x" in tokens:
    a, _, b = tokens.partition("x")
    if a.strip().isdigit() and b.strip().isdigit() and int(a) >= 1 and int(b) >= 1:
      return int(a), int(b)
  elif isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1 and math.isqrt(tokens) ** 2 == tokens:
    return math.isqrt(tokens), math.isqrt(tokens)
  raise ValueError(f"stvit tokens={tokens!r}: must be a perfect square >= 1 (16 -> a 4x4 pooling grid) or 'HxW'")


def build_config(args: dict[str, Any]) -> Config:
  grid = parse_grid(args["tokens"])
  heads = args["heads"]
  if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
    raise ValueError(f"stvit heads={heads!r}: must be an int >= 1 (or left out: width // 64)")
  flags = {}
  for key in ("shortcut", "global"):
    v = args[key]
    if v not in (0, 1, True, False):
      raise ValueError(f"stvit {key}={v!r}: must be 0 or 1")
    flags[key] = bool(v)
  ls = args["layer_scale"]
  if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0 < ls < float("inf"):
    raise ValueError(f"stvit layer_scale={ls!r}: must be a finite number > 0")
  ratio = args["mlp_ratio"]
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < float("inf"):
    raise ValueError(f"stvit mlp_ratio={ratio!r}: must be a finite number > 0")
  return Config(grid, heads, flags["shortcut"], flags["global"], float(ls), float(ratio))


def build(args, depth):
  args = reducers.check_args("stvit", args, {"tokens": 16, "layer": None, "heads": None, "shortcut": 1,
                                             "global": 1, "layer_scale": 1e-5, "mlp_ratio": 4})
  if args["layer"] is None:
    raise ValueError(f"stvit layer: required, the block index in [0, {depth - 1}] the semantic tokens are made before")
  layers = schedules.parse_layers(args["layer"], depth, "stvit layer")
  if len(layers) != 1:
    raise ValueError(f"stvit layer={args['layer']!r}: must be one block index (the tokens are generated once)")
  step = schedules.Step("stvit", build_config(args), slot="pre")
  return tuple(step if i == layers[0] else None for i in range(depth))


def resolve(config: Config, n: int, protected: int) -> Config:
  if not config.num_tokens <= n - protected:
    raise ValueError(f"stvit tokens={config.num_tokens} ({config.grid[0]}x{config.grid[1]}): must be at most the "
                     f"{n - protected} patches entering the block")
  return config


def out_count(config: Config, n: int, protected: int) -> int:
  return protected + config.num_tokens


def num_heads(config_heads: int | None, width: int, what: str = "stvit heads") -> int:
  heads = config_heads if config_heads is not None else (width // 64 if width % 64 == 0 else 1)
  if width % heads:
    raise ValueError(f"{what}={heads}: must divide the width {width}")
  return heads


def generation_flops(config: Config, num_patches: int, width: int) -> float:
  """Forward FLOPs of the two generation layers per image (2 per multiply-add, counted as `schedules.vit_flops`):
  per layer with M queries and K = M + N keys: q and out projections 2 M D², k and v 2 K D², scores and values
  2 M K D, MLP 2 M D F."""
  m, d = config.num_tokens, width
  f = int(width * config.mlp_ratio)
  k = m + num_patches
  return 2.0 * 2 * (2 * m * d * d + 2 * k * d * d + 2 * m * k * d + 2 * m * d * f)


def adaptive_bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
  """torch's adaptive pooling bins: [floor(i n_in / n_out), ceil((i + 1) n_in / n_out)) for i < n_out."""
  return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def adaptive_max_pool(x: jax.Array, grid: tuple[int, int], out: tuple[int, int]) -> jax.Array:
  """[B, h w, D] patches in raster order -> [B, H W, D], the max of each adaptive bin (F.adaptive_max_pool2d).
  Static slices, one per output cell."""
  b, _, d = x.shape
  img = x.reshape(b, grid[0], grid[1], d)
  cells = [jnp.max(img[:, r0:r1, c0:c1], axis=(1, 2))
           for r0, r1 in adaptive_bins(grid[0], out[0]) for c0, c1 in adaptive_bins(grid[1], out[1])]
  return jnp.stack(cells, axis=1)


class CrossLayer(nn.Module):
  """A pre-LN transformer layer whose queries and keys differ (the reference's Block(x, y)):
    out = [q_in] + γ1 · MHA(LN(q_in), LN(kv_in)),  out += γ2 · MLP(LN(out)).
  Returns (out [B, M, D], attention probabilities [B, H, M, K] in fp32)."""
  num_heads: int | None = None
  mlp_ratio: float = 4.0
  layer_scale: float = 1e-5
  residual: bool = True

  @nn.compact
  def __call__(self, q_in: jax.Array, kv_in: jax.Array, kv_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    width = q_in.shape[-1]
    heads = num_heads(self.num_heads, width)
    head_dim = width // heads
    norm1 = nn.LayerNorm(epsilon=LN_EPS, name="norm1")
    dense = lambda name: nn.DenseGeneral((heads, head_dim), name=name)
    q = dense("query")(norm1(q_in))
    kv = norm1(kv_in)
    k, v = dense("key")(kv), dense("value")(kv)  # [B, K, H, d]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(head_dim)
    probs = masked_softmax(logits, kv_mask[:, None, None, :])
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32)).astype(v.dtype)
    y = nn.DenseGeneral(width, axis=(-2, -1), name="out")(y)
    scale = lambda name: self.param(name, nn.initializers.constant(self.layer_scale), (width,))
    x = scale("layer_scale_1") * y
    if self.residual:
      x = q_in + x
    h = nn.LayerNorm(epsilon=LN_EPS, name="norm2")(x)
    # The ViT's MlpBlock (Dense, exact GELU, Dense) would be an import cycle (models.vit imports the registry).
    h = nn.Dense(int(width * self.mlp_ratio), name="mlp_in")(h)
    h = nn.Dense(width, name="mlp_out")(nn.gelu(h, approximate=False))
    return x + scale("layer_scale_2") * h, probs


def semantic_tokens(module: nn.Module, config: Config, x: jax.Array, mask: jax.Array, grid: tuple[int, int]
                    ) -> tuple[jax.Array, jax.Array]:
  """The two generation layers on patches x [B, N, D] (grid h x w): (S2 [B, M, D], first-layer probs)."""
  m = config.num_tokens
  pooled = adaptive_max_pool(x, grid, config.grid)
  kv_mask = jnp.concatenate([jnp.ones(pooled.shape[:2], bool), mask], axis=1)
  layer = lambda name, residual: CrossLayer(config.heads, config.mlp_ratio, config.layer_scale, residual,
                                            parent=module, name=name)
  s1, probs = layer("generate", config.shortcut)(pooled, jnp.concatenate([pooled, x], axis=1), kv_mask)
  queries = s1
  if config.global_centres:
    centres = module.param("global_centres", nn.initializers.truncated_normal(0.02), (1, m, x.shape[-1]))
    queries = s1 + centres.astype(s1.dtype)
  s2, _ = layer("refine", True)(queries, jnp.concatenate([s1, x], axis=1), kv_mask)
  return s2, probs[..., m:]


class STViT(nn.Module):
  """Semantic token generation: reducer signature (tokens, signals, *, train) -> tokens. See the module docstring."""
  config: Config

  @nn.compact
  def __call__(self, tokens: Tokens, signals: Signals, *, train: bool = False) -> Tokens:
    c, p = self.config, tokens.num_protected
    if tokens.grid is None:
      raise ValueError("stvit: the patches entering the block are no longer a full grid (a reducer ran before it); "
                       "the semantic tokens are pooled from the patch grid, so stvit must come first")
    if tokens.grid[0] < c.grid[0] or tokens.grid[1] < c.grid[1]:
      raise ValueError(f"stvit tokens={c.grid[0]}x{c.grid[1]}: the pooling grid must fit the patch grid "
                       f"{tokens.grid[0]}x{tokens.grid[1]}")
    if tokens.policy is not None:
      raise ValueError("stvit: got tokens with a training keep policy; stvit trains on its static path and cannot "
                       "follow a full-length (policy) reducer")
    self.sow("intermediates", "image_tokens", tokens.x)
    x, mask = tokens.x[:, p:], tokens.mask[:, p:]
    s, probs = semantic_tokens(self, c, x, mask, tokens.grid)
    # Assignment [B, p + N, p + M]: the prefix stays where it is; patch n goes to the slots by how much each
    # semantic query attended to it (head mean), normalised per patch.
    share = jnp.swapaxes(jnp.mean(probs, axis=1), 1, 2)  # [B, N, M]
    share = share / jnp.maximum(jnp.sum(share, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    eye = jnp.broadcast_to(jnp.eye(p, p + c.num_tokens, dtype=share.dtype), (tokens.batch, p, p + c.num_tokens))
    assign = jnp.concatenate([eye, jnp.pad(share, ((0, 0), (0, 0), (p, 0)))], axis=1)
    _, size = transform_matrix(assign, tokens.size, tokens.mask, tokens.num_original)
    index = _compose(tokens.index, dominant_slot(assign, tokens.mask))
    return tokens.replace(x=jnp.concatenate([tokens.x[:, :p], s.astype(tokens.x.dtype)], axis=1),
                          mask=jnp.ones((tokens.batch, p + c.num_tokens), bool),
                          size=size.astype(tokens.size.dtype), index=index, grid=None)


class Recovery(nn.Module):
  """STViT-R's recovery layer: the saved image tokens attend to the final semantic tokens -> [B, h, w, D].

  __call__(tokens, image_tokens, grid): `tokens` the final token state (its slots after the prefix are the
  semantic tokens; masked slots are not attended), `image_tokens` [B, p + h w, D] the tokens that entered the
  stvit block (`image_tokens_of(state)`), grid (h, w). Its parameters are its own (the reference's recovery
  Block); heads, mlp_ratio and layer_scale as the generation layers'.
  """
  num_heads: int | None = None
  mlp_ratio: float = 4.0
  layer_scale: float = 1e-5

  @nn.compact
  def __call__(self, tokens: Tokens, image_tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    p = tokens.num_protected
    b, n, d = image_tokens.shape
    if n - p != grid[0] * grid[1] or d != tokens.x.shape[-1]:
      raise ValueError(f"stvit Recovery: image_tokens {image_tokens.shape} must be [B, {p} + h*w, {tokens.x.shape[-1]}]"
                       f" for grid {grid} and {p} prefix tokens")
    x, _ = CrossLayer(self.num_heads, self.mlp_ratio, self.layer_scale, True, name="recover")(
        image_tokens[:, p:], tokens.x[:, p:], tokens.mask[:, p:])
    return x.reshape(b, grid[0], grid[1], d)


def image_tokens_of(state: Any) -> jax.Array:
  """The tokens the stvit block saw, from the mutable state of `model.apply(..., mutable=["intermediates"])`."""
  found = []

  def walk(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
      for k, v in tree.items():
        if k == "stvit" and "image_tokens" in v:
          found.append(v["image_tokens"][0])
        else:
          walk(v)
  walk(state.get("intermediates", state) if hasattr(state, "get") else state)
  if len(found) != 1:
    raise ValueError(f"image_tokens_of: found {len(found)} saved stvit inputs; apply the model with "
                     f"mutable=['intermediates'] and one stvit step")
  return found[0]


reducers.register(reducers.Method(
    name="stvit", reduce=None, module=STViT, signals=(), build=build, out_count=out_count, resolve=resolve,
    flops=lambda c, n, p, width: generation_flops(c, n - p, width), example="stvit:tokens=9,layer=1,heads=2"))

"""Token clustering layer (Liang et al., "Expediting Large-Scale Vision Transformer for Dense Prediction
without Fine-tuning", NeurIPS 2022, arXiv:2210.01035, §3, "token clustering layer").

The h x w patch tokens X become M = h' x w' cluster tokens C (a static count):
  init   C⁰ = adaptive average pooling of the patch grid to h' x w'
  step   A_nm = softmax over m in N_λ(n) of (-τ ||x_n - c_m||²)     (N_λ(n): centres whose cell lies in the
                                                                      λ x λ cell window around n's own cell)
         c_m  = Σ_n A_nm s_n x_n / Σ_n A_nm s_n                       (s_n: the incoming token size, 1 fresh)
  `iters` steps; τ multiplies the squared distance, as the reference's `temperture` (0.02 for its ViT-L).
The prefix (CLS, registers) is untouched. The reconstruction layer lives in `tokcomp/models/dense.py`: it needs
the pre-clustering features and the centres, which `cluster_tokens` returns beside the tokens as a
`ClusterState`; the registered reducer alone returns only the tokens.

Config: `cluster:grid=8x8,layer=4,iters=5,tau=0.02,lam=5`
  grid   h'xw' cluster tokens, e.g. 8x8; each side at most the patch grid's
  layer  α: cluster after α blocks, i.e. before block α (0-based; the "pre" slot), α in [0, depth)
  iters  soft k-means steps (>= 1; the reference's n_iters, default 5)
  tau    τ > 0 (default 0.02, the reference's ViT-L configs)
  lam    λ, the odd neighbourhood window in cells (the reference's window_size, default 5)
Count: P + h*w -> P + h'*w'. Needs the full patch grid (`Tokens.grid`), so it runs before any other reducer.
Order: prefix, then the centres in raster order of their h' x w' cells; `Tokens.grid` becomes (h', w').
index: the hard assignment, argmin_m ||x_n - c_m||² over all M final centres (the reference's `hard_labels`,
       computed without the locality window), so `Tokens.unmerge` gives the piecewise-constant map.
size:  Σ s_n over the patches hard-assigned to the centre, so size and index agree exactly (what `reassign`
       keeps for every merge). A centre that is nobody's nearest keeps size 0 but stays valid (mask true): it
       still attends and is attended, as in the reference. The soft mass Σ_n A_nm s_n is in `ClusterState`.
Parity: tests/goldens/cluster_*.npz (tools/goldens/make_cluster.py,
        Expedit-LargeScale-Vision-Transformer/Expedit-Segmenter @ 63f4066, mmseg/ops/cluster.py).
Deliberate differences from the reference: token sizes weight the means (equal to it for fresh tokens);
the locality mask is -inf on the logits rather than +1e16 on the distance (the same softmax unless τ·1e16
does not swamp the distances); the initial cell of a patch is computed in integers, floor(r h'/h), where
torch's nearest interpolation computes floor(r * (h'/h)) in floats (equal on every grid the goldens use).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from tokcomp import reducers, schedules
from tokcomp.attention import Signals
from tokcomp.ops import cluster as ops
from tokcomp.tokens import Tokens


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  grid: tuple[int, int]  # (h', w') cluster tokens
  iters: int = 5
  tau: float = 0.02
  lam: int = 5


@struct.dataclass
class ClusterState:
  """What the reconstruction layer needs from clustering time."""
  patches: jax.Array  # [B, h*w, D] patch features entering the clustering layer
  centres: jax.Array  # [B, M, D]   the cluster tokens it produced
  mass: jax.Array     # [B, M]      soft mass of each centre in the last step, sum_n A_nm s_n
  grid: tuple[int, int] = struct.field(pytree_node=False, default=(0, 0))  # the patch grid (h, w)


def check_config(config: ClusterConfig) -> None:
  gh, gw = config.grid
  for field, v in (("grid height", gh), ("grid width", gw), ("iters", config.iters), ("lam", config.lam)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"cluster {field}={v!r}: must be an int >= 1")
  if config.lam % 2 == 0:
    raise ValueError(f"cluster lam={config.lam}: must be odd (a λ x λ window centred on the token's cell)")
  if not (isinstance(config.tau, (int, float)) and math.isfinite(config.tau) and config.tau > 0):
    raise ValueError(f"cluster tau={config.tau!r}: must be a finite number > 0")


def cluster_tokens(tokens: Tokens, config: ClusterConfig) -> tuple[Tokens, ClusterState]:
  """Clusters the patch tokens into config.grid centres; returns the new tokens and the reconstruction state."""
  check_config(config)
  if tokens.grid is None:
    raise ValueError("cluster needs the tokens on their full patch grid (Tokens.grid is None after a reduction): "
                     "put it before any other reducer")
  p, grid = tokens.num_protected, tokens.grid
  patches = tokens.x[:, p:]
  pool = ops.adaptive_pool_matrix(grid, config.grid)  # raises on a grid larger than the patch grid
  init = jnp.einsum("mn,bnd->bmd", pool, patches.astype(jnp.float32))
  weight = jnp.where(tokens.mask[:, p:], tokens.size[:, p:], 0.0)
  centres, mass, hard = ops.soft_kmeans(patches, weight, init, ops.locality_mask(grid, config.grid, config.lam),
                                        config.tau, config.iters)
  m = config.grid[0] * config.grid[1]
  dest = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (tokens.batch, p)), p + hard], axis=1)
  out = tokens.reassign(dest, p + m).replace(
      x=jnp.concatenate([tokens.x[:, :p], centres], axis=1),
      mask=jnp.concatenate([tokens.mask[:, :p], jnp.ones((tokens.batch, m), bool)], axis=1),
      grid=tuple(config.grid))
  return out, ClusterState(patches=patches, centres=centres, mass=mass, grid=grid)


def reduce(tokens: Tokens, signals: Signals, *, config: ClusterConfig) -> Tokens:
  del signals
  return cluster_tokens(tokens, config)[0]


def parse_grid(grid) -> tuple[int, int]:
  """"8x8", "8x6" or (8, 6) -> (h', w'). A bare int is refused: the spec parser reads "0x3" as the hex
  literal 3, so an int cannot be told apart from a mistyped grid."""
  if isinstance(grid, (tuple, list)) and len(grid) == 2:
    return tuple(grid)
  if isinstance(grid, str):
    parts = grid.lower().split("x")
    if len(parts) == 2 and all(t.strip().isdigit() for t in parts):
      return int(parts[0]), int(parts[1])
  raise ValueError(f"cluster grid={grid!r}: must be HxW with both sides >= 1, e.g. 8x8 (a bare int is refused: "
                   f"'0x3' reads as the hex number 3)")


def build_config(args) -> tuple[ClusterConfig, int | str]:
  """Parsed spec arguments -> (config, layer argument). Shared with `tokcomp.models.dense`."""
  args = reducers.check_args("cluster", args, {"grid": None, "layer": None, "iters": 5, "tau": 0.02, "lam": 5})
  for key in ("grid", "layer"):
    if args[key] is None:
      raise ValueError(f"cluster: argument {key} is required, e.g. cluster:grid=8x8,layer=4")
  config = ClusterConfig(parse_grid(args["grid"]), args["iters"], args["tau"], args["lam"])
  check_config(config)
  return config, args["layer"]


def _build(args, depth):
  config, layer = build_config(args)
  layers = schedules.parse_layers(layer, depth, "cluster layer")
  if len(layers) != 1:
    raise ValueError(f"cluster layer={layer!r}: must be one block index (the method clusters once)")
  return tuple(schedules.Step("cluster", config, slot="pre") if i == layers[0] else None for i in range(depth))


def _out_count(config: ClusterConfig, n: int, protected: int) -> int:
  m = config.grid[0] * config.grid[1]
  if m > n - protected:
    raise ValueError(f"cluster grid={config.grid[0]}x{config.grid[1]}: {m} clusters for {n - protected} patches; "
                     f"must be at most the patch count")
  return protected + m


reducers.register(reducers.Method(
    name="cluster", reduce=reduce, signals=(), build=_build, out_count=_out_count,
    example="cluster:grid=3x4,layer=1,tau=0.05,lam=3"))

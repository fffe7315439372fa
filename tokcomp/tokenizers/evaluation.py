"""Reconstruction evaluation for the 1D tokenizers: PSNR and SSIM against the number of tokens kept, a table,
a plot, and a reconstruction grid.

  PSNR = 10 log10(1 / MSE) per image, images in [0, 1] (reconstructions clipped to [0, 1] first), then averaged.
  SSIM (Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity", IEEE TIP 2004,
  eq. 13): per pixel (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)) with an 11 x 11 Gaussian
  window (σ = 1.5, 'valid' positions only), C1 = (0.01)², C2 = (0.03)², averaged over the map and the channels
  per image, then over images. These are the paper's constants and window, as in scikit-image with
  `gaussian_weights=True, use_sample_covariance=False, data_range=1`.

The length sweep compiles the model once: the kept length is a traced argument (a prefix mask), so evaluating
K lengths costs K forward passes and one compile.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tokcomp import bench, data


def psnr(recon: jax.Array, target: jax.Array) -> jax.Array:
  """Per-image PSNR in dB of [B, H, W, C] images in [0, 1] (recon is clipped). An exact match gives +inf
  clipped to 100 dB."""
  mse = jnp.mean(jnp.square(jnp.clip(recon, 0, 1).astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
  return jnp.minimum(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)), 100.0)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return (g / g.sum()).astype(np.float32)


def ssim(recon: jax.Array, target: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
  """Per-image SSIM of [B, H, W, C] images in [0, 1] (recon clipped); H and W must be >= window."""
  b, h, w, c = target.shape
  if h < window or w < window:
    raise ValueError(f"ssim: images {h}x{w} are smaller than the window={window}")
  g = jnp.asarray(_gaussian_window(window, sigma))
  x = jnp.clip(recon, 0, 1).astype(jnp.float32)
  y = target.astype(jnp.float32)

  def blur(a):  # separable 'valid' Gaussian filter over H and W, per channel
    a = jnp.moveaxis(a, -1, 1).reshape(b * c, h, w)
    a = jax.vmap(lambda im: jax.vmap(lambda row: jnp.convolve(row, g, mode="valid"))(im))(a)
    a = jax.vmap(lambda im: jax.vmap(lambda col: jnp.convolve(col, g, mode="valid"), in_axes=1, out_axes=1)(im))(a)
    return a

  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mx, my = blur(x), blur(y)
  sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return s.reshape(b, c, -1).mean(axis=(1, 2))


@dataclasses.dataclass
class CurveRow:
  tokens: int
  psnr: float
  ssim: float


def to_unit_range(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Undo `data.Normalize`: (x - mean) / std -> x in [0, 1]."""
  return images * np.float32(std) + np.float32(mean)


def length_curve(model, params, source, lengths: Sequence[int], *, batch: int, limit: int | None = None,
                 mean=(0.0,), std=(1.0,), image_size: int | None = None) -> list[CurveRow]:
  """Mean PSNR / SSIM over a split at each kept length. One compile: the length is traced."""
  @jax.jit
  def scores(p, images, length):
    recon = model.apply(p, images, length=length, method=model.reconstruct)
    return psnr(recon, images), ssim(recon, images)

  sums = {n: np.zeros(2) for n in lengths}
  total = 0
  for bt in data.eval_batches(source, batch=batch, mean=mean, std=std, limit=limit, image_size=image_size):
    images = to_unit_range(bt["image"], mean, std)
    valid = bt["mask"]
    for n in lengths:
      p, s = scores(params, images, jnp.int32(n))
      sums[n] += [float(np.sum(np.asarray(p)[valid])), float(np.sum(np.asarray(s)[valid]))]
    total += int(valid.sum())
  return [CurveRow(n, sums[n][0] / total, sums[n][1] / total) for n in lengths]


def reconstruction_grid(model, params, images: np.ndarray, lengths: Sequence[int], path: str, title: str) -> None:
  """A PNG: the originals in the first row, then one row per kept length."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rec = jax.jit(lambda p, x, n: model.apply(p, x, length=n, method=model.reconstruct))
  rows = [np.asarray(images)] + [np.clip(np.asarray(rec(params, images, jnp.int32(n))), 0, 1) for n in lengths]
  labels = ["input"] + [f"{n} tok" for n in lengths]
  fig, axes = plt.subplots(len(rows), len(images), figsize=(0.9 * len(images) + 0.6, 0.9 * len(rows) + 0.5),
                           squeeze=False)
  for r, (row, label) in enumerate(zip(rows, labels)):
    for i, im in enumerate(row):
      ax = axes[r, i]
      ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_ylabel(label, fontsize=7)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_curves(curves: dict[str, list[CurveRow]], workdir: str, title: str, name: str = "recon",
                 extra: dict[str, Any] | None = None) -> dict:
  """`<name>.json`, `<name>.md` (PSNR and SSIM per kept length, one column pair per model) and `<name>.png`
  (PSNR and SSIM against tokens kept) in `workdir`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(workdir, exist_ok=True)
  device, date = bench.device_name(), datetime.date.today().isoformat()
  payload = {"title": title, "device": device, "date": date, "jax": jax.__version__, **(extra or {}),
             "curves": {k: [dataclasses.asdict(r) for r in v] for k, v in curves.items()}}
  names = list(curves)
  lengths = sorted({r.tokens for v in curves.values() for r in v})
  md = (f"{title}\n\nDevice: {device}. Date: {date}. JAX {jax.__version__}. PSNR (dB) / SSIM of the "
        f"reconstruction from the first n tokens, mean over the evaluated images.\n\n"
        f"| tokens | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n")
  for n in lengths:
    cells = []
    for k in names:
      row = next((r for r in curves[k] if r.tokens == n), None)
      cells.append("" if row is None else f"{row.psnr:.2f} / {row.ssim:.3f}")
    md += f"| {n} | " + " | ".join(cells) + " |\n"
  with open(os.path.join(workdir, name + ".json"), "w") as f:
    json.dump(payload, f, indent=1)
  with open(os.path.join(workdir, name + ".md"), "w") as f:
    f.write(md)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
    for i, k in enumerate(names):
      rs = sorted(curves[k], key=lambda r: r.tokens)
      ax.plot([r.tokens for r in rs], [getattr(r, key) for r in rs], "-", marker="os^D"[i % 4], ms=3, label=k)
    ax.set_xlabel("tokens kept (prefix length)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{title}\n{device}, {date}", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, name + ".png"), dpi=110)
  plt.close(fig)
  return payload

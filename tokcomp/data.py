"""Input pipelines: tfds data sources (no TensorFlow needed), in-memory arrays, .npz files and the embedded
Fashion-MNIST subset, fed through grain (per-host sharding, seeded shuffling, augmentation, batching).

  source = data.get_source("embedded:fashion_mnist", "train")   # or "tfds:fashion_mnist", "npz:/path/x.npz"
  loader = data.train_loader(source, global_batch=128, seed=0, crop_pad=2, flip=True)
  for batch in loader: ...                                       # {"image": [b, H, W, C] f32, "label": [b] i32}

Each host reads only its shard (grain's `ShardByJaxProcess`) and gets `global_batch / process_count` examples
per step; `train.py` assembles the global array with `jax.make_array_from_process_local_data`. Eval batches
keep a static shape: the last one is padded and carries a `mask`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

import grain.python as grain
import jax
import numpy as np

EMBEDDED = {"fashion_mnist": os.path.join(os.path.dirname(__file__), "assets", "fashion_mnist_small.npz")}
# Per-channel mean / std of the 60k Fashion-MNIST training images (in [0, 1]).
STATS = {"fashion_mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,)),
         "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


class ArraySource(grain.RandomAccessDataSource):
  """In-memory images [N, H, W(, C)] uint8 and labels [N] as a random-access source of {"image", "label"}."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = "arrays"):
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f"ArraySource: images {images.shape} must be [N, H, W(, C)] with N = len(labels) = "
                       f"{len(labels)}")
    self.images, self.labels, self.name = images, np.asarray(labels).astype(np.int32), name

  def __repr__(self) -> str:  # grain checks it when a data iterator is restored: stable across runs
    return f"ArraySource({self.name}, n={len(self)}, image={self.images.shape[1:]})"

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"image": self.images[i], "label": self.labels[i]}


class TfdsSource(grain.RandomAccessDataSource):
  """`tfds.data_source(name, split)` (ArrayRecord, read without TensorFlow), records as {"image", "label"}."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, download: bool = False):
    import tensorflow_datasets as tfds  # imported lazily: accelerator hosts may not have it
    self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    self.name = f"{name}:{split}"

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, n={len(self)})"

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    ex = self.source[i]
    image = np.asarray(ex["image"])
    return {"image": image if image.ndim == 3 else image[..., None], "label": np.int32(ex["label"])}


def load_npz(path: str, split: str) -> ArraySource:
  """An .npz with `<split>_images` and `<split>_labels` (the layout of ../shared/data/fashion_mnist.npz)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data file {path!r} does not exist")
  with np.load(path, allow_pickle=False) as f:
    keys = (f"{split}_images", f"{split}_labels")
    if any(k not in f.files for k in keys):
      raise ValueError(f"{path!r} has no split {split!r}: expected keys {keys}, found {sorted(f.files)}")
    return ArraySource(f[keys[0]], f[keys[1]], name=f"{os.path.basename(path)}:{split}")


def get_source(spec: str, split: str, data_dir: str | None = None) -> grain.RandomAccessDataSource:
  """"embedded:fashion_mnist" | "npz:/path/file.npz" | "tfds:name" (optionally "tfds:name/config:version")."""
  kind, _, name = spec.partition(":")
  if kind == "embedded":
    if name not in EMBEDDED:
      raise ValueError(f"data source {spec!r}: embedded data sets are {sorted(EMBEDDED)}")
    return load_npz(EMBEDDED[name], split)
  if kind == "npz":
    return load_npz(name, split)
  if kind == "tfds":
    return TfdsSource(name, split, data_dir=data_dir)
  raise ValueError(f"data source {spec!r}: must start with 'embedded:', 'npz:' or 'tfds:'")


def stats_for(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  name = spec.partition(":")[2]
  base = os.path.basename(name).split(".")[0].split("/")[0]
  for key, value in STATS.items():
    if base.startswith(key):
      return value
  return (0.5,), (0.5,)


@dataclasses.dataclass(frozen=True)
class Normalize(grain.MapTransform):
  """uint8 [H, W, C] -> float32 (x / 255 - mean) / std."""
  mean: Sequence[float]
  std: Sequence[float]

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    x = element["image"].astype(np.float32) / 255.0
    return {**element, "image": (x - np.float32(self.mean)) / np.float32(self.std)}


@dataclasses.dataclass(frozen=True)
class RandomCropFlip(grain.RandomMapTransform):
  """Random crop after zero padding by `pad` on each side (padding in normalized space), and a random
  horizontal flip: the standard small-image augmentation (e.g. He et al. 2016 §4.2)."""
  pad: int = 0
  flip: bool = False

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    x = element["image"]
    h, w = x.shape[:2]
    if self.pad:
      x = np.pad(x, ((self.pad, self.pad), (self.pad, self.pad), (0, 0)))
      i, j = rng.integers(0, 2 * self.pad + 1, size=2)
      x = x[i:i + h, j:j + w]
    if self.flip and rng.random() < 0.5:
      x = x[:, ::-1]
    return {**element, "image": np.ascontiguousarray(x)}


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image  # Pillow ships with matplotlib
  img = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).resize((w, h), Image.BILINEAR)
  out = np.asarray(img)
  return out[..., None] if out.ndim == 2 else out


@dataclasses.dataclass(frozen=True)
class InceptionCrop(grain.RandomMapTransform):
  """Random-resized crop (Szegedy et al. 2015; the ImageNet ViT/DeiT recipe): a crop of area in `area` x image
  and aspect ratio in `ratio` (log-uniform), resized to size x size. Applied to uint8 images."""
  size: int
  area: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    x = element["image"]
    h, w = x.shape[:2]
    for _ in range(10):
      target = h * w * rng.uniform(*self.area)
      aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
      cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
      if 0 < cw <= w and 0 < ch <= h:
        i, j = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return {**element, "image": _resize(x[i:i + ch, j:j + cw], self.size, self.size)}
    return {**element, "image": ResizeCenterCrop(self.size).map(element)["image"]}  # fallback: center crop


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop(grain.MapTransform):
  """Resize the short side to size / crop_fraction, then take the central size x size (eval, uint8 images)."""
  size: int
  crop_fraction: float = 0.875

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    x = element["image"]
    h, w = x.shape[:2]
    short = int(round(self.size / self.crop_fraction))
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    x = _resize(x, nh, nw)
    i, j = (nh - self.size) // 2, (nw - self.size) // 2
    return {**element, "image": x[i:i + self.size, j:j + self.size]}


def local_batch_size(global_batch: int) -> int:
  n = jax.process_count()
  if global_batch <= 0 or global_batch % n:
    raise ValueError(f"global batch {global_batch}: must be a positive multiple of the process count {n}")
  return global_batch // n


def train_loader(source, *, global_batch: int, seed: int = 0, image_size: int | None = None,
                 inception_crop: bool = False, crop_pad: int = 0, flip: bool = False,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), worker_count: int = 0,
                 shard_options: grain.ShardOptions | None = None) -> grain.DataLoader:
  """An endless, seeded, shuffled loader of this host's shard, in full batches of global_batch / hosts.

  image_size: resize to a square (inception crop when `inception_crop`, else resize + center crop); None keeps
  the source's size (which must then be fixed)."""
  sampler = grain.IndexSampler(num_records=len(source), shuffle=True, seed=seed, num_epochs=None,
                               shard_options=shard_options or grain.ShardByJaxProcess(drop_remainder=True))
  ops = []
  if image_size:
    ops.append(InceptionCrop(image_size) if inception_crop else ResizeCenterCrop(image_size))
  ops.append(Normalize(tuple(mean), tuple(std)))
  if crop_pad or flip:
    ops.append(RandomCropFlip(crop_pad, flip))
  ops.append(grain.Batch(local_batch_size(global_batch), drop_remainder=True))
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops, worker_count=worker_count)


def eval_batches(source, *, batch: int, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
                 limit: int | None = None, image_size: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in batches of a static size; the last is padded, with `mask` false there."""
  n = len(source) if limit is None else min(limit, len(source))
  norm = Normalize(tuple(mean), tuple(std))
  crop = ResizeCenterCrop(image_size) if image_size else None
  prep = (lambda e: norm.map(crop.map(e))) if crop else norm.map
  for start in range(0, n, batch):
    items = [prep(source[i]) for i in range(start, min(start + batch, n))]
    valid = len(items)
    items += [items[-1]] * (batch - valid)
    yield {"image": np.stack([e["image"] for e in items]), "label": np.stack([e["label"] for e in items]),
           "mask": np.arange(batch) < valid}


def mixup(rng: jax.Array, images: jax.Array, labels: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
  """mixup (Zhang et al., ICLR 2018, eq. 1): x = λ x_i + (1 - λ) x_j, y likewise, λ ~ Beta(α, α) per batch,
  j a reversal of the batch. `labels` are one-hot / soft [B, C]. α <= 0 returns the inputs unchanged."""
  if alpha <= 0:
    return images, labels
  lam = jax.random.beta(rng, alpha, alpha)
  return lam * images + (1 - lam) * images[::-1], lam * labels + (1 - lam) * labels[::-1]

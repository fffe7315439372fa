"""Shared helpers for the PyTorch-reference golden fixture scripts.

These scripts run OUTSIDE tokcomp's own environment, in a separate virtualenv with
torch 2.13.0 (CPU), torchvision 0.28.0 and timm 1.0.31 (see tools/goldens/README.md).
Nothing here is imported by tokcomp or its tests; the tests only read the .npz files.

Helpers:
  * ``register_torchvision_nms_stub()`` -- the CPU torchvision 0.28 wheel used here has no
    compiled ``torchvision::nms`` op, and ``import timm`` (via torchvision) fails without a
    schema for it. Declaring the schemas is enough; the ops are never called.
  * ``perturb_parameters()`` -- add seeded Gaussian noise to every trainable parameter.
  * ``state_dict_arrays()`` -- torch state dict -> {key: float32 numpy array}.
  * ``relative_gap()`` / ``MarginLog`` -- selection-margin bookkeeping.
  * ``save_golden()`` -- write one compressed npz with the layout the JAX tests expect.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, List

import numpy as np

MARGIN_THRESHOLD = 1e-4  # minimum relative score gap at any selection cut


def register_torchvision_nms_stub() -> None:
    """Declare torchvision's nms/qnms op schemas so ``import timm`` works on the CPU wheel.

    Must run before timm (or torchvision) is imported. Safe to call more than once.
    """
    import torch

    global _NMS_LIB  # keep the Library object alive for the process lifetime
    if "_NMS_LIB" in globals():
        return
    lib = torch.library.Library("torchvision", "DEF")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined by a real torchvision build
    _NMS_LIB = lib


def set_deterministic(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)  # CPU float32 reductions independent of the core count


def perturb_parameters(model, std: float, seed: int) -> List[str]:
    """Add N(0, std) noise to every parameter with requires_grad, in registration order.

    Buffers are never touched. Returns the names of the perturbed parameters.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
            names.append(name)
    return names


def make_inputs(batch: int, img_size: int, seed: int, in_chans: int = 3):
    """Standard-normal NCHW float32 images, each sample different."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_chans, img_size, img_size, generator=gen, dtype=torch.float32)


def state_dict_arrays(model) -> Dict[str, np.ndarray]:
    """Full torch state dict as float32 numpy arrays, original key names and layouts."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().cpu().numpy().astype(np.float32)
    return out


def relative_gap(hi: float, lo: float) -> float:
    """(hi - lo) relative to the larger magnitude of the two; inf if lo is -inf."""
    if math.isinf(lo) and lo < 0:
        return math.inf
    denom = max(abs(hi), abs(lo), 1e-30)
    return (hi - lo) / denom


class MarginLog:
    """Collects (label, relative gap) pairs and reports the minimum."""

    def __init__(self) -> None:
        self.items: List[tuple] = []

    def add(self, label: str, gap: float) -> None:
        self.items.append((label, float(gap)))

    def minimum(self) -> float:
        finite = [g for _, g in self.items]
        return min(finite) if finite else math.inf

    def argmin_label(self) -> str:
        if not self.items:
            return "<none>"
        return min(self.items, key=lambda t: t[1])[0]

    def report(self, name: str) -> float:
        m = self.minimum()
        print(f"[{name}] min relative margin = {m:.6g} at {self.argmin_label()} "
              f"({len(self.items)} cuts checked)")
        return m


def topk_cut_gap(sorted_desc: np.ndarray, k: int) -> float:
    """Relative gap between the k-th and (k+1)-th values of a descending-sorted 1-D array."""
    if k <= 0 or k >= sorted_desc.shape[0]:
        return math.inf
    return relative_gap(float(sorted_desc[k - 1]), float(sorted_desc[k]))


def config_array(cfg: dict) -> np.ndarray:
    """0-d numpy str array holding a JSON string (loads without allow_pickle)."""
    return np.array(json.dumps(cfg, sort_keys=True))


def save_golden(path: str, arrays: Dict[str, np.ndarray], cfg: dict) -> None:
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        if v.dtype.kind == "f" and v.ndim > 0:  # 0-d scalars (min_margin) keep float64
            v = v.astype(np.float32)
        elif v.dtype.kind in "iub":
            v = v.astype(np.int64) if v.dtype.kind != "b" else v
        out[k] = v
    out["config"] = config_array(cfg)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **out)
    size = os.path.getsize(path)
    print(f"wrote {path} ({size / 1e6:.3f} MB, {len(out)} arrays)")


def check_margin(name: str, margin: float, threshold: float = MARGIN_THRESHOLD) -> None:
    if not (margin > threshold):
        raise SystemExit(f"[{name}] margin {margin:.3g} <= {threshold:g}: change seed/noise")


def add_repo_to_path(repo: str) -> str:
    repo = os.path.abspath(repo)
    if not os.path.isdir(repo):
        raise SystemExit(f"reference checkout not found: {repo}")
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return repo


def git_commit_of(repo: str, default: str) -> str:
    """Commit recorded for a checkout extracted with ``git archive`` (no .git): the given default."""
    head = os.path.join(repo, ".git", "HEAD")
    if os.path.exists(head):
        try:
            import subprocess

            return subprocess.check_output(["git", "-C", repo, "rev-parse", "HEAD"], text=True).strip()
        except Exception:
            pass
    return default


def versions() -> dict:
    import torch
    import timm

    return {"torch_version": torch.__version__, "timm_version": timm.__version__,
            "numpy_version": np.__version__}

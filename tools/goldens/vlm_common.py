"""Helpers for the VLM pre-LLM reducer golden scripts (make_visionzip.py, make_divprune.py, make_fastervlm.py).

These references act on the vision tower's outputs, so the fixtures feed them synthetic tower signals rather
than a model: hidden states, a softmax attention built from random queries and keys, and the head-mean keys.
The JAX tests feed the same arrays to tokcomp's reducers.

  * ``tower_arrays()``       -- seeded hidden states, per-layer softmax attention, head-mean keys (torch, fp32)
  * ``stub_modules()``       -- empty stand-in modules in ``sys.modules`` for imports a selection never calls
  * ``load_functions()``     -- the named top-level functions or class methods of a reference source file, executed
                                in a namespace of our choosing (so a module whose other imports need a whole
                                framework can still be called; the reference file itself is not edited)
"""
from __future__ import annotations

import ast
import sys
import types

import numpy as np


def tower_arrays(seed: int, batch: int, grid: tuple[int, int], dim: int, heads: int, head_dim: int,
                 layers: int = 1, logit_scale: float = 1.0):
    """Synthetic feature-layer signals, torch float32.

    hidden [B, N, dim] ~ N(0, 1); per layer q, k ~ N(0, 1) [B, H, N, hd] and attention softmax(q kᵀ s / sqrt(hd))
    [B, L, H, N, N] (s = logit_scale); metric = the last layer's keys averaged over heads [B, N, hd].
    N = 1 + h w (a CLS token first).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = 1 + grid[0] * grid[1]
    hidden = torch.randn(batch, n, dim, generator=gen)
    attn, keys = [], None
    for _ in range(layers):
        q = torch.randn(batch, heads, n, head_dim, generator=gen)
        keys = torch.randn(batch, heads, n, head_dim, generator=gen)
        logits = q @ keys.transpose(-1, -2) * (logit_scale / head_dim ** 0.5)
        attn.append(torch.softmax(logits, dim=-1))
    return hidden, torch.stack(attn, dim=1), keys.mean(dim=1)


def stub_modules(spec: dict) -> None:
    """spec: {"a.b.c": ["Name", ...]}; registers empty modules (and parents) whose listed names are dummy classes."""
    for name, attrs in spec.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            mod_name = ".".join(parts[:i])
            if mod_name not in sys.modules:
                mod = types.ModuleType(mod_name)
                mod.__path__ = []
                sys.modules[mod_name] = mod
                if i > 1:
                    setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
        for attr in attrs:
            setattr(sys.modules[name], attr, type(attr, (), {}))


def load_functions(path: str, names: list, namespace: dict) -> dict:
    """Executes only the listed top-level functions, or methods given as "Class.method", of the Python file at
    `path` in `namespace` (decorators kept) and returns {name: function}."""
    tree = ast.parse(open(path).read(), filename=path)
    wanted = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef,)) and node.name in names:
            wanted[node.name] = node
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                key = f"{node.name}.{item.name}" if isinstance(item, ast.FunctionDef) else None
                if key in names:
                    wanted[key] = item
    missing = set(names) - set(wanted)
    if missing:
        raise SystemExit(f"{path}: functions not found: {sorted(missing)}")
    out = {}
    for key, node in wanted.items():
        module = ast.Module(body=[node], type_ignores=[])
        exec(compile(module, path, "exec"), namespace)
        out[key] = namespace[node.name]
    return out


def topk_margin(values: np.ndarray, k: int) -> float:
    """Relative gap between the k-th and (k+1)-th largest of a 1-D array (inf when k is 0 or all)."""
    v = np.sort(np.asarray(values, np.float64))[::-1]
    if k <= 0 or k >= v.size:
        return float("inf")
    return (v[k - 1] - v[k]) / max(abs(v[k - 1]), abs(v[k]), 1e-30)


def argmax_margin(rows: np.ndarray) -> float:
    """Smallest relative gap between the best and the second best entry over the rows of a 2-D array."""
    rows = np.asarray(rows, np.float64)
    if rows.shape[-1] < 2 or rows.size == 0:
        return float("inf")
    s = np.sort(rows, axis=-1)
    gap = (s[:, -1] - s[:, -2]) / np.maximum(np.maximum(np.abs(s[:, -1]), np.abs(s[:, -2])), 1e-30)
    return float(gap.min())

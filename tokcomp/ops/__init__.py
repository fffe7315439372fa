"""Shared primitives that reducers are built from: selection, matching/merging, pooling."""
from tokcomp.ops import merge, pool, select

__all__ = ["merge", "pool", "select"]

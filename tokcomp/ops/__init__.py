"""Shared primitives that reducers are built from: selection and sampling, matching/merging, pooling, soft
transforms and aggregation, graphs and clustering."""
from tokcomp.ops import aggregate, cluster, diversity, graph, merge, pool, sample, scored_matching, select, transform

__all__ = ["aggregate", "cluster", "diversity", "graph", "merge", "pool", "sample", "scored_matching", "select",
           "transform"]

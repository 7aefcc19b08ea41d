"""mixSGA's part of the KV budget ledger: expert-index bits and the bytes of a routing.

The generic ledger (shapes, dtype sizes, full / grouped bytes, the ratio budget)
lives in the neutral ``kvledger`` package, which baselines import as well; its
names are re-exported here so ``mixsga.budget`` stays the one import for mixSGA.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from kvledger import (
    KVShape,
    check_group_sizes,
    dtype_bytes,
    full_kv_bytes_per_token,
    grouped_kv_bytes_per_token,
    kv_budget,
    kv_shape,
    normalise_ratios,
)

#: Bits of the per-token, per-layer expert index the live cache stores (one uint8).
CACHE_INDEX_BITS = 8


def expert_index_bits(num_experts: int) -> int:
    """Fewest bits that name one of ``num_experts`` experts (the paper's packed index: 2 bits for 3)."""
    return max(1, math.ceil(math.log2(num_experts))) if num_experts > 1 else 0


def mixsga_kv_bytes_per_token(
    config,
    ratios: Sequence[float],
    group_sizes: Sequence[int] = (1, 2, 4),
    dtype: torch.dtype | str = torch.float32,
    index_bits: int | None = CACHE_INDEX_BITS,
) -> float:
    """Analytic mixSGA bytes per token: grouped K/V at the ratios plus the per-layer expert index.

    ``index_bits`` is what one token's expert index costs per layer: 8 for the
    uint8 index our cache stores, ``None`` for the packed minimum the paper
    counts (2 bits for three experts).
    """
    shape = kv_shape(config)
    check_group_sizes(shape.num_kv_heads, group_sizes)
    kv = full_kv_bytes_per_token(config, dtype) * kv_budget(ratios, group_sizes)
    bits = expert_index_bits(len(group_sizes)) if index_bits is None else int(index_bits)
    return kv + shape.num_layers * bits / 8


def mixsga_kv_bytes_for_counts(
    config,
    counts: Sequence[Sequence[int]],
    group_sizes: Sequence[int] = (1, 2, 4),
    dtype: torch.dtype | str = torch.float32,
    index_bits: int = CACHE_INDEX_BITS,
) -> float:
    """Exact mixSGA KV bytes for a realised routing.

    ``counts[l][e]`` is the number of tokens layer l stored with expert e (what
    ``MixSGACache.expert_counts()`` returns). Each token costs its expert's pooled
    K and V heads plus ``index_bits`` for its expert index in that layer.
    """
    shape = kv_shape(config)
    if len(counts) != shape.num_layers:
        raise ValueError(f"need counts for {shape.num_layers} layers, got {len(counts)}")
    check_group_sizes(shape.num_kv_heads, group_sizes)
    per_elem = dtype_bytes(dtype)
    total = 0.0
    for row in counts:
        if len(row) != len(group_sizes):
            raise ValueError(f"need one count per group size {tuple(group_sizes)}, got {tuple(row)}")
        for n, g in zip(row, group_sizes):
            total += int(n) * 2 * (shape.num_kv_heads // int(g)) * shape.head_dim * per_elem
        total += sum(int(n) for n in row) * index_bits / 8
    return total


__all__ = ["CACHE_INDEX_BITS", "KVShape", "dtype_bytes", "expert_index_bits", "full_kv_bytes_per_token",
           "grouped_kv_bytes_per_token", "kv_budget", "kv_shape", "mixsga_kv_bytes_for_counts",
           "mixsga_kv_bytes_per_token", "normalise_ratios"]

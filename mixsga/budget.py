"""The KV budget ledger: analytic KV-cache bytes per token for any model config.

Every method (mixSGA and each baseline) states its stored KV bytes per token
through these helpers, so that budgets are comparable on one axis: stored KV
bytes divided by the unmodified base model's stored KV bytes for the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch

#: Bits of the per-token, per-layer expert index the live cache stores (one uint8).
CACHE_INDEX_BITS = 8


@dataclass(frozen=True)
class KVShape:
    """What the KV cache of one model looks like, read off its config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def elements_per_token(self) -> int:
        """K and V elements one token stores across all layers at full size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def kv_shape(config) -> KVShape:
    """Read layers, KV heads and head size from a transformers config (Llama, OPT, Gemma 2, ...)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KVShape(layers, int(kv_heads), int(head_dim))


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a torch dtype (or its name, e.g. ``"bfloat16"``)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return torch.empty((), dtype=dtype).element_size()


def normalise_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """Normalise capacity ratios to sum to one; reject negative, non-finite or all-zero ratios."""
    values = [float(r) for r in ratios]
    if not values:
        raise ValueError("ratios must not be empty")
    bad = [r for r in values if not math.isfinite(r) or r < 0]
    if bad:
        raise ValueError(f"ratios must be finite and non-negative, got {tuple(ratios)}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"ratios must not all be zero, got {tuple(ratios)}")
    return tuple(r / total for r in values)


def kv_budget(ratios: Sequence[float], group_sizes: Sequence[int] = (1, 2, 4)) -> float:
    """Fraction of the full KV cache mixSGA stores with these capacity ratios.

    ``kv_budget((3, 1, 6), (1, 2, 4)) == 0.5``: expert e keeps 1/group_sizes[e]
    of the KV heads for its share ratios[e] of the tokens.
    """
    if len(ratios) != len(group_sizes):
        raise ValueError(
            f"need one ratio per group size: {len(ratios)} ratios for group sizes {tuple(group_sizes)}"
        )
    if any(int(g) != g or g < 1 for g in group_sizes):
        raise ValueError(f"group sizes must be positive integers, got {tuple(group_sizes)}")
    rho = normalise_ratios(ratios)
    # Fractions keep 0.5 exactly 0.5 for ratios like 3:1:6.
    exact = sum(Fraction(r).limit_denominator(10**9) / int(g) for r, g in zip(rho, group_sizes))
    return float(exact)


def full_kv_bytes_per_token(config, dtype: torch.dtype | str = torch.float32) -> int:
    """Stored K+V bytes per token of the unmodified model (all layers)."""
    return kv_shape(config).elements_per_token * dtype_bytes(dtype)


def grouped_kv_bytes_per_token(config, num_kv_heads: int, dtype: torch.dtype | str = torch.float32) -> int:
    """Stored K+V bytes per token when every layer keeps ``num_kv_heads`` KV heads (GQA / MQA)."""
    shape = kv_shape(config)
    return 2 * shape.num_layers * int(num_kv_heads) * shape.head_dim * dtype_bytes(dtype)


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
    bad = [g for g in group_sizes if shape.num_kv_heads % int(g)]
    if bad:
        raise ValueError(
            f"group sizes {tuple(bad)} do not divide the model's {shape.num_kv_heads} KV heads"
        )
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
    bad = [g for g in group_sizes if shape.num_kv_heads % int(g)]
    if bad:
        raise ValueError(
            f"group sizes {tuple(bad)} do not divide the model's {shape.num_kv_heads} KV heads"
        )
    per_elem = dtype_bytes(dtype)
    total = 0.0
    for row in counts:
        if len(row) != len(group_sizes):
            raise ValueError(f"need one count per group size {tuple(group_sizes)}, got {tuple(row)}")
        for n, g in zip(row, group_sizes):
            total += int(n) * 2 * (shape.num_kv_heads // int(g)) * shape.head_dim * per_elem
        total += sum(int(n) for n in row) * index_bits / 8
    return total

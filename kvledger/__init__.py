"""The KV budget ledger: stored K/V bytes per token of any model config, torch-free.

Every method (mixSGA and each baseline) states its stored KV bytes per token
through these helpers, so that budgets are comparable on one axis: stored KV
bytes divided by the unmodified base model's stored KV bytes for the same tokens.
Method packages (``mixsga``, ``baselines``) and the harness all import this one
neutral package, so none of them has to import another to count bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

#: Bytes per element of the dtypes a run may name (``torch.dtype`` objects answer ``itemsize`` themselves).
_DTYPE_BYTES = {"float64": 8, "double": 8, "float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2,
                "int8": 1, "uint8": 1}


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


def kv_shape(config: Any) -> KVShape:
    """Read layers, KV heads and head size from a transformers config (Llama, OPT, Gemma 2, ...)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return KVShape(layers, int(kv_heads), int(head_dim))


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a torch dtype or its name (``"bfloat16"``, ``"torch.float32"``)."""
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int):
        return itemsize
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def full_kv_bytes_per_token(config: Any, dtype: Any = "float32") -> int:
    """Stored K+V bytes per token of the unmodified model (all layers)."""
    return kv_shape(config).elements_per_token * dtype_bytes(dtype)


def grouped_kv_bytes_per_token(config: Any, num_kv_heads: int, dtype: Any = "float32") -> int:
    """Stored K+V bytes per token when every layer keeps ``num_kv_heads`` KV heads (GQA / MQA)."""
    shape = kv_shape(config)
    return 2 * shape.num_layers * int(num_kv_heads) * shape.head_dim * dtype_bytes(dtype)


def check_group_sizes(heads: int, group_sizes: Sequence[int]) -> None:
    """ValueError unless every group size divides the ``heads`` K/V heads (the one divisibility rule)."""
    bad = [int(g) for g in group_sizes if int(heads) % int(g)]
    if bad:
        raise ValueError(f"group sizes {bad} do not divide the model's {heads} KV heads; "
                         f"choose divisors of {heads}")


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
    """Fraction of the full KV cache stored when share ``ratios[e]`` of the tokens keeps 1/``group_sizes[e]`` of the heads.

    ``kv_budget((3, 1, 6), (1, 2, 4)) == 0.5`` (mixSGA's budget).
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


__all__ = ["KVShape", "check_group_sizes", "dtype_bytes", "full_kv_bytes_per_token", "grouped_kv_bytes_per_token",
           "kv_budget", "kv_shape", "normalise_ratios"]

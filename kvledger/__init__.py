"""The KV budget ledger: stored K/V bytes per token of any model config, torch-free.

Every method (mixSGA and each baseline) states its stored KV bytes per token
through these helpers, so that budgets are comparable on one axis: stored KV
bytes divided by the unmodified base model's stored KV bytes for the same tokens.
Method packages (``mixsga``, ``baselines``) and the harness all import this one
neutral package, so none of them has to import another to count bytes.

Sliding-window layers (Gemma 2) store at most ``sliding_window - 1`` tokens between
forward passes in the base model's cache (transformers' ``DynamicSlidingWindowLayer``;
the next query adds the W-th), and every cache here stores the same tokens there. So
the base model's bytes for a context depend on its length (:func:`stored_tokens`), and
a method's per-token figure applies to what each layer stores: "fraction of the base"
compares like with like on every layer (:func:`stored_share`).
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


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, the most tokens its cache keeps between forward passes; None: every token.

    A sliding-window layer of window W keeps ``W - 1`` (the next query is the W-th token it
    sees), as transformers' ``DynamicSlidingWindowLayer`` does; the one place this rule lives.
    """
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = int(cfg.num_hidden_layers)
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * layers)[:layers]
    window = getattr(cfg, "sliding_window", None)
    if window is not None and "sliding_attention" in types and int(window) < 1:
        raise ValueError(f"sliding_window must be a positive token count, got {window!r}")
    return [int(window) - 1 if t == "sliding_attention" and window is not None else None for t in types]


def stored_tokens(config: Any, tokens: int) -> list[int]:
    """Tokens each layer's cache stores for a sample of ``tokens`` tokens (``min(tokens, W - 1)`` on sliding layers)."""
    if int(tokens) < 0:
        raise ValueError(f"tokens must be non-negative, got {tokens!r}")
    return [int(tokens) if cap is None else min(int(tokens), cap) for cap in layer_windows(config)]


def stored_share(config: Any, tokens: int) -> float:
    """Share of ``tokens`` x the layers that the caches store: 1 without sliding-window layers.

    A method storing the same bytes per token on every layer stores, for one sample of
    ``tokens`` tokens, ``bytes_per_token x tokens x stored_share(config, tokens)``.
    """
    if int(tokens) <= 0:
        raise ValueError(f"tokens must be positive, got {tokens!r}")
    kept = stored_tokens(config, tokens)
    return sum(kept) / (len(kept) * int(tokens))


def base_kv_bytes(config: Any, tokens: int, dtype: Any = "float32") -> int:
    """Stored K+V bytes of the unmodified model for one sample of ``tokens`` tokens (sliding layers: the window)."""
    shape = kv_shape(config)
    per_layer_token = 2 * shape.num_kv_heads * shape.head_dim * dtype_bytes(dtype)
    return per_layer_token * sum(stored_tokens(config, tokens))


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


__all__ = ["KVShape", "base_kv_bytes", "check_group_sizes", "dtype_bytes", "full_kv_bytes_per_token",
           "grouped_kv_bytes_per_token", "kv_budget", "kv_shape", "layer_windows", "normalise_ratios", "stored_share",
           "stored_tokens"]

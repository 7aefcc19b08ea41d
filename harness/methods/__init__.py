"""The method registry: one module per method, each a torch-free spec and its implementation.

``get_spec(name)`` returns a :class:`MethodSpec` (``harness.methods.core``): params,
feasible budgets for a model's K/V heads, the weights its runs share (``train_key``),
``evicts``, ``label`` / ``color`` / ``marker``, the structured record ``fields`` and the
``modules`` implementing it. Importing this package or asking a spec never imports torch.

``get_method(name)`` returns the spec's :class:`Method` (``params_for_budget``,
``analytic_bytes_per_token``, ``apply``, ``new_cache``, ``live_bytes``; see
``harness.methods.core.Method``), built on first use.

The names are :data:`SPECS`'s keys: ``base``, ``gqa``, ``mqa``, ``cla``, ``mixsga``, the
evictions ``h2o`` / ``streamingllm`` / ``snapkv`` / ``tova``, those stacked on ``gqa`` or
``mixsga`` (``h2o+mixsga``; ``harness.methods.stacked`` says how the budget splits), and the
rest of :data:`METHOD_MODULES`. Adding a method: a module here with its spec and
implementation (``SPECS``), and one line in :data:`METHOD_MODULES` below.
"""

from __future__ import annotations

import importlib
from typing import Any

from harness.methods.base import Base
from harness.methods.cla import CLA
from harness.methods.core import Method, MethodSpec, kv_tensor_bytes
from harness.methods.eviction import Eviction
from harness.methods.gqa import GQA
from harness.methods.mixsga import MIXSGA_DEFAULT_RATIOS, MixSGA
from harness.methods.stacked import Stacked

#: The method modules, one line each; every module's ``SPECS`` are registered under their names.
METHOD_MODULES = (
    "harness.methods.base",
    "harness.methods.gqa",
    "harness.methods.cla",
    "harness.methods.mixsga",
    "harness.methods.eviction",
    "harness.methods.stacked",
    "harness.methods.pyramidkv",
    "harness.methods.adakv",
    "harness.methods.kvquant",
    "harness.methods.kvquant_mixsga",
)
#: Every registered method's spec, by name (the registry).
SPECS: dict[str, MethodSpec] = {spec.name: spec for module in METHOD_MODULES
                                for spec in importlib.import_module(module).SPECS}

_BUILT: dict[str, Method] = {}


def get_spec(name: str) -> MethodSpec:
    """The spec registered as ``name``; ValueError listing the known names."""
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known: {', '.join(SPECS)}") from None


def get_method(name: str) -> Method:
    """The implementation of ``name`` (built once); ValueError listing the known names."""
    if name not in _BUILT:
        _BUILT[name] = get_spec(name).implementation()
    return _BUILT[name]


def realized_budget(method: Method, config, cache, tokens: int, dtype: Any = "float32", *, samples: int = 1) -> float:
    """Live cache bytes over what the base model's cache stores for ``samples`` samples of ``tokens`` tokens.

    The base stores only the window on sliding-window layers (``kvledger.base_kv_bytes``).
    """
    from kvledger import base_kv_bytes

    if tokens <= 0 or samples <= 0:
        raise ValueError(f"tokens and samples must be positive, got {tokens!r} and {samples!r}")
    return method.live_bytes(cache) / (base_kv_bytes(config, tokens, dtype) * samples)


def __getattr__(name: str) -> Any:
    # Built on first use: building the eviction implementations imports torch, the registry must not.
    if name == "METHODS":
        return {n: get_method(n) for n in SPECS}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CLA", "GQA", "METHODS", "MIXSGA_DEFAULT_RATIOS", "SPECS", "Base", "Eviction", "Method", "MethodSpec",
           "MixSGA", "Stacked", "get_method", "get_spec", "kv_tensor_bytes", "realized_budget"]

"""Baselines for mixSGA-bench at matched KV budgets.

* :func:`convert_to_gqa` (``baselines.gqa``): mean-pooled GQA / MQA (Ainslie et al., 2023) for
  Llama / TinyLlama, Gemma 2 and OPT; :func:`load_converted` (``baselines.checkpoint``) reloads
  converted checkpoints.
* :func:`convert_to_cla`, :func:`plan_cla` (``baselines.cla``): cross-layer K/V sharing.
* :class:`EvictionPolicy`, :class:`EvictionCache`, :func:`eviction_cache_factory`
  (``baselines.eviction``): H2O, StreamingLLM, SnapKV, TOVA as real evicting caches.

The method registry that puts all of them and mixSGA on one budget axis is ``harness.methods``.
"""

from baselines.cla import CLAPlan, convert_to_cla, plan_cla
from baselines.eviction import (
    EvictionCache,
    EvictionPolicy,
    enable_eviction_attention,
    eviction_cache_factory,
    forward_in_chunks,
)
from baselines.checkpoint import load_converted
from baselines.gqa import convert_to_gqa

__all__ = [
    "CLAPlan",
    "EvictionCache",
    "EvictionPolicy",
    "convert_to_cla",
    "convert_to_gqa",
    "enable_eviction_attention",
    "eviction_cache_factory",
    "forward_in_chunks",
    "load_converted",
    "plan_cla",
]

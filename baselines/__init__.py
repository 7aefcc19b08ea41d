"""Baselines for mixSGA-bench at matched KV budgets.

* :func:`convert_to_gqa` (``baselines.gqa``): mean-pooled GQA / MQA (Ainslie et al., 2023) for
  Llama / TinyLlama, Gemma 2 and OPT; :func:`load_converted` (``baselines.checkpoint``) reloads
  converted checkpoints.
* :func:`convert_to_cla`, :func:`plan_cla` (``baselines.cla``): cross-layer K/V sharing.
* :class:`EvictionPolicy`, :class:`EvictionCache`, :func:`eviction_cache_factory`
  (``baselines.eviction``): H2O, StreamingLLM, SnapKV, TOVA as real evicting caches.

Importing ``baselines`` registers the checkpoint types ``gqa_opt`` and ``cla_<family>``
(:mod:`baselines.hf`): ``AutoModelForCausalLM.from_pretrained`` reloads converted models as what
they are; :func:`save_converted` saves one (with its tokenizer).

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
from baselines.hf import save_converted  # registers the gqa_opt / cla_<family> checkpoint types

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
    "save_converted",
]

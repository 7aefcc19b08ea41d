"""The ``"mixsga"`` attention function and mask function, registered with transformers.

A converted model runs with ``config._attn_implementation == "mixsga"``. Each
family's own attention module still projects Q/K/V, applies RoPE (Llama, Gemma 2),
OPT's pre-scaled queries and biases, and calls the cache; this function then does
mixSGA's part:

* full-sequence pass (training, prefill, or no cache): every token's K/V is
  replaced by its expert's pooled K/V broadcast back to the layer's KV heads, and
  the model's base attention runs unchanged (its mask, scaling, dropout, Gemma 2
  sliding window and soft-capping);
* decode (the cache already held tokens): attention reads the compact per-expert
  stores (``MixSGALayer.attend``), never expanding them.

The base attention is ``"eager"`` (the family's own eager function) or
``"sdpa"``; Gemma 2 always uses eager, since sdpa cannot soft-cap logits, and runs it
as :mod:`hfconvert.softcap_attention`'s fused kernel (the same function). The
mask function delegates to the base implementation's mask function.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager

from hfconvert.softcap_attention import ATTN_NAME as SOFTCAP_FUSED
from hfconvert.softcap_attention import softcap_attention_forward
from mixsga.experts import mix_experts

ATTN_NAME = "mixsga"
BASE_IMPLEMENTATIONS = ("eager", "sdpa", SOFTCAP_FUSED)


def base_attention(module: torch.nn.Module, base: str) -> Callable:
    """The attention function the unconverted module would call (Gemma 2's eager: its fused equivalent)."""
    if base == "eager":
        family = sys.modules[type(module).__module__]
        fn = family.eager_attention_forward
        return softcap_attention_forward if fn is gemma2_eager else fn
    return ALL_ATTENTION_FUNCTIONS[base]


def mixsga_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for a mixSGA layer; the routing was set by the layer's pre-hook."""
    spec = module.mixsga_spec
    route = spec.route
    if route is None:
        raise RuntimeError(f"no routing decision for {type(module).__name__} {getattr(module, 'layer_idx', '?')}")
    spec.route = None
    if scaling is None:
        scaling = module.head_dim**-0.5
    if route.decode:
        out = route.cache_layer.attend(
            query, route, scaling, kwargs.get("softcap"), kwargs.get("sliding_window")
        )
        route.cache_layer.trim_window()
        return out, None
    key = mix_experts(key, route.expert, spec.group_sizes, spec.active)
    value = mix_experts(value, route.expert, spec.group_sizes, spec.active)
    if route.cache_layer is not None:
        if route.cache_layer.observer is not None:
            _observe_full(route, query, key, attention_mask, scaling, kwargs.get("softcap"))
        route.cache_layer.trim_window()  # the base attention below reads the chunk's own K/V, not the cache
    extra = {k: v for k, v in kwargs.items() if v is not None}
    return spec.base_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **extra)


def _observe_full(route, query, key, attention_mask, scaling, softcap) -> None:
    """Prefill: give the cache's observer each sample's probabilities over its real tokens."""
    batch, heads, q, _ = query.shape
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask[..., -q:], float("-inf"))
    else:
        scores = scores + attention_mask[..., -q:]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    layer = route.cache_layer
    for b in range(batch):
        real = torch.arange(q, device=query.device) if route.real is None else route.real[b].nonzero().squeeze(1)
        layer.observer(layer, b, probs[b][:, real][:, :, real])


def mixsga_mask(*args, config=None, **kwargs):
    """Build the mask the base attention implementation expects."""
    base = config.mixsga["base_attn_implementation"]
    return ALL_MASK_ATTENTION_FUNCTIONS[base](*args, config=config, **kwargs)


def register() -> None:
    """Register ``"mixsga"`` in transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTN_NAME, mixsga_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, mixsga_mask)


register()

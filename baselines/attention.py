"""One attention module for the three supported families with a configurable K/V side.

transformers implements OPT as multi-head only, and cross-layer attention (CLA)
needs a layer that reads another layer's K/V. :class:`KVAttention` replaces a
family's own attention module (``LlamaAttention``, ``Gemma2Attention``,
``OPTAttention``) and keeps everything that is not K/V unchanged: the query and
output projections (same parameter names, so checkpoints line up), biases, the
query scaling (OPT scales the query before the product), RoPE (Llama, Gemma 2),
Gemma 2's logit soft-capping and sliding window. The attention kernel itself is
still dispatched through ``transformers.AttentionInterface`` (eager, sdpa, or
the eviction attention of :mod:`baselines.eviction`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.llama.modeling_llama import eager_attention_forward as grouped_eager

from hfconvert.softcap_attention import softcap_attention_forward

#: model_type -> family name used throughout baselines (TinyLlama is a Llama).
FAMILIES = {"llama": "llama", "opt": "opt", "gemma2": "gemma2"}


def model_family(config) -> str:
    """The baselines family of a transformers config; ValueError for unsupported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; baselines support {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama / Gemma 2 / OPT causal LM (or its base model)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:  # OPTForCausalLM.model is OPTModel, whose decoder holds the layers
        layers = getattr(getattr(base, "decoder", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


def out_proj_name(family: str) -> str:
    """Name of the attention output projection in ``family`` (kept for checkpoint compatibility)."""
    return "out_proj" if family == "opt" else "o_proj"


class KVSlot:
    """Hands one forward pass's K/V from a CLA producer layer to its consumer layers.

    The producer puts the K/V its attention used (after RoPE and after the cache
    update, so past tokens included); each consumer reads it in the same forward
    pass. The slot is emptied when the last consumer has read, so no activations
    outlive the forward pass.
    """

    def __init__(self, num_consumers: int):
        self.num_consumers = num_consumers
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reads = 0

    def put(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self._kv, self._reads = (key, value), 0

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kv is None:
            raise RuntimeError("CLA consumer layer ran before its producer layer in this forward pass")
        kv = self._kv
        self._reads += 1
        if self._reads >= self.num_consumers:
            self._kv = None
        return kv


class KVAttention(nn.Module):
    """Attention of a Llama / Gemma 2 / OPT layer with ``num_key_value_heads`` K/V heads.

    ``kv_source=None``: the layer has its own (possibly narrower) ``k_proj`` /
    ``v_proj`` and stores its K/V in the cache under ``layer_idx``; if
    ``kv_sink`` is given it also hands them to consumer layers (CLA producer).
    With a ``kv_source`` the layer has no K/V projections and stores nothing: it
    attends with the producer's K/V (CLA consumer).
    """

    def __init__(
        self,
        original: nn.Module,
        config,
        layer_idx: int,
        num_key_value_heads: int,
        *,
        kv_source: KVSlot | None = None,
        kv_sink: KVSlot | None = None,
    ):
        super().__init__()
        self.family = model_family(config)
        self.config = config
        self.layer_idx = layer_idx
        heads = int(config.num_attention_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        if heads % num_key_value_heads:
            raise ValueError(f"{num_key_value_heads} K/V heads do not divide {heads} query heads")
        self.num_heads = heads
        self.num_key_value_heads = int(num_key_value_heads)
        self.num_key_value_groups = heads // self.num_key_value_heads
        self.is_causal = True
        if self.family == "opt":
            self.scaling = self.head_dim**-0.5
            self.attention_dropout = float(config.attention_dropout)
        elif self.family == "gemma2":
            self.scaling = float(config.query_pre_attn_scalar) ** -0.5
            self.attention_dropout = float(config.attention_dropout)
            self.attn_logit_softcapping = config.attn_logit_softcapping
            layer_type = config.layer_types[layer_idx] if getattr(config, "layer_types", None) else None
            self.sliding_window = config.sliding_window if layer_type == "sliding_attention" else None
        else:
            self.scaling = self.head_dim**-0.5
            self.attention_dropout = float(config.attention_dropout)
        self.q_proj = original.q_proj
        self._out_name = out_proj_name(self.family)
        setattr(self, self._out_name, getattr(original, self._out_name))
        self.kv_source = kv_source
        self.kv_sink = kv_sink
        if kv_source is None:
            bias = original.k_proj.bias is not None
            width = self.num_key_value_heads * self.head_dim
            ref = original.k_proj.weight
            self.k_proj = nn.Linear(original.k_proj.in_features, width, bias=bias, device=ref.device, dtype=ref.dtype)
            self.v_proj = nn.Linear(original.v_proj.in_features, width, bias=bias, device=ref.device, dtype=ref.dtype)

    def _kernel(self) -> Callable:
        # Gemma 2's "eager" is the fused soft-capped kernel: the same function, faster on CPU.
        default = softcap_attention_forward if self.family == "gemma2" else grouped_eager
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, default)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, length, _ = hidden_states.shape
        shape = (bsz, length, -1, self.head_dim)
        query = self.q_proj(hidden_states)
        if self.family == "opt":
            query = query * self.scaling  # OPT scales the query before the product
        query = query.view(shape).transpose(1, 2)
        if self.kv_source is not None:
            key, value = self.kv_source.take()
            if self.family != "opt":
                cos, sin = position_embeddings
                query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
        else:
            key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
            value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
            if self.family != "opt":
                cos, sin = position_embeddings
                query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if past_key_values is not None:
                key, value = past_key_values.update(key, value, self.layer_idx)
            if self.kv_sink is not None:
                self.kv_sink.put(key, value)
        extra = {}
        if self.family == "gemma2":
            extra = {"sliding_window": self.sliding_window, "softcap": self.attn_logit_softcapping}
        output, weights = self._kernel()(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=1.0 if self.family == "opt" else self.scaling,
            **extra,
            **kwargs,
        )
        output = output.reshape(bsz, length, -1).contiguous()
        return getattr(self, self._out_name)(output), weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

"""GQA / MQA by mean-pooling contiguous K/V heads (Ainslie et al., 2023).

``convert_to_gqa(model, num_key_value_heads)`` rewrites every layer's K/V
projection in place:

* fewer K/V heads: each new head's projection (weight and bias) is the mean of a
  contiguous group of old heads; query head ``i`` keeps reading group
  ``i // (num_attention_heads // num_key_value_heads)``, which contains the head
  it read before. Already-GQA models (Llama 3, TinyLlama, Gemma 2) are simply
  grouped again, as the mixSGA paper does for its GQA baseline.
* more K/V heads: each old head is repeated; the model computes exactly the same
  function (a GQA -> MHA expansion), and pooling back restores the original weights.
* one head per group (same count): the identity.

Llama and Gemma 2 support GQA natively, so only their projections and
``config.num_key_value_heads`` change and ``save_pretrained`` /
``from_pretrained`` work as usual. transformers' OPT is multi-head only: its
attention modules are replaced by :class:`baselines.attention.KVAttention`
(biases, query scaling and learned positions unchanged) and
``config.num_key_value_heads`` records the width; reload such a checkpoint
with :func:`baselines.checkpoint.load_converted`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from baselines.attention import KVAttention, decoder_layers, model_family


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def regroup_heads(tensor: torch.Tensor, old: int, new: int, head_dim: int) -> torch.Tensor:
    """Mean-pool (``new < old``) or repeat (``new > old``) contiguous heads along dim 0 of a K/V weight or bias."""
    if new == old:
        return tensor.clone()
    rest = tensor.shape[1:]
    heads = tensor.reshape(old, head_dim, *rest)
    if new < old:
        if old % new:
            raise ValueError(f"cannot pool {old} K/V heads into {new}: {new} does not divide {old}")
        pooled = heads.reshape(new, old // new, head_dim, *rest).float().mean(dim=1).to(tensor.dtype)
    else:
        if new % old:
            raise ValueError(f"cannot expand {old} K/V heads to {new}: {old} does not divide {new}")
        pooled = heads.repeat_interleave(new // old, dim=0)
    return pooled.reshape(new * head_dim, *rest)


def _regroup_linear(linear: nn.Linear, old: int, new: int, head_dim: int) -> nn.Linear:
    out = nn.Linear(linear.in_features, new * head_dim, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(regroup_heads(linear.weight, old, new, head_dim))
        if linear.bias is not None:
            out.bias.copy_(regroup_heads(linear.bias, old, new, head_dim))
    out.weight.requires_grad_(linear.weight.requires_grad)
    return out


def current_kv_heads(model: PreTrainedModel) -> int:
    """K/V heads the model's first layer really computes (read off its projection, not the config)."""
    attn = decoder_layers(model)[0].self_attn
    k_proj = getattr(attn, "k_proj", None)
    if k_proj is None:
        raise ValueError("layer 0 has no K/V projection")
    return k_proj.out_features // _head_dim(model.config)


def convert_to_gqa(model: PreTrainedModel, num_key_value_heads: int) -> PreTrainedModel:
    """Give every layer ``num_key_value_heads`` mean-pooled (or repeated) K/V heads; returns ``model``.

    ValueError if the count is not a positive divisor of the query heads, if it
    is neither a divisor nor a multiple of the current count, or if the model
    already shares K/V across layers (apply GQA before CLA).
    """
    config = model.config
    family = model_family(config)
    heads = int(config.num_attention_heads)
    new = int(num_key_value_heads)
    if new != num_key_value_heads or new < 1 or heads % new:
        raise ValueError(
            f"num_key_value_heads must be a positive divisor of the {heads} query heads, got {num_key_value_heads!r}"
        )
    if getattr(model, "mixsga_runtime", None) is not None:
        raise ValueError("model is converted to mixSGA (its attention routes tokens to grouped experts); "
                         "GQA regroups plain attention: convert the base model instead")
    layers = decoder_layers(model)
    if any(getattr(layer.self_attn, "kv_source", None) is not None for layer in layers):
        raise ValueError("model shares K/V across layers (CLA); convert to GQA before converting to CLA")
    head_dim = _head_dim(config)
    old = current_kv_heads(model)
    if old % new and new % old:
        raise ValueError(f"cannot regroup {old} K/V heads into {new}: neither divides the other")
    for idx, layer in enumerate(layers):
        attn = layer.self_attn
        if family == "opt" and not isinstance(attn, KVAttention):
            if new == old:
                continue  # MHA stays the native module: exact identity
            replacement = KVAttention(attn, config, idx, new)
            with torch.no_grad():
                replacement.k_proj.weight.copy_(regroup_heads(attn.k_proj.weight, old, new, head_dim))
                replacement.v_proj.weight.copy_(regroup_heads(attn.v_proj.weight, old, new, head_dim))
                if attn.k_proj.bias is not None:
                    replacement.k_proj.bias.copy_(regroup_heads(attn.k_proj.bias, old, new, head_dim))
                    replacement.v_proj.bias.copy_(regroup_heads(attn.v_proj.bias, old, new, head_dim))
            replacement.train(attn.training)
            layer.self_attn = replacement
            continue
        attn.k_proj = _regroup_linear(attn.k_proj, old, new, head_dim)
        attn.v_proj = _regroup_linear(attn.v_proj, old, new, head_dim)
        attn.num_key_value_groups = heads // new
        if isinstance(attn, KVAttention):
            attn.num_key_value_heads = new
    config.num_key_value_heads = new
    if family == "opt" and new != heads:
        from hfconvert import mark_converted  # the types are registered on import of baselines (baselines.hf)

        mark_converted(model, "gqa")  # save_pretrained now writes a "gqa_opt" checkpoint
    return model

"""Cross-layer attention (CLA, Brandon et al., 2024): groups of adjacent layers share one K/V.

A *producer* layer computes and caches K/V as usual; the *consumer* layers of its
group have no K/V projections, cache nothing, and attend with the producer's K/V
(their own queries, RoPE and output projections are unchanged). The mixSGA
paper's CLA baseline shares K/V between pairs of adjacent layers (50 % budget)
and is continued-pretrained like GQA.

Conversion from a pretrained model: the producer keeps its own K/V projections,
so the first layer of each group is exact; the consumers' K/V projections are
dropped. (Mean-pooling projections across layers, as GQA does across heads,
would mix weights trained on different inputs.)

Budgets other than 50 % (:func:`plan_cla`): with ``n`` producer layers out of
``L`` and ``g`` of ``H`` K/V heads (GQA inside each producer) the stored bytes
are ``n*g / (L*H)`` of the base model. The plan takes the configuration that
meets the budget exactly, shares at least one pair, has the smallest largest
group (pairs before triples), then keeps the most K/V heads; groups are
contiguous and as even as possible (larger first), so 75 % on 4 layers is
``[0, 0, 2, 3]`` (one shared pair) and 25 % is pairs plus halved K/V heads.
Gemma 2 alternates sliding-window and global layers, which cannot share one
K/V; there, groups are formed from adjacent layers *of the same type*. No
matching configuration -> ValueError naming the nearest feasible budgets.

Caveat: the producer hands its K/V to consumers through a per-forward slot
(:class:`baselines.attention.KVSlot`), which assumes layers run in order within
one forward pass; activation checkpointing that re-runs a consumer without its
producer is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch
from transformers import PreTrainedModel

from baselines.attention import KVAttention, KVSlot, decoder_layers, model_family
from baselines.gqa import convert_to_gqa, current_kv_heads
from kvledger import dtype_bytes, kv_shape


@dataclass(frozen=True)
class CLAPlan:
    """Which layer's K/V each layer uses (``kv_sources[l] == l`` for producers) and the K/V heads kept."""

    kv_sources: tuple[int, ...]
    num_key_value_heads: int

    @property
    def num_producers(self) -> int:
        return sum(1 for i, s in enumerate(self.kv_sources) if i == s)


def _layer_types(config) -> list[str]:
    types = getattr(config, "layer_types", None)
    return list(types) if types else ["full_attention"] * int(config.num_hidden_layers)


def _fraction(budget: float) -> Fraction:
    return Fraction(budget).limit_denominator(10_000)


def _sources_for(config, producers: int) -> tuple[tuple[int, ...], int]:
    """Contiguous, even groups among same-type layers; returns (kv_sources, largest group)."""
    types = _layer_types(config)
    by_type: dict[str, list[int]] = {}
    for idx, t in enumerate(types):
        by_type.setdefault(t, []).append(idx)
    total = len(types)
    # Largest-remainder split of the producers over layer types, at least one and at most all per type.
    kinds = list(by_type)
    quotas = [producers * len(by_type[k]) / total for k in kinds]
    alloc = [max(1, min(len(by_type[k]), int(q))) for k, q in zip(kinds, quotas)]
    order = sorted(range(len(kinds)), key=lambda i: quotas[i] - int(quotas[i]), reverse=True)
    while sum(alloc) < producers:
        grown = False
        for i in order:
            if sum(alloc) < producers and alloc[i] < len(by_type[kinds[i]]):
                alloc[i] += 1
                grown = True
        if not grown:
            break
    while sum(alloc) > producers:
        i = max(range(len(kinds)), key=lambda j: alloc[j])
        if alloc[i] <= 1:
            break
        alloc[i] -= 1
    sources = list(range(total))
    largest = 1
    for kind, n in zip(kinds, alloc):
        members = by_type[kind]
        size, extra = divmod(len(members), n)
        start = 0
        for group in range(n):
            width = size + (1 if group < extra else 0)
            chunk = members[start:start + width]
            for layer in chunk:
                sources[layer] = chunk[0]
            largest = max(largest, width)
            start += width
    return tuple(sources), largest


def plan_cla(config, budget: float) -> CLAPlan:
    """The CLA configuration whose stored K/V is exactly ``budget`` of the base model's (see module doc)."""
    if not 0 < budget < 1:
        raise ValueError(f"CLA budget must be in (0, 1) (some layers must share), got {budget!r}")
    layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    target = _fraction(budget)
    divisors = [g for g in range(heads, 0, -1) if heads % g == 0]
    candidates = []
    feasible = set()
    for producers in range(1, layers):
        sources, largest = _sources_for(config, producers)
        if sum(1 for i, s in enumerate(sources) if i == s) != producers:
            continue  # layer types make this producer count unreachable
        for g in divisors:
            frac = Fraction(producers * g, layers * heads)
            feasible.add(frac)
            if frac == target:
                candidates.append((largest, -g, sources, g))
    if not candidates:
        below = max((f for f in feasible if f < target), default=None)
        above = min((f for f in feasible if f > target), default=None)
        near = ", ".join(f"{float(f):.2%}" for f in (below, above) if f is not None)
        raise ValueError(
            f"no CLA configuration stores exactly {budget:.2%} of the K/V on a model with {layers} layers and "
            f"{heads} K/V heads; nearest feasible budgets: {near}"
        )
    _, _, sources, g = min(candidates)
    return CLAPlan(tuple(sources), g)


def cla_budget(config, plan: CLAPlan) -> float:
    """Fraction of the base model's stored K/V that ``plan`` keeps."""
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return plan.num_producers * plan.num_key_value_heads / (int(config.num_hidden_layers) * heads)


def validate_sources(config, kv_sources: Sequence[int]) -> tuple[int, ...]:
    """Check a ``kv_sources`` map: one entry per layer, sources are earlier producers of the same layer type."""
    layers = int(config.num_hidden_layers)
    sources = tuple(int(s) for s in kv_sources)
    if len(sources) != layers:
        raise ValueError(f"kv_sources needs one entry per layer ({layers}), got {len(sources)}")
    types = _layer_types(config)
    for layer, src in enumerate(sources):
        if not 0 <= src <= layer:
            raise ValueError(f"layer {layer} cannot read K/V from layer {src}: sources must be earlier layers")
        if sources[src] != src:
            raise ValueError(f"layer {layer} reads K/V from layer {src}, which is itself a consumer")
        if types[src] != types[layer]:
            raise ValueError(
                f"layer {layer} ({types[layer]}) cannot share K/V with layer {src} ({types[src]})"
            )
    return sources


def convert_to_cla(model: PreTrainedModel, kv_sources: Sequence[int] | CLAPlan,
                   num_key_value_heads: int | None = None) -> PreTrainedModel:
    """Share K/V across layers as ``kv_sources`` says (optionally after GQA to ``num_key_value_heads``); returns ``model``.

    ``config.cla_kv_sources`` records the map so that :func:`baselines.checkpoint.load_converted` can rebuild it.
    """
    if isinstance(kv_sources, CLAPlan):
        num_key_value_heads = kv_sources.num_key_value_heads if num_key_value_heads is None else num_key_value_heads
        kv_sources = kv_sources.kv_sources
    config = model.config
    model_family(config)
    sources = validate_sources(config, kv_sources)
    layers = decoder_layers(model)
    if any(getattr(layer.self_attn, "kv_source", None) is not None for layer in layers):
        raise ValueError("model already shares K/V across layers")
    if num_key_value_heads is not None:
        convert_to_gqa(model, num_key_value_heads)
    kv_heads = current_kv_heads(model)
    consumers: dict[int, int] = {}
    for layer, src in enumerate(sources):
        if src != layer:
            consumers[src] = consumers.get(src, 0) + 1
    slots = {src: KVSlot(n) for src, n in consumers.items()}
    for idx, layer in enumerate(layers):
        attn = layer.self_attn
        src = sources[idx]
        if src == idx and idx not in slots:
            continue  # an unshared layer keeps its module
        if src == idx:
            new = KVAttention(attn, config, idx, kv_heads, kv_sink=slots[idx])
            with torch.no_grad():
                new.k_proj.weight.copy_(attn.k_proj.weight)
                new.v_proj.weight.copy_(attn.v_proj.weight)
                if attn.k_proj.bias is not None:
                    new.k_proj.bias.copy_(attn.k_proj.bias)
                    new.v_proj.bias.copy_(attn.v_proj.bias)
        else:
            new = KVAttention(attn, config, idx, kv_heads, kv_source=slots[src])
        new.train(attn.training)
        layer.self_attn = new
    config.cla_kv_sources = list(sources)
    from hfconvert import mark_converted  # the types are registered on import of baselines (baselines.hf)

    mark_converted(model, "cla")  # save_pretrained now writes a "cla_<family>" checkpoint
    return model


def cla_kv_bytes_per_token(config, plan: CLAPlan, dtype: torch.dtype | str = torch.float32) -> int:
    """Analytic stored K/V bytes per token of a CLA model (only producers store)."""
    return 2 * plan.num_producers * plan.num_key_value_heads * kv_shape(config).head_dim * dtype_bytes(dtype)

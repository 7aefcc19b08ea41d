"""Weight-shared grouped-KV experts (paper Eqs. 6-9).

All experts share the layer's K/V projection. Expert e mean-pools the layer's KV
heads in contiguous groups of ``group_sizes[e]``; with group size 1 it is the
original projection. Pooling is linear and the same for every head, so it commutes
with RoPE and with the projection bias: pooling the rotated keys equals rotating
keys from pooled projection weights.

Head bookkeeping: a GQA layer with ``H_q`` query and ``H_kv`` KV heads lets query
head h read KV head ``h // (H_q / H_kv)``; under expert e it reads pooled head
``h // (H_q / H_kv * g_e)``. Because groups are contiguous, the query heads that
share one pooled head are contiguous too, so a plain reshape groups them.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pool_heads(x: torch.Tensor, group: int, head_dim: int = -3) -> torch.Tensor:
    """Mean-pool contiguous heads of ``x`` in groups of ``group``.

    ``x`` is ``[..., H, L, d]`` (heads at dim -3); returns ``[..., H // group, L, d]``.
    """
    if group == 1:
        return x
    *lead, heads, length, dim = x.shape
    return x.reshape(*lead, heads // group, group, length, dim).mean(dim=-3)


def broadcast_heads(pooled: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat each pooled head ``group`` times back to ``[..., H, L, d]`` (Eq. 8)."""
    if group == 1:
        return pooled
    *lead, heads, length, dim = pooled.shape
    return (
        pooled.unsqueeze(-3)
        .expand(*lead, heads, group, length, dim)
        .reshape(*lead, heads * group, length, dim)
    )


def mix_experts(
    x: torch.Tensor, expert: torch.Tensor, group_sizes: Sequence[int], active: Sequence[bool]
) -> torch.Tensor:
    """Each token's K (or V) at its expert's granularity, broadcast to all KV heads (Eq. 9).

    ``x`` ``[B, H, L, d]`` full-head states, ``expert`` ``[B, L]`` expert ids.
    Used for the full-sequence pass (training / prefill); decode never expands.
    """
    out = None
    for e, (g, on) in enumerate(zip(group_sizes, active)):
        if not on:
            continue
        states = broadcast_heads(pool_heads(x, g), g)
        if out is None:
            out = states
        else:
            out = torch.where((expert == e)[:, None, :, None], states, out)
    return out

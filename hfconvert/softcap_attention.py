"""A fused CPU kernel for Gemma 2's soft-capped eager attention, registered with transformers.

Gemma 2 runs transformers' eager attention (sdpa cannot soft-cap logits), which makes
about ten elementwise passes over the ``[batch, heads, q, k]`` score tensor in forward
and backward (scale, divide, tanh, multiply, add mask, softmax, and each one's backward).
:func:`softcap_attention_forward` computes exactly the same function,

    softmax(tanh(q k^T * scaling / cap) * cap + mask) v     (GQA by repeat_kv),

with fewer passes: ``scaling / cap`` folded into the product, tanh in place, the mask
added with ``alpha=cap``, a hand-written backward that saves only the tanh output and the
probabilities. Query heads are grouped by their KV head (``[b * kv_heads, groups * q, d]``),
so K/V are never repeated and their gradients sum over the group inside the product.

In a full-sequence pass (``q_len == k_len``) the given 4-D mask is checked once per call:
when every key left of ``block_start - window + 1`` (sliding layers) or right of the block
(causal) is masked out for every query block, and no query row is masked out entirely,
only that band is computed; the scores outside it would contribute ``exp(-inf) = 0``
exactly. Otherwise (a cache prefix, padded rows, an unusual mask) the whole score matrix
is computed, still fused.

The eager function itself runs whenever this path does not apply: dropout while training,
attention weights requested (``output_attentions``), a dtype other than fp32, a boolean
mask, a mask that needs a gradient. This kernel returns ``None`` for the weights.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager

#: The name models run with (``config._attn_implementation``); saved checkpoints record "eager".
ATTN_NAME = "eager_softcap_fused"
#: Query rows per block of the banded path (a multiple of the sliding window keeps bands short).
BLOCK = 128


def _dead(mask: torch.Tensor) -> float:
    """Mask values at or below this are "masked out": they add ``finfo.min`` (or -inf)."""
    return torch.finfo(mask.dtype).min / 2


def _blocks(mask: torch.Tensor | None, q_len: int, k_len: int, window: int | None) -> list[tuple[int, int, int]] | None:
    """``(q_start, q_end, k_start)`` per query block when only the band ``[k_start, q_end)`` matters; else None."""
    if mask is None or q_len != k_len or q_len <= BLOCK:
        return None
    dead = _dead(mask)
    if bool((mask.amax(dim=-1) <= dead).any()):  # a query row with no key: eager averages over every key
        return None
    blocks = []
    for qs in range(0, q_len, BLOCK):
        qe = min(qs + BLOCK, q_len)
        ks = max(0, qs - int(window) + 1) if window else 0
        rows = mask[..., qs:qe, :]
        if qe < k_len and bool((rows[..., qe:] > dead).any()):
            return None
        if ks > 0 and bool((rows[..., :ks] > dead).any()):
            return None
        blocks.append((qs, qe, ks))
    return blocks


def _scores(q3: torch.Tensor, k3: torch.Tensor, mask5: torch.Tensor | None, alpha: float, cap: float, groups: int):
    """tanh output ``t`` and probabilities ``p`` ([bk, g*q, k]) of one block; ``mask5`` is [b, 1, 1, q, k]."""
    bk, gq, _ = q3.shape
    t = torch.bmm(q3, k3.transpose(1, 2))
    t.mul_(alpha).tanh_()
    if mask5 is None:
        z = t * cap
    else:
        t5 = t.view(mask5.shape[0], bk // mask5.shape[0], groups, gq // groups, t.shape[-1])
        z = torch.add(mask5, t5, alpha=cap).view_as(t)
    p = torch.softmax(z, dim=-1)
    return t, p


class _SoftcapAttention(torch.autograd.Function):
    """Forward and hand-written backward of the fused (optionally banded) soft-capped attention."""

    @staticmethod
    def forward(ctx, q5, k3, v3, mask, scaling, cap, blocks):
        # q5: [bk, g, q, d]; k3, v3: [bk, k, d]; mask: [b, 1, q, k] or None
        bk, groups, q_len, dim = q5.shape
        alpha = scaling / cap
        mask5 = None if mask is None else mask.unsqueeze(1)  # [b, 1, 1, q, k] against [b, kvh, g, q, k]
        spans = blocks or [(0, q_len, 0)]
        out = q5.new_empty(bk, groups, q_len, dim)
        saved = []
        for qs, qe, ks in spans:
            kk = k3.shape[1] if blocks is None else qe
            q3 = q5[:, :, qs:qe].reshape(bk, groups * (qe - qs), dim)
            m = None if mask5 is None else mask5[..., qs:qe, ks:kk]
            t, p = _scores(q3, k3[:, ks:kk], m, alpha, cap, groups)
            out[:, :, qs:qe] = torch.bmm(p, v3[:, ks:kk]).view(bk, groups, qe - qs, dim)
            saved += [t, p]
        ctx.save_for_backward(q5, k3, v3, *saved)
        ctx.spans, ctx.full, ctx.scaling = spans, blocks is None, scaling
        return out

    @staticmethod
    def backward(ctx, dout):
        q5, k3, v3, *saved = ctx.saved_tensors
        bk, groups, q_len, dim = q5.shape
        dout = dout.contiguous()
        dq = torch.empty_like(q5)
        dk = torch.zeros_like(k3)
        dv = torch.zeros_like(v3)
        for i, (qs, qe, ks) in enumerate(ctx.spans):
            t, p = saved[2 * i], saved[2 * i + 1]
            kk = k3.shape[1] if ctx.full else qe
            n = groups * (qe - qs)
            do3 = dout[:, :, qs:qe].reshape(bk, n, dim)
            q3 = q5[:, :, qs:qe].reshape(bk, n, dim)
            dv[:, ks:kk].add_(torch.bmm(p.transpose(1, 2), do3))
            dp = torch.bmm(do3, v3[:, ks:kk].transpose(1, 2))
            dz = torch._softmax_backward_data(dp, p, -1, p.dtype)
            # d/ds of tanh(s * scaling / cap) * cap = (1 - t^2) * scaling; the scaling goes into the products
            ds = torch.ops.aten.tanh_backward(dz, t)
            dq[:, :, qs:qe] = torch.bmm(ds, k3[:, ks:kk]).mul_(ctx.scaling).view(bk, groups, qe - qs, dim)
            dk[:, ks:kk].add_(torch.bmm(ds.transpose(1, 2), q3), alpha=ctx.scaling)
        return dq, dk, dv, None, None, None, None


def _fast_path_applies(module, query, key, attention_mask, dropout, softcap, kwargs) -> bool:
    if softcap is None or query.dtype != torch.float32 or key.dtype != torch.float32:
        return False
    if dropout and module.training:
        return False
    if kwargs.get("output_attentions"):
        return False
    if attention_mask is not None:
        if attention_mask.dtype != torch.float32 or attention_mask.requires_grad or attention_mask.dim() != 4:
            return False
        if attention_mask.shape[1] != 1 or attention_mask.shape[-2:] != (query.shape[2], key.shape[2]):
            return False
        if attention_mask.shape[0] not in (1, query.shape[0]):
            return False
    return query.shape[1] % key.shape[1] == 0


def softcap_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float | int = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' Gemma 2 eager attention, fused; the eager function where this path does not apply."""
    if not _fast_path_applies(module, query, key, attention_mask, dropout, softcap, kwargs):
        return gemma2_eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            softcap=softcap, **kwargs)
    if scaling is None:
        scaling = module.head_dim**-0.5
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    mask = attention_mask
    if mask is not None and mask.shape[0] != batch:
        mask = mask.expand(batch, -1, -1, -1)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    blocks = _blocks(mask, q_len, k_len, window)
    q5 = query.reshape(batch * kv_heads, groups, q_len, dim)
    k3 = key.reshape(batch * kv_heads, k_len, dim)
    v3 = value.reshape(batch * kv_heads, k_len, value.shape[-1])
    out = _SoftcapAttention.apply(q5, k3, v3, mask, float(scaling), float(softcap), blocks)
    out = out.view(batch, heads, q_len, -1).transpose(1, 2).contiguous()
    return out, None


def register() -> None:
    """Register :data:`ATTN_NAME` with transformers' attention and (eager) mask registries; idempotent."""
    AttentionInterface.register(ATTN_NAME, softcap_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


register()

"""A fused Triton kernel for one batched mixSGA decode step.

One program per (sample b, base KV head j). Its queries are the ``R = H_q / H_kv``
query heads that read base head j; under expert e they read pooled head
``j // g_e`` of expert e's store. The program walks the filled slots
``[starts[b, e], lengths[b, e])`` of every expert store in blocks, keeping an
online softmax (running max, running sum, rescaled accumulator), so the
per-expert partials are merged exactly without materialising logits. Gemma 2's
soft-capping is applied to the logits (tanh written with ``exp``, which the
interpreter and every backend have). Programs run per head of the finest
store given (expert 0's, unless it is switched off). Accumulation is fp32; the output is cast to
the query's dtype. Up to four experts (the stores are separate tensors with
their own strides; unused slots get the first store and a zero length).

On the CPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``,
CPU tensors), which is how CI tests it against ``decode_attention_torch``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 4


@triton.jit
def _walk_expert(
    q, m_i, l_i, acc, b, j,
    k_ptr, v_ptr, s_b, s_h, s_n, group, lengths_ptr, starts_ptr, e, num_e,
    softcap, HAS_SOFTCAP: tl.constexpr, HAS_STARTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, dim,
):
    n_end = tl.load(lengths_ptr + b * num_e + e).to(tl.int32)
    if HAS_STARTS:
        n_start = tl.load(starts_ptr + b * num_e + e).to(tl.int32)
    else:
        n_start = 0
    head = j // group
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    base_k = k_ptr + b * s_b + head * s_h
    base_v = v_ptr + b * s_b + head * s_h
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        kv_off = offs_n[:, None] * s_n + offs_d[None, :]
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(base_k + kv_off, mask=kv_ok, other=0.0).to(tl.float32)  # [N, D]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [R, N]
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(base_v + kv_off, mask=kv_ok, other=0.0).to(tl.float32)  # [N, D]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _mixsga_decode_kernel(
    q_ptr, o_ptr, lengths_ptr, starts_ptr,
    k0, v0, sb0, sh0, sn0, g0,
    k1, v1, sb1, sh1, sn1, g1,
    k2, v2, sb2, sh2, sn2, g2,
    k3, v3, sb3, sh3, sn3, g3,
    num_kv_heads, rep, dim, scaling, softcap,
    q_sb, q_sh, o_sb, o_sh,
    NUM_E: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_STARTS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // num_kv_heads
    j = pid % num_kv_heads
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < rep
    d_ok = offs_d < dim
    q_off = b * q_sb + (j * rep + offs_r)[:, None] * q_sh + offs_d[None, :]
    q_ok = r_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_off, mask=q_ok, other=0.0).to(tl.float32) * scaling  # [R, D]
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    m_i, l_i, acc = _walk_expert(q, m_i, l_i, acc, b, j, k0, v0, sb0, sh0, sn0, g0, lengths_ptr, starts_ptr, 0,
                                 NUM_E, softcap, HAS_SOFTCAP, HAS_STARTS, BLOCK_N, BLOCK_D, dim)
    if NUM_E > 1:
        m_i, l_i, acc = _walk_expert(q, m_i, l_i, acc, b, j, k1, v1, sb1, sh1, sn1, g1, lengths_ptr, starts_ptr, 1,
                                     NUM_E, softcap, HAS_SOFTCAP, HAS_STARTS, BLOCK_N, BLOCK_D, dim)
    if NUM_E > 2:
        m_i, l_i, acc = _walk_expert(q, m_i, l_i, acc, b, j, k2, v2, sb2, sh2, sn2, g2, lengths_ptr, starts_ptr, 2,
                                     NUM_E, softcap, HAS_SOFTCAP, HAS_STARTS, BLOCK_N, BLOCK_D, dim)
    if NUM_E > 3:
        m_i, l_i, acc = _walk_expert(q, m_i, l_i, acc, b, j, k3, v3, sb3, sh3, sn3, g3, lengths_ptr, starts_ptr, 3,
                                     NUM_E, softcap, HAS_SOFTCAP, HAS_STARTS, BLOCK_N, BLOCK_D, dim)
    # nothing stored (l = 0): output zeros, like the torch path
    safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe[:, None]
    o_off = b * o_sb + (j * rep + offs_r)[:, None] * o_sh + offs_d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=q_ok)


def decode_attention_triton(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    block_n: int = 64,
) -> torch.Tensor:
    """The fused kernel behind ``mixsga.kernels.decode_attention(..., backend="triton")``."""
    batch, heads, dim = query.shape
    num_e = len(keys)
    if not 1 <= num_e <= MAX_EXPERTS or len(values) != num_e:
        raise ValueError(f"the Triton decode kernel takes 1..{MAX_EXPERTS} experts, got {num_e}")
    if lengths.shape != (batch, num_e) or (starts is not None and starts.shape != (batch, num_e)):
        raise ValueError(f"lengths / starts must be [{batch}, {num_e}]")
    num_kv = max(k.shape[1] for k in keys)  # programs per head of the finest store; coarser ones pool them
    groups = []
    for k, v in zip(keys, values):
        if k.shape != v.shape or k.stride() != v.stride() or k.stride(-1) != 1 or k.shape[0] != batch:
            raise ValueError("each expert's keys and values need equal shapes and strides, contiguous head dim")
        if num_kv % k.shape[1]:
            raise ValueError(f"store with {k.shape[1]} heads does not pool {num_kv} heads")
        groups.append(num_kv // k.shape[1])
    if heads % num_kv:
        raise ValueError(f"{heads} query heads do not group onto {num_kv} KV heads")
    query = query.contiguous()
    out = torch.empty_like(query)
    lengths = lengths.contiguous()
    starts_t = lengths if starts is None else starts.contiguous()
    args = []
    for e in range(MAX_EXPERTS):
        i = e if e < num_e else 0
        k, v = keys[i], values[i]
        args += [k, v, k.stride(0), k.stride(1), k.stride(2), groups[i]]
    rep = heads // num_kv
    _mixsga_decode_kernel[(batch * num_kv,)](
        query, out, lengths, starts_t, *args,
        num_kv, rep, dim, float(scaling), float(softcap or 1.0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        NUM_E=num_e, HAS_SOFTCAP=softcap is not None, HAS_STARTS=starts is not None,
        BLOCK_R=triton.next_power_of_2(rep), BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(dim),
    )
    return out

"""The torch implementation of one batched mixSGA decode step (the reference for the kernel)."""

from __future__ import annotations

import torch


def decode_logits(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Masked logits ``[B, H_q, sum_e n_e]`` (experts' slots concatenated; -inf outside the fill)."""
    batch, heads, dim = query.shape
    query = query * scaling
    parts, masks = [], []
    for e, k in enumerate(keys):
        groups, n = k.shape[1], k.shape[2]
        # query head h reads pooled head h // (H_q / groups): contiguous, so a reshape groups them
        parts.append(torch.matmul(query.view(batch, groups, heads // groups, dim), k.transpose(-1, -2)).view(batch, heads, n))
        pos = torch.arange(n, device=query.device)
        ok = pos < lengths[:, e : e + 1]
        if starts is not None:
            ok = ok & (pos >= starts[:, e : e + 1])
        masks.append(ok)
    scores = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = masks[0] if len(masks) == 1 else torch.cat(masks, dim=-1)
    return scores.masked_fill(~allowed[:, None, :], float("-inf"))


def decode_attention_torch(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    probs_out: list | None = None,
) -> torch.Tensor:
    """See ``mixsga.kernels.decode_attention``.

    The merge of the per-expert partial softmaxes is exact and done in one op: a
    softmax over the concatenated logits divides each expert's exponentials by the
    same normaliser ``exp(logsumexp_e LSE_e)``. ``probs_out`` (a list) receives the
    ``[B, H_q, sum_e n_e]`` probabilities for an observer.
    """
    batch, heads, dim = query.shape
    scores = decode_logits(query, keys, lengths, starts, scaling, softcap)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    # a sample with nothing stored has an all -inf row: NaN -> 0
    probs = torch.nan_to_num(probs, nan=0.0).to(query.dtype)
    if probs_out is not None:
        probs_out.append(probs)
    out, start = None, 0
    for v in values:
        groups, n = v.shape[1], v.shape[2]
        part = torch.matmul(probs[..., start : start + n].view(batch, groups, heads // groups, n), v).view(batch, heads, dim)
        out = part if out is None else out + part
        start += n
    return out

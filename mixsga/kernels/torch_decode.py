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
    biases: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Masked logits ``[B, H_q, sum_e n_e]`` (experts' slots concatenated; -inf outside the fill).

    ``biases[e]`` (optional, ``[B, >= n_e]``: 0 on filled slots, -inf elsewhere, kept by the
    cache at append time) replaces the length masks, which saves a few ops per expert.
    """
    batch, heads, dim = query.shape
    query = query * scaling
    parts, masks = [], []
    for e, k in enumerate(keys):
        groups, n = k.shape[1], k.shape[2]
        # query head h reads pooled head h // (H_q / groups): contiguous, so a reshape groups them
        logit = torch.matmul(query.view(batch, groups, heads // groups, dim), k.transpose(-1, -2))
        if softcap is not None:
            logit = torch.tanh(logit / softcap) * softcap
        if biases is not None and starts is None:
            logit = logit + biases[e][:, None, None, :n]
        else:
            pos = torch.arange(n, device=query.device)
            ok = pos < lengths[:, e : e + 1]
            if starts is not None:
                ok = ok & (pos >= starts[:, e : e + 1])
            masks.append(ok)
        parts.append(logit.view(batch, heads, n))
    scores = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if masks:
        allowed = masks[0] if len(masks) == 1 else torch.cat(masks, dim=-1)
        scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    return scores


def decode_attention_torch(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    probs_out: list | None = None,
    biases: list[torch.Tensor] | None = None,
    empty_rows: bool = True,
) -> torch.Tensor:
    """See ``mixsga.kernels.decode_attention``.

    The merge of the per-expert partial softmaxes is exact and done in one op: a
    softmax over the concatenated logits divides each expert's exponentials by the
    same normaliser ``exp(logsumexp_e LSE_e)``. ``probs_out`` (a list) receives the
    ``[B, H_q, sum_e n_e]`` probabilities for an observer. ``empty_rows=False``
    promises that every sample has a stored token (the cache's decode step, where
    padded samples are zeroed afterwards), skipping the NaN -> 0 fix of empty rows.
    """
    batch, heads, dim = query.shape
    scores = decode_logits(query, keys, lengths, starts, scaling, softcap, biases)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if empty_rows:  # a sample with nothing stored has an all -inf row: NaN -> 0
        probs = torch.nan_to_num(probs, nan=0.0)
    probs = probs.to(query.dtype)
    if probs_out is not None:
        probs_out.append(probs)
    out, start = None, 0
    for v in values:
        groups, n = v.shape[1], v.shape[2]
        part = torch.matmul(probs[..., start : start + n].view(batch, groups, heads // groups, n), v)
        part = part.view(batch, heads, dim)
        out = part if out is None else out + part
        start += n
    return out


def decode_attention_biased(
    query: torch.Tensor,
    keys_t: list[torch.Tensor],
    values: list[torch.Tensor],
    biases: list[torch.Tensor],
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """The cache's hot path: like ``decode_attention_torch`` with the masks given as additive biases.

    Per expert, with ``G = B * H_kv / g_e`` (sample x pooled head, flattened):
    ``keys_t[e]`` ``[G, d, cap_e]`` (transposed views of the whole buffers),
    ``values[e]`` ``[G, cap_e, d]``, ``biases[e]`` ``[G, 1, cap_e]``: 0 on filled slots,
    -inf on the rest. Shapes are constant between capacity growths, so the cache hands
    the same views every step (and ``torch.compile`` sees static shapes). 3-D
    ``baddbmm`` / ``bmm`` rather than 4-D ``matmul``: same kernels, fewer view ops.
    Every sample must have a filled slot.
    """
    batch, heads, dim = query.shape
    parts = []
    for kt, bias in zip(keys_t, biases):
        groups = kt.shape[0]
        q = query.view(groups, -1, dim)  # query head h reads pooled head h // (H_q / H_e): a reshape
        if softcap is None:
            logit = torch.baddbmm(bias, q, kt, alpha=scaling)
        else:
            logit = torch.bmm(q, kt) * scaling
            logit = torch.tanh(logit / softcap) * softcap + bias
        parts.append(logit.view(batch, heads, -1))
    scores = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out, start = None, 0
    for v in values:
        groups, n = v.shape[0], v.shape[1]
        p = probs[..., start : start + n].view(groups, -1, n)
        out = torch.bmm(p, v) if out is None else torch.baddbmm(out.view(groups, -1, dim), p, v)
        start += n
    return out.view(batch, heads, dim)


def decode_attention_static(
    query: torch.Tensor,
    scratch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    query_views: list[torch.Tensor],
    score_views: list[torch.Tensor],
    prob_views: list[torch.Tensor],
    keys_t: list[torch.Tensor],
    values: list[torch.Tensor],
    biases: list[torch.Tensor],
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """``decode_attention_biased`` with the query, logits and probabilities in preallocated scratch.

    The CPU batch-1 fast path of the cache (``mixsga.cache``), where a step's cost is the
    number of ops dispatched: the query is copied once into ``scratch[0]``
    (``query_views[e]``: its per-expert ``[G, H_q / G, d]`` views), the per-expert logits
    are concatenated by ``cat(out=)`` into ``scratch[1]`` (``[B, H_q, sum_e cap_e]``;
    ``score_views[e]``: expert e's columns as ``[G, H_q / G, cap_e]``), one
    ``softmax(out=)`` fills ``scratch[2]`` (``prob_views[e]`` likewise), and the values are
    merged by ``bmm`` / ``baddbmm_`` from those fixed views: no slicing or view op per
    expert and step (the views are built once per capacity growth). The logits are
    computed into fresh, contiguous tensors and then concatenated, not written by
    ``baddbmm(out=)`` into the strided columns: CPU ``baddbmm`` loops over the batch with
    one ``addmm_`` per matrix for a strided output (measured slower on the zoo shapes).
    Same arithmetic as ``decode_attention_biased``; float32 (the softmax is taken in
    the scratch's dtype). The result is a new tensor.
    """
    q_buf, scores, probs = scratch
    q_buf.copy_(query)
    heads = query.shape[1]
    parts = []
    for q, kt, bias in zip(query_views, keys_t, biases):
        if softcap is None:
            logit = torch.baddbmm(bias, q, kt, alpha=scaling)
        else:
            logit = torch.bmm(q, kt)
        parts.append(logit.view(1, heads, -1))
    torch.cat(parts, dim=-1, out=scores)
    if softcap is not None:
        scores.mul_(scaling).div_(softcap).tanh_().mul_(softcap)
        for bias, view in zip(biases, score_views):
            view.add_(bias)
    torch.softmax(scores, dim=-1, out=probs)
    out = None
    for p, v in zip(prob_views, values):
        if out is None:
            out = torch.bmm(p, v)
        else:
            out.view(p.shape[0], p.shape[1], -1).baddbmm_(p, v)
    return out.view(query.shape)

"""Decode attention over mixSGA's preallocated per-expert stores.

``decode_attention(query, keys, values, lengths, starts, scaling, softcap, backend)``
is one batched decode step of one layer: for every sample b and expert e the
filled part ``[starts[b, e], lengths[b, e])`` of expert e's store is attended,
and the per-expert partial softmaxes are merged exactly (log-sum-exp). Backends:

* ``"torch"`` (``mixsga.kernels.torch_decode``): one logits and one value matmul
  per expert, length masks, one softmax over the concatenated logits (which is
  the log-sum-exp merge done in one op). Pure tensor code with static shapes per
  call, so ``torch.compile`` can capture it (``"compiled"``).
* ``"triton"`` (``mixsga.kernels.triton_decode``): one fused program per
  (sample, base KV head), walking the expert stores with an online softmax.
  Used on CUDA when Triton is installed; on the CPU it runs under Triton's
  interpreter (``TRITON_INTERPRET=1``) for tests only.
"""

from __future__ import annotations

import functools

import torch

from mixsga.kernels.torch_decode import decode_attention_torch

BACKENDS = ("auto", "torch", "compiled", "triton")


def triton_available() -> bool:
    """Whether the Triton kernel can be imported (the package is installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA with Triton installed, else ``"torch"``; others are checked."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise ValueError("decode backend 'triton' needs the triton package (pip install triton)")
    return backend


@functools.lru_cache(maxsize=1)
def _compiled():
    # dynamic=True: store lengths change every step; one graph serves them all.
    return torch.compile(decode_attention_torch, dynamic=True, fullgraph=True)


def decode_attention(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    backend: str = "torch",
    biases: list[torch.Tensor] | None = None,
    empty_rows: bool = True,
) -> torch.Tensor:
    """One decode query per sample ``[B, H_q, d]`` over the expert stores -> ``[B, H_q, d]``.

    ``keys[e]`` / ``values[e]``: ``[B, H_kv / g_e, n_e, d]`` (``n_e`` = the store's
    slots in use, at least ``lengths[:, e].max()``); ``lengths`` ``[B, E]``: filled
    entries per sample and expert; ``starts`` ``[B, E]`` or None: first entry inside a
    sliding window. A sample with no entry at all gets zeros (unless ``empty_rows``
    is False: then the caller promises there is none). ``biases`` (torch backends
    only): per-expert additive masks the cache maintains, used instead of ``lengths``.
    """
    if backend == "triton":
        from mixsga.kernels.triton_decode import decode_attention_triton

        return decode_attention_triton(query, keys, values, lengths, starts, scaling, softcap)
    fn = _compiled() if backend == "compiled" else decode_attention_torch
    return fn(query, keys, values, lengths, starts, scaling, softcap, None, biases, empty_rows)


__all__ = ["BACKENDS", "decode_attention", "decode_attention_torch", "resolve_backend", "triton_available"]

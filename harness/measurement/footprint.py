"""What a run measures on its built model: live K/V bytes, latency and peak memory per context length, routing."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from harness.measurement.generation import generate_exactly
from harness.measurement.measure import time_generation


def prompt_ids(tokenizer, texts: list[str], n: int) -> torch.Tensor:
    """The first ``n`` tokens of the eval texts' token stream, as a ``[1, n]`` prompt."""
    from harness.evaluation.perplexity import token_stream

    ids, _ = token_stream(tokenizer, texts, max_tokens=n)
    if len(ids) < n:
        raise ValueError(f"the eval texts give {len(ids)} tokens, fewer than the context length {n}")
    return torch.tensor([ids[:n]], dtype=torch.long)


def measure_cache_bytes(model, method, params, prompt: torch.Tensor, new_tokens: int) -> int:
    """Live K/V bytes after a prompt and ``new_tokens`` generated tokens."""
    cache = method.new_cache(model, params)
    out = generate_exactly(model, prompt, new_tokens, cache=cache)
    return int(method.live_bytes(cache if cache is not None else out.past_key_values))


def measure_latency(model, method, params, prompt: torch.Tensor, measure_cfg: Mapping[str, Any],
                    device: str) -> dict:
    """Prefill ms and decode tokens/s (warm-up, repeats) and peak memory per phase at one context length."""

    def generate(n: int, **kwargs):
        return generate_exactly(model, prompt, n, cache=method.new_cache(model, params), **kwargs)

    got = time_generation(generate, new_tokens=int(measure_cfg["new_tokens"]), device=device,
                          repeats=int(measure_cfg["repeats"]), warmup=int(measure_cfg["warmup"]))
    mem = got["peak_memory"]
    return {
        "context_len": int(prompt.shape[1]),
        "new_tokens": int(measure_cfg["new_tokens"]),
        "prefill_ms": got["prefill_ms"],
        "decode_tokens_per_s": got["decode_tokens_per_s"],
        "peak_memory_bytes": {phase: mem[phase]["process"] for phase in ("prefill", "decode")},
        "peak_torch_allocated_bytes": {phase: mem[phase]["torch_max_allocated"] for phase in ("prefill", "decode")},
        "memory_source": mem["prefill"]["process_source"],
    }


def routing_stats(model) -> dict | None:
    """mixSGA's routing statistics since the last reset, or None for a model without a router."""
    runtime = getattr(model, "mixsga_runtime", None)
    return None if runtime is None else runtime.routing_stats()


def reset_routing_stats(model) -> None:
    """Start counting routing afresh (after evaluation, before the measured generations)."""
    runtime = getattr(model, "mixsga_runtime", None)
    if runtime is not None:
        runtime.reset_stats()

"""Latency and memory measurement, following optimum-benchmark's protocol.

Prefill is timed as ``generate`` of one token; decode inside the ``generate`` of N
tokens, from the first token's logits to the last's
(:class:`harness.measurement.generation.StepClock`), so decode tokens/s counts the N - 1
tokens produced from the cache. Warm-up runs come first, then at least five
timed repeats; CUDA events time GPU work, ``perf_counter`` times CPU work.
Peak memory is taken per phase: torch's allocator peak (reset before the phase)
and the driver's view of the process (pynvml) on GPU, resident set size on CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import psutil
import torch

from harness.measurement.generation import StepClock


def summarise(samples: list[float]) -> dict[str, float]:
    """Mean, median, 90th percentile, standard deviation, min and count of samples."""
    ordered = sorted(samples)
    p90_index = min(len(ordered) - 1, max(0, round(0.9 * (len(ordered) - 1))))
    return {
        "mean": statistics.fmean(ordered),
        "p50": statistics.median(ordered),
        "p90": ordered[p90_index],
        "std": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
        "min": ordered[0],
        "n": len(ordered),
    }


class Timer:
    """Wall-clock timer of one phase: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __enter__(self) -> "Timer":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0


def _nvml_process_bytes(device: torch.device) -> int | None:
    """GPU memory the driver attributes to this process, or None where pynvml can't tell."""
    try:
        import os

        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory or 0)
        return None
    except Exception:  # noqa: BLE001 - no driver, container without PID namespace, ...
        return None


@dataclass
class PeakMemory:
    """Peak memory of one phase, in bytes."""

    device: torch.device
    allocated: int | None = None
    process: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated = int(torch.cuda.max_memory_allocated(self.device))
            self.process = _nvml_process_bytes(self.device)
        else:
            # RSS after the phase; the OS gives no per-phase peak without a sampler thread.
            self.process = int(psutil.Process().memory_info().rss)

    def as_dict(self) -> dict[str, int | None]:
        source = "nvml" if self.device.type == "cuda" else "rss"
        return {"torch_max_allocated": self.allocated, "process": self.process, "process_source": source}


def time_generation(
    generate: Callable[[int], object],
    *,
    new_tokens: int,
    device: torch.device | str,
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, object]:
    """Time prefill (generate 1 token) and decode (the ``new_tokens - 1`` cached steps of a generation).

    ``generate(n, **kwargs)`` must run one generation of exactly ``n`` new tokens, passing
    ``kwargs`` (a ``logits_processor``) on to ``generate``, and return its output. The decode
    time is read off a :class:`~harness.measurement.generation.StepClock` inside the
    ``new_tokens`` generation (first token's logits to the last's). Returns prefill
    milliseconds, decode tokens/s (each a summary over repeats), peak memory per phase, and the
    last decode output.
    """
    if repeats < 1 or new_tokens < 2:
        raise ValueError(f"need repeats >= 1 and new_tokens >= 2, got {repeats}, {new_tokens}")
    device = torch.device(device)
    for _ in range(warmup):
        generate(new_tokens)
    prefill_s: list[float] = []
    decode_tps: list[float] = []
    output = None
    for _ in range(repeats):
        with PeakMemory(device) as prefill_mem, Timer(device) as t_prefill:
            generate(1)
        clock = StepClock(device)
        with PeakMemory(device) as decode_mem:
            clock.begin()
            output = generate(new_tokens, logits_processor=clock.processors())
        prefill_s.append(t_prefill.seconds)
        decode_tps.append((new_tokens - 1) / clock.decode_seconds)
    return {
        "prefill_ms": summarise([s * 1000 for s in prefill_s]),
        "decode_tokens_per_s": summarise(decode_tps),
        "peak_memory": {"prefill": prefill_mem.as_dict(), "decode": decode_mem.as_dict()},
        "output": output,
    }


T = TypeVar("T")


def interleaved(trials: Mapping[str, Callable[[], T]], *, repeats: int, warmup: int = 1) -> dict[str, list[T]]:
    """Run each trial ``warmup`` times, then ``repeats`` rounds of all trials in alternating order.

    Each trial measures itself and returns its sample (seconds, a dict, ...); the order
    flips every round so that drift of the machine (thermal, other load) falls on every
    trial alike. This is the one interleaving protocol of runs, overheads and benchmarks.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    for trial in trials.values():
        for _ in range(warmup):
            trial()
    samples: dict[str, list[T]] = {name: [] for name in trials}
    order = list(trials)
    for rep in range(repeats):
        for name in (order if rep % 2 == 0 else order[::-1]):
            samples[name].append(trials[name]())
    return samples

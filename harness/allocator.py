"""Keep freed host memory in the process: glibc ``mallopt`` settings every harness job starts with.

By default glibc serves large blocks (above a dynamic threshold of 128 KiB to 32 MiB) with
``mmap`` and gives freed memory back to the OS (``munmap``, heap trimming), so a computation that
allocates large temporaries page-faults its memory afresh on every call. PyTorch's CPU allocator
is glibc's ``malloc``, so this is what an explicit-attention prefill pays on every forward pass:
measured at 1,024 tokens (``benchmarks/allocator.py``, ``results/bench/allocator.json``), 131,080
minor page faults per H2O prefill of the tiny Llama 3 and 42 % of its time, and 17-50 % of every
Gemma 2 prefill (eager soft-capped attention materialises its logits). Inside the cost benchmark
job the gain shows on Gemma 2's eviction prefills (``results/probe_perf_alloc/``). Serving stacks
avoid it (a caching allocator on CUDA; jemalloc / tcmalloc on CPU, as PyTorch's CPU performance
guide recommends); we keep glibc and tell it to keep what it has:
no ``mmap`` for any size (``M_MMAP_MAX`` 0) and no trimming (``M_TRIM_THRESHOLD`` at its maximum),
so memory freed by one forward pass is reused by the next. Results do not change (the same
arithmetic on the same values); the resident set stays at the process's high-water mark.

``MIXSGA_MALLOC=system`` leaves glibc's defaults (e.g. to measure the difference); on a C library
without ``mallopt`` (macOS, musl) nothing is changed. :func:`allocator_settings` says which held,
for provenance.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
_SETTINGS = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, 2**31 - 1),
             "M_TOP_PAD": (M_TOP_PAD, 64 * 2**20)}
_applied: dict[str, int] | None = None


def tune_allocator() -> dict[str, int] | None:
    """Apply the settings above once per process (idempotent); the applied ``{name: value}`` or None."""
    global _applied
    if _applied is not None or os.environ.get("MIXSGA_MALLOC", "").lower() == "system":
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = {name: value for name, (param, value) in _SETTINGS.items() if mallopt(param, value) == 1}
    _applied = applied or None
    return _applied


def allocator_settings() -> dict[str, object]:
    """What this process runs with, for a record's provenance."""
    if _applied is None:
        reason = "MIXSGA_MALLOC=system" if os.environ.get("MIXSGA_MALLOC", "").lower() == "system" else "not applied"
        return {"malloc": "system defaults", "reason": reason}
    return {"malloc": "glibc mallopt", **_applied}

"""One colour and marker per method, shared by every figure (a method looks the same everywhere)."""

from __future__ import annotations

_ARCH = {"base": ("black", "*"), "gqa": ("tab:green", "^"), "mqa": ("tab:purple", "v"), "cla": ("tab:blue", "s"),
         "mixsga": ("tab:red", "o")}
_EVICTION = {"h2o": "tab:orange", "streamingllm": "tab:brown", "snapkv": "tab:pink", "tova": "tab:olive"}


def method_style(method: str) -> tuple[str, str]:
    """``(colour, marker)``: eviction methods by their colour, stacked on GQA / mixSGA with that method's marker."""
    evict, _, inner = str(method).partition("+")
    if evict in _EVICTION:
        return _EVICTION[evict], (_ARCH[inner][1] if inner in _ARCH else "D")
    return _ARCH.get(str(method), ("tab:gray", "X"))

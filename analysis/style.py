"""One colour and marker per method, shared by every figure (a method looks the same everywhere)."""

from __future__ import annotations

from pathlib import Path

_ARCH = {"base": ("black", "*"), "gqa": ("tab:green", "^"), "mqa": ("tab:purple", "v"), "cla": ("tab:blue", "s"),
         "mixsga": ("tab:red", "o")}
_EVICTION = {"h2o": "tab:orange", "streamingllm": "tab:brown", "snapkv": "tab:pink", "tova": "tab:olive"}


def method_style(method: str) -> tuple[str, str]:
    """``(colour, marker)``: eviction methods by their colour, stacked on GQA / mixSGA with that method's marker."""
    evict, _, inner = str(method).partition("+")
    if evict in _EVICTION:
        return _EVICTION[evict], (_ARCH[inner][1] if inner in _ARCH else "D")
    return _ARCH.get(str(method), ("tab:gray", "X"))


def facet_axes(plt, rows: list, families: list, *, width: float = 4.6, height: float = 4.0, wrap: int = 2):
    """``(fig, {(row, family): ax}, left_axes)``: one panel per row key x family.

    With a single row the families wrap ``wrap`` to a line: four families read better as 2 x 2
    than as four narrow panels. ``left_axes`` are the panels that carry the y label.
    """
    ncols = min(wrap, len(families)) if len(rows) == 1 else len(families)
    per_row = -(-len(families) // ncols)
    fig, grid = plt.subplots(len(rows) * per_row, ncols, figsize=(width * ncols, height * len(rows) * per_row),
                             squeeze=False, layout="constrained")
    axes = {}
    for r, row in enumerate(rows):
        for i, family in enumerate(families):
            axes[(row, family)] = grid[r * per_row + i // ncols][i % ncols]
    for ax in grid.flat[len(rows) * len(families):]:
        ax.set_visible(False)
    return fig, axes, [grid[k][0] for k in range(len(grid))]


def shared_legend(fig, axes) -> None:
    """One legend for the whole figure, right of the panels: each label once, from whichever panel has it."""
    handles: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, frameon=False)


def save_figure(fig, out: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``out`` atomically (parent folders created; format from the suffix) and release it."""
    import io

    import matplotlib.pyplot as plt

    from harness.atomic import write_atomic

    out = Path(out)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=out.suffix.lstrip(".") or None)
    plt.close(fig)
    return write_atomic(out, buffer.getvalue())

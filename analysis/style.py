"""One colour, marker and label per method, shared by every figure: each method's spec states them."""

from __future__ import annotations

from pathlib import Path


def _spec(method: str):
    from harness.methods import get_spec

    try:
        return get_spec(str(method))
    except ValueError:
        return None


def method_style(method: str) -> tuple[str, str]:
    """``(colour, marker)`` of a method, as its spec states (grey cross for a name the registry lacks)."""
    spec = _spec(method)
    return ("tab:gray", "X") if spec is None else (spec.color, spec.marker)


def method_label(method: str) -> str:
    """The method's name in legends, as its spec states (the name itself for one the registry lacks)."""
    spec = _spec(method)
    return str(method) if spec is None else spec.label


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

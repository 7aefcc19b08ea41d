"""Figures drawn from the collated tables (never from anything but the records)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.collate import perplexity_summary  # noqa: E402
from analysis.style import save_figure  # noqa: E402


def plot_perplexity(table: pd.DataFrame | str | Path, out: str | Path) -> Path:
    """Bar chart: held-out perplexity per token of each base model next to its unigram floor.

    ``table`` is the tidy table of analysis.collate (or the path of its CSV). Log-scale y axis,
    mean over seeds with the standard deviation as error bar, values printed on the bars.
    """
    if not isinstance(table, pd.DataFrame):
        table = pd.read_csv(table)
    base = table[table["method"] == "base"]
    if base.empty:
        raise ValueError("no 'base' runs in the table: nothing to plot")
    summary = perplexity_summary(base)
    labels = [m if m == f else f"{m}\n({f})" for m, f in zip(summary["model"], summary["family"])]
    x = np.arange(len(summary))
    width = 0.38

    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(summary) + 3.5), 4.2), layout="constrained")
    model_bars = ax.bar(
        x - width / 2,
        summary["ppl_token"],
        width,
        yerr=summary["ppl_token_std"] if (summary["seeds"] > 1).any() else None,
        capsize=3,
        label="base model",
        color="tab:blue",
    )
    ax.bar_label(model_bars, fmt="%.1f", padding=2, fontsize=8)
    has_unigram = summary["ppl_unigram"].notna()
    if has_unigram.any():
        uni_bars = ax.bar(
            x[has_unigram] + width / 2,
            summary.loc[has_unigram, "ppl_unigram"],
            width,
            label="unigram baseline",
            color="tab:gray",
        )
        ax.bar_label(uni_bars, fmt="%.1f", padding=2, fontsize=8)
    ax.set_yscale("log")
    # bars grow from perplexity 1 (a perfect model), so their lengths compare on the log scale
    top = float(pd.concat([summary["ppl_token"] + summary["ppl_token_std"], summary["ppl_unigram"]]).max())
    ax.set_ylim(1, top * 4)  # head room for the value labels
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xticks(x, labels)
    ax.set_xlabel("base model")
    ax.set_ylabel("held-out perplexity per token (log scale)")
    eval_sets = ", ".join(sorted(set(map(str, base["eval_set"]))))
    seeds = int(summary["seeds"].max())
    ax.set_title(f"Held-out perplexity of the base models\n(eval: {eval_sets}; {seeds} seed(s); lower is better)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", which="major", alpha=0.3)
    return save_figure(fig, out, dpi=150)

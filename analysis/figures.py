"""The paper's figures regenerated from our outputs: Figure 3 (records) and Figure 1 (token-importance JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.collate import read_table  # noqa: E402
from analysis.stats import summarise  # noqa: E402
from analysis.style import method_label, method_style, save_figure  # noqa: E402
from analysis.tables import experiment_runs  # noqa: E402

#: Methods drawn as lines over the budget sweep; the others are single points.
SWEEP_LINES = ("mixsga", "cla")
#: How methods are named in legends (the papers' spelling).


def figure3(table: pd.DataFrame | str | Path, out: str | Path, *,
            experiment: str = "figure3_budget_sweep", quality: str = "ppl_token") -> Path:
    """Perplexity vs realized KV budget: mixSGA and CLA as lines, GQA / MQA (and the base) as points.

    Mean over seeds with 95 % t-interval error bars; one panel per family in the experiment.
    """
    runs = experiment_runs(read_table(table), experiment)
    runs = runs[runs[quality].notna() & runs["budget_realized"].notna()] if quality in runs else runs.iloc[0:0]
    if runs.empty:
        raise ValueError(f"no run of {experiment!r} has both {quality!r} and a realized budget")
    keys = ["family", "arch", "budget_nominal"]
    summ = summarise(runs, keys, [quality, "budget_realized"])
    families = sorted(summ["family"].dropna().unique())
    fig, axes = plt.subplots(1, len(families), figsize=(5.8 * len(families), 4.4), squeeze=False,
                             layout="constrained")
    for ax, family in zip(axes[0], families):
        part = summ[summ["family"] == family].sort_values("budget_realized")
        for arch, sub in part.groupby("arch"):
            x = 100 * sub["budget_realized"]
            yerr = sub[f"{quality}_ci"].fillna(0.0)
            if arch == "base":
                ax.axhline(sub[quality].iloc[0], color="black", ls=":", lw=1, label="base (100 % KV)")
                continue
            colour, marker = method_style(arch)
            ls = "-" if arch in SWEEP_LINES else "none"
            ax.errorbar(x, sub[quality], yerr=yerr, color=colour, marker=marker, ls=ls, capsize=3, ms=7,
                        label=method_label(arch))
        ax.set_xlabel("realized KV budget (% of the base model's cache)")
        ax.set_ylabel(f"held-out perplexity per token ({quality})")
        ax.set_title(family)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = int(summ["seeds"].max())
    fig.suptitle(f"Figure 3: perplexity vs KV budget\n(lower is better; mean of up to {seeds} seed(s), 95 % CI)")
    return save_figure(fig, out, dpi=140)


def _load_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} JSON at {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def figure1(source: dict | str | Path, out: str | Path) -> Path:
    """Figure 1 from ``harness.evaluation.token_importance`` JSON: (a) Δ sequence perplexity per token position, (b) histogram."""
    data = source if isinstance(source, dict) else _load_json(source, "token-importance")
    missing = [k for k in ("positions", "delta_pct", "base_ppl") if k not in data]
    if missing:
        raise ValueError(f"token-importance JSON lacks {missing}")
    pos, delta = np.asarray(data["positions"], float), np.asarray(data["delta_pct"], float)
    if len(pos) != len(delta) or len(pos) == 0:
        raise ValueError(f"positions ({len(pos)}) and delta_pct ({len(delta)}) must be non-empty and aligned")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.0), layout="constrained")
    a.plot(pos, delta, color="tab:blue", lw=0.9)
    a.axhline(0, color="black", lw=0.6)
    a.set_xlabel("token position")
    a.set_ylabel("Δ sequence perplexity (%)")
    a.set_title(f"(a) per token (base ppl {float(data['base_ppl']):.2f})")
    a.grid(alpha=0.3)
    b.hist(delta, bins=min(40, max(10, len(delta) // 6)), color="tab:orange", edgecolor="black", lw=0.4)
    mean, median = float(np.mean(delta)), float(np.median(delta))
    b.axvline(mean, color="tab:red", ls="--", label=f"mean {mean:.3f} %")
    b.axvline(median, color="tab:green", ls=":", label=f"median {median:.3f} %")
    b.set_xlabel("Δ sequence perplexity (%)")
    b.set_ylabel("tokens (count)")
    b.set_title("(b) distribution over tokens")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    who = f"{data.get('family') or data.get('model', '?')}, {data.get('text_set', '?')} {data.get('split', '')}"
    fig.suptitle(f"Figure 1: change of sequence perplexity when one token's K/V is averaged over heads ({who}, "
                 f"{len(pos) + 1} tokens)", fontsize=10)
    return save_figure(fig, out, dpi=140)

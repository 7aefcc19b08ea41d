"""Recovery curves: held-out perplexity against uptraining tokens, per family (``recovery_curves``).

Every CPT / SFT checkpoint records its held-out loss at step 0 (the converted, untrained model)
and at evenly spaced steps (``harness.training.train.Curve``; the records'
``identity.training_summary.curve``). This module reads those points from the records of the
``main`` grid's CPT runs (nothing is retrained or recomputed) for GQA, CLA and mixSGA at 50 %
and MQA (with the CPT'd base as the reference line), plots them one panel per family (mean
over seeds, thin per-seed lines), and tabulates per family and method the final held-out
perplexity and the relative change of the held-out loss over the last quarter of the
uptraining tokens, flagged ``plateaued`` (< :data:`PLATEAU` in absolute value) or ``moving``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.collate import flatten, get, to_markdown
from analysis.style import facet_axes, method_label, method_style, save_figure, shared_legend
from harness.atomic import write_atomic
from harness.orchestration.records import read_record

#: The methods the figure compares (budget 0.5 except MQA, whose budget is 1 / K/V heads), base as reference.
CURVE_METHODS = ("base", "gqa", "cla", "mixsga", "mqa")
#: Budget of the compared methods other than MQA and the base.
CURVE_BUDGET = 0.5
#: Relative change of the held-out loss over the last quarter below which a curve counts as plateaued.
PLATEAU = 0.01
#: Where the last quarter starts, as a fraction of the uptraining tokens.
LAST_QUARTER = 0.75

COLUMNS = ["model", "family", "method", "variant", "budget_nominal", "seed", "run_id", "step", "tokens", "loss", "ppl"]


def selected(method: str, budget: float, explicit_params: Mapping | None) -> bool:
    """Whether a run is one the recovery figure compares: base, MQA, or GQA / CLA / mixSGA at 50 %, each with
    the method's defaults (no params in its config entry: not an ablation such as the LM-trained router)."""
    if method not in CURVE_METHODS or explicit_params:
        return False
    return method in ("base", "mqa") or math.isclose(float(budget), CURVE_BUDGET)


def _record_paths(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    return out


def load_curves(records: Iterable[str | Path | Mapping]) -> pd.DataFrame:
    """One row per curve point of every selected CPT run (records as paths, directories or dicts).

    A selected run whose record has no curve (trained before curves were recorded, or with
    ``curve.points: 0``) is refused by name: the figure would silently miss a method.
    """
    rows, missing = [], []
    items = [r for r in records if isinstance(r, Mapping)]
    items += [read_record(p) for p in _record_paths(r for r in records if not isinstance(r, Mapping))]
    for record in items:
        flat = flatten(record)
        explicit = get(record, "identity.config.params", default={})  # the grid entry's params, not the resolved
        if flat["training"] != "cpt" or not selected(flat["method"], flat["budget_nominal"], explicit):
            continue
        curve = get(record, "identity.training_summary.curve", default=[])
        if not curve:
            missing.append(str(flat["run_id"]))
            continue
        for point in curve:
            rows.append({**{k: flat.get(k) for k in COLUMNS[:7]}, **{k: point[k] for k in ("step", "tokens", "loss")},
                         "ppl": math.exp(min(float(point["loss"]), 700.0))})
    if missing:
        raise ValueError(f"CPT runs without a held-out curve in their records: {', '.join(sorted(missing))}; "
                         "retrain them with training.cpt.curve.points > 0 (delete their trained checkpoints)")
    if not rows:
        raise ValueError(f"no CPT record of {', '.join(CURVE_METHODS)} (GQA / CLA / mixSGA at "
                         f"{CURVE_BUDGET:g}) with a held-out curve")
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["family", "method", "seed", "tokens"], kind="stable")


def _loss_at(tokens: np.ndarray, loss: np.ndarray, at: float) -> float:
    """The held-out loss at ``at`` tokens, linear between the curve's points."""
    return float(np.interp(at, tokens, loss))


def last_quarter_change(tokens: Sequence[float], loss: Sequence[float]) -> float:
    """``(L(T) - L(0.75 T)) / L(0.75 T)``: the relative change of the loss over the last quarter of ``T`` tokens."""
    t, y = np.asarray(tokens, dtype=float), np.asarray(loss, dtype=float)
    if len(t) < 2 or t[-1] <= 0:
        raise ValueError("a curve needs at least two points, the last after some training")
    start = _loss_at(t, y, LAST_QUARTER * t[-1])
    return (y[-1] - start) / start


def mean_curves(points: pd.DataFrame) -> pd.DataFrame:
    """The seed-mean loss per family x method x token count (seeds share the token counts of their recipe)."""
    keys = ["family", "model", "method", "budget_nominal", "tokens"]
    out = points.groupby(keys, dropna=False).agg(loss=("loss", "mean"), seeds=("seed", "nunique")).reset_index()
    out["ppl"] = np.exp(out["loss"])
    return out


def recovery_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per family x method: final held-out ppl (seed mean of the loss), last-quarter change, plateaued or moving."""
    rows = []
    for (family, model, method, budget), part in mean_curves(points).groupby(
            ["family", "model", "method", "budget_nominal"], dropna=False, sort=True):
        part = part.sort_values("tokens")
        change = last_quarter_change(part["tokens"], part["loss"])
        seeds = points[(points["family"] == family) & (points["method"] == method)
                       & (points["budget_nominal"] == budget)]
        per_seed = [last_quarter_change(s["tokens"], s["loss"]) for _, s in seeds.groupby("seed")]
        rows.append({
            "family": family, "model": model, "method": method, "label": method_label(method),
            "budget": float(budget), "seeds": int(part["seeds"].max()),
            "tokens": int(part["tokens"].iloc[-1]),
            "ppl_step0": float(np.exp(part["loss"].iloc[0])),
            "ppl_final": float(np.exp(part["loss"].iloc[-1])),
            "loss_change_last_quarter": change,
            "loss_change_last_quarter_max_seed": max(per_seed, key=abs),
            "status": "plateaued" if abs(change) < PLATEAU else "moving",
        })
    order = {m: i for i, m in enumerate(CURVE_METHODS)}
    table = pd.DataFrame(rows)
    return table.sort_values(["family", "method"], key=lambda c: c.map(order) if c.name == "method" else c,
                             kind="stable").reset_index(drop=True)


def plot_recovery(points: pd.DataFrame, out: str | Path) -> Path:
    """Held-out perplexity against uptraining tokens: one panel per family, the seed mean bold, each seed thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    families = sorted(points["family"].dropna().unique())
    fig, axes, left = facet_axes(plt, ["curves"], families, height=3.8)
    means = mean_curves(points)
    for family in families:
        ax = axes[("curves", family)]
        for method in [m for m in CURVE_METHODS if m in set(points.loc[points["family"] == family, "method"])]:
            colour, marker = method_style(method)
            style = "--" if method == "base" else "-"
            for _, seed in points[(points["family"] == family) & (points["method"] == method)].groupby("seed"):
                ax.plot(seed["tokens"], seed["ppl"], color=colour, ls=style, lw=0.7, alpha=0.35)
            mean = means[(means["family"] == family) & (means["method"] == method)].sort_values("tokens")
            budget = mean["budget_nominal"].iloc[0]
            label = method_label(method) + (" (full KV)" if method == "base" else f" {100 * budget:.0f} %")
            ax.plot(mean["tokens"], mean["ppl"], color=colour, ls=style, marker=marker, ms=4, lw=1.6, label=label)
        last = points.loc[points["family"] == family, "tokens"].max()
        ax.axvspan(LAST_QUARTER * last, last, color="0.9", zorder=0)
        ax.set_yscale("log")
        # plain numbers on the log axis; the minor ticks labelled too when the panel spans under a decade
        low, high = ax.get_ylim()
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
        ax.set_title(family, fontsize=10)
        ax.set_xlabel("uptraining tokens (CPT)")
        if ax in left:
            ax.set_ylabel("held-out perplexity (validation slice)")
        ax.grid(alpha=0.3, which="both")
    shared_legend(fig, axes.values())
    seeds = points["seed"].nunique()
    fig.suptitle(f"Held-out perplexity during uptraining (step 0: converted, untrained)\n"
                 f"bold: mean loss over {seeds} seed(s); thin: each seed; shaded: last quarter", fontsize=10)
    return save_figure(fig, out, dpi=130)


def write_recovery(records: Iterable[str | Path], *, csv: str | Path, md: str | Path, figure: str | Path) -> pd.DataFrame:
    """Write the recovery figure and its table (CSV + Markdown); return the table."""
    points = load_curves(list(records))
    table = recovery_table(points)
    write_atomic(csv, table.to_csv(index=False))
    shown = table.assign(
        ppl_step0=table["ppl_step0"].map("{:.1f}".format), ppl_final=table["ppl_final"].map("{:.2f}".format),
        budget=table["budget"].map("{:.2f}".format),
        loss_change_last_quarter=table["loss_change_last_quarter"].map("{:+.2%}".format),
        loss_change_last_quarter_max_seed=table["loss_change_last_quarter_max_seed"].map("{:+.2%}".format))
    text = ("# Recovery during uptraining (held-out loss of the CPT runs of `main`)\n\n"
            f"Last-quarter change: relative change of the seed-mean held-out loss from {LAST_QUARTER:.0%} of the "
            f"uptraining tokens to the end (linear between curve points); `plateaued` when under {PLATEAU:.0%} "
            "in absolute value, else `moving`. `max_seed`: the largest change of any one seed.\n\n"
            + to_markdown(shown.drop(columns=["label"])) + "\n")
    write_atomic(md, text)
    plot_recovery(points, figure)
    return table

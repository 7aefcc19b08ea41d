"""Pareto fronts: configurations no other configuration beats on both quality and cost, per family.

A configuration is a (model, method, params) with its runs averaged over seeds. Costs: the
realized KV bytes per token, and the decode latency (ms per token, per device: CPU and GPU
timings never share a front) from the lockstep benchmark job of each model
(``harness.measurement.bench``, at its longest context), never from the runs' own timings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis.collate import read_table, to_markdown
from analysis.style import facet_axes, method_label, method_style, save_figure, shared_legend
from analysis.tables import experiment_runs
from harness.atomic import write_atomic

#: Quality columns and whether lower is better.
QUALITY = {"ppl_token": True, "ppl_word": True, "ppl_longrange": True, "rouge_l": False, "zs_avg": False}
#: Cost axes: column, figure label.
COSTS = {"kv": ("kv_bytes_per_token", "realized KV cache (KiB per token)"),
         "latency": ("decode_ms_per_token", "decode latency (ms per token)")}
CONFIG_KEYS = ["family", "model", "method", "ratio", "keep", "variant", "budget_nominal"]


def pareto_mask(cost: Sequence[float], quality: Sequence[float], *, lower_quality_better: bool = True) -> np.ndarray:
    """True for points not dominated: no other point has cost <= and quality at least as good, one strictly.

    Points with a missing (NaN) coordinate are never on the front.
    """
    c = np.asarray(cost, dtype=float)
    q = np.asarray(quality, dtype=float)
    if c.shape != q.shape:
        raise ValueError(f"cost and quality differ in length: {c.shape} vs {q.shape}")
    q = q if lower_quality_better else -q
    ok = np.isfinite(c) & np.isfinite(q)
    mask = np.zeros(len(c), dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok & (c <= c[i]) & (q <= q[i]) & ((c < c[i]) | (q < q[i]))
        mask[i] = not others.any()
    return mask


def configurations(table: pd.DataFrame, quality: str, *, by_device: bool) -> pd.DataFrame:
    """Mean over seeds per configuration (and device, if ``by_device``) of quality, costs and realized budget."""
    table = table.copy()
    for k in CONFIG_KEYS + ["device"]:
        if k not in table.columns:
            table[k] = None
    agg = {c: (c, "mean") for c in (quality, "kv_bytes_per_token", "decode_ms_per_token", "budget_realized")
           if c in table.columns}
    keys = CONFIG_KEYS + (["device"] if by_device else [])
    out = table.groupby(keys, dropna=False, sort=True).agg(seeds=("run_id", "count"), **agg).reset_index()
    if not by_device:
        out["device"] = None
    return out


def bench_latency(table: pd.DataFrame, bench) -> pd.DataFrame:
    """Decode ms per token per configuration and device: the benchmark's rows at each model's longest context,
    labelled with the configuration keys of the run they timed."""
    from analysis.reports import read_bench

    rows = read_bench(bench, table)
    rows = rows[rows["context_len"] == rows.groupby("model")["context_len"].transform("max")]
    keys = table.drop_duplicates("run_id").set_index("run_id")
    out = pd.DataFrame({k: rows["run_id"].map(keys[k]) if k in keys.columns else None for k in CONFIG_KEYS})
    out["device"] = rows["device"].to_numpy()
    out["decode_ms_per_token"] = rows["decode_ms_per_token"].to_numpy()
    out["context_len"] = rows["context_len"].to_numpy()
    return out


def _with_latency(conf: pd.DataFrame, latency: pd.DataFrame) -> pd.DataFrame:
    """``conf`` (one row per configuration) crossed with the benchmark's latency of it, per device."""
    conf = conf.drop(columns=["device", "decode_ms_per_token"], errors="ignore")
    # NaN keys (no ratio, no keep) must match each other: compare the keys as text
    left, right = conf.copy(), latency.copy()
    for k in CONFIG_KEYS:
        left[f"_{k}"], right[f"_{k}"] = left[k].astype(str), right[k].astype(str)
    joined = left.merge(right.drop(columns=CONFIG_KEYS), on=[f"_{k}" for k in CONFIG_KEYS], how="inner")
    return joined.drop(columns=[f"_{k}" for k in CONFIG_KEYS])


def pareto_fronts(table: pd.DataFrame | str | Path, quality: str = "ppl_token", experiment: str = "all",
                  bench=None) -> pd.DataFrame:
    """Every configuration with ``axis`` (kv / latency), ``cost``, ``quality`` and ``on_front``, per family.

    ``experiment`` restricts the runs (e.g. the main grid, so that SFT or ablation runs do not mix in).
    Latency fronts (only with ``bench``: the benchmark JSONs) are computed per device (``device``); KV
    fronts over all devices (bytes do not depend on the device).
    """
    if quality not in QUALITY:
        raise ValueError(f"unknown quality metric {quality!r}; known: {sorted(QUALITY)}")
    table = experiment_runs(read_table(table), experiment)
    if quality not in table.columns or table[quality].notna().sum() == 0:
        raise ValueError(f"no run has a {quality!r} value: nothing to put on a Pareto front")
    parts = []
    for axis, (column, _) in COSTS.items():
        if axis == "latency" and bench is None:
            continue  # the runs' own timings are never plotted: they ran beside other jobs
        conf = configurations(table.drop(columns=["decode_ms_per_token"], errors="ignore"), quality, by_device=False)
        if axis == "latency":
            conf = _with_latency(conf, bench_latency(table, bench))
        if column not in conf.columns:
            continue
        groups = ["family"] if axis == "kv" else ["family", "device"]
        for _, part in conf.groupby(groups, dropna=False, sort=True):
            part = part.copy()
            part["axis"], part["cost"], part["quality"] = axis, part[column], part[quality]
            part["on_front"] = pareto_mask(part["cost"], part["quality"], lower_quality_better=QUALITY[quality])
            parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    out["quality_metric"] = quality
    return out


def _label(row: pd.Series) -> str:
    text = str(row["method"])
    if isinstance(row.get("ratio"), str) and row["method"] == "mixsga":
        text += f" {row['ratio']}"
    budget = row.get("budget_nominal")
    if budget is not None and not pd.isna(budget) and float(budget) < 1:
        text += f" @{100 * float(budget):g}%"
    return text


def plot_pareto(fronts: pd.DataFrame, axis: str, out: str | Path) -> Path:
    """One panel per family (rows: devices for latency): all configurations, front as a step line, front labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = fronts[(fronts["axis"] == axis) & fronts["cost"].notna() & fronts["quality"].notna()]
    if data.empty:
        raise ValueError(f"no configuration has both a {axis} cost and a quality value: no {axis} Pareto figure")
    quality = str(fronts["quality_metric"].iloc[0])
    lower = QUALITY[quality]
    families = sorted(data["family"].dropna().unique())
    devices = sorted(data["device"].dropna().unique()) if axis == "latency" else [None]
    devices = devices or [None]
    fig, axes, left = facet_axes(plt, devices, families)
    scale = 1 / 1024 if axis == "kv" else 1.0
    for device in devices:
        for family in families:
            ax = axes[(device, family)]
            part = data[data["family"] == family]
            if device is not None:
                part = part[part["device"] == device]
            for method, pts in part.groupby("method"):
                colour, marker = method_style(method)
                ax.scatter(pts["cost"] * scale, pts["quality"], color=colour, marker=marker, s=34, label=method_label(method),
                           edgecolor="black", linewidth=0.3, zorder=3)
            front = part[part["on_front"]].sort_values("cost")
            if not front.empty:
                ax.step(front["cost"] * scale, front["quality"], where="post", color="black", lw=1.2,
                        zorder=2, label="Pareto front")
                for _, row in front.iterrows():
                    ax.annotate(_label(row), (row["cost"] * scale, row["quality"]), fontsize=7,
                                xytext=(3, 3 if lower else -9), textcoords="offset points")
            title = family if device is None else f"{family}\n{device}"
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(COSTS[axis][1])
            if ax in left:
                ax.set_ylabel(f"{quality} ({'lower' if lower else 'higher'} is better)")
            ax.grid(alpha=0.3)
    shared_legend(fig, axes.values())
    what = "realized KV bytes" if axis == "kv" else "decode latency"
    fig.suptitle(f"Pareto fronts: {quality} vs {what}\n(mean over seeds per configuration; black line: front)")
    return save_figure(fig, out, dpi=130)


def _message_figure(out: str | Path, message: str) -> Path:
    """A figure holding only ``message`` (an output the workflow expects, when there is nothing to plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7, 2.5))
    fig.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=10)
    return save_figure(fig, out, dpi=130)


def write_pareto(table: pd.DataFrame | str | Path, *, csv: str | Path, md: str | Path | None = None,
                 kv_figure: str | Path | None = None, latency_figure: str | Path | None = None,
                 quality: str = "ppl_token", experiment: str = "all",
                 longrange_figure: str | Path | None = None, bench=None) -> pd.DataFrame:
    """Write the fronts (front rows only) as CSV / Markdown and the two faceted figures; return all rows.

    The latency figure needs ``bench`` (the benchmark JSONs). ``longrange_figure``: also the long-range
    perplexity against realized KV bytes (the tokens whose earlier occurrence lies far back, where
    discarding tokens costs and keeping every token at a smaller size does not), with its fronts as a
    second Markdown section.
    """
    if latency_figure is not None and bench is None:
        raise ValueError("the latency Pareto figure reads the benchmark JSONs (--bench): give them")
    fronts = pareto_fronts(table, quality, experiment, bench)
    far = None
    if longrange_figure is not None:
        try:
            far = pareto_fronts(table, "ppl_longrange", experiment, bench)
        except ValueError as err:  # no run scored a long-range token: the figure says so instead of a front
            _message_figure(longrange_figure, f"No long-range perplexity to plot: {err}.\nSet eval.longrange."
                            "min_distance well below eval.seq_len (and score enough tokens) for the task to count.")
    front = fronts[fronts["on_front"]].drop(columns=["on_front"])
    write_atomic(csv, front.to_csv(index=False))
    if md is not None:
        cols = ["axis", "family", "device", "method", "ratio", "keep", "budget_nominal", "budget_realized",
                "cost", "quality", "seeds"]
        shown = front[[c for c in cols if c in front.columns]].copy()
        shown["device"] = [d if a == "latency" else "any" for a, d in zip(shown["axis"], shown["device"])]
        text = (f"# Pareto fronts ({quality} vs cost)\n\nNon-dominated configurations (mean over seeds) per "
                "family; cost: realized KV bytes per token (axis kv) or decode ms per token on one device "
                "(axis latency: the lockstep benchmark at its longest context, first seed's checkpoints)."
                "\n\n" + to_markdown(shown.drop_duplicates()))
        if far is not None:
            rows = far[far["on_front"] & (far["axis"] == "kv")]
            text += ("\n## Long-range perplexity vs realized KV bytes\n\nThe same fronts for `ppl_longrange` "
                     "(tokens of identifiers whose previous occurrence lies at least eval.longrange.min_distance "
                     "tokens back, inside the window).\n\n"
                     + to_markdown(rows[[c for c in cols if c in rows.columns and c != "device"]].drop_duplicates()))
        write_atomic(md, text)
    if kv_figure is not None:
        plot_pareto(fronts, "kv", kv_figure)
    if latency_figure is not None:
        plot_pareto(fronts, "latency", latency_figure)
    if far is not None:
        plot_pareto(far, "kv", longrange_figure)
    return fronts


__all__ = ["pareto_mask", "bench_latency", "pareto_fronts", "plot_pareto", "write_pareto"]

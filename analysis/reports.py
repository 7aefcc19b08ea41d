"""Tables 9 / 10 from the ``harness.measurement.overheads`` JSON, and the performance table (split by device)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.collate import read_table, to_markdown
from analysis.stats import format_ci, summarise
from analysis.style import facet_axes, method_label, method_style, save_figure, shared_legend
from harness.atomic import write_atomic


def _p50(summary: Any) -> float:
    return float(summary["p50"]) if isinstance(summary, dict) and summary.get("p50") is not None else math.nan


def table9(source: dict | str | Path) -> tuple[pd.DataFrame, str]:
    """``(csv_table, markdown)``: parameters, KV bytes per token and decode tokens/s (p50) per model x method,
    the mixSGA / GQA throughput ratio per model, and the paper's Table 9 / 10 numbers beside ours."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no overheads JSON at {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
    if not data.get("rows"):
        raise ValueError("overheads JSON has no 'rows'")
    reported = data.get("paper_reported", {})
    t9, t10 = reported.get("table9", {}), reported.get("table10_decode_tokens_per_s", {})
    ratio = {c["model"]: c.get("mixsga_vs_gqa") for c in data.get("throughput", [])}
    rows = []
    for r in data["rows"]:
        model, method = r["model"], r["method"]
        rows.append({
            "model": model, "source": r.get("source"), "method": method, "params": r.get("params"),
            "kv_bytes_per_token": r.get("kv_bytes_per_token"),
            "kv_bytes_per_token_paper_index": r.get("kv_bytes_per_token_paper_index"),
            "base_kv_bytes_per_token": r.get("base_kv_bytes_per_token"),
            "decode_tokens_per_s_p50": _p50(r.get("decode_tokens_per_s")),
            "prefill_ms_p50": _p50(r.get("prefill_ms")),
            "mixsga_vs_gqa_throughput": ratio.get(model) if method == "mixsga" else None,
            "device": r.get("device"),
            "paper: params": t9.get("params", {}).get(method, {}).get(model),
            "paper: KV bytes/token": t9.get("kv_bytes_per_token", {}).get(method, {}).get(model),
            "paper: decode tokens/s": t10.get(method, {}).get(model),
        })
    out = pd.DataFrame(rows)
    shown = out.copy()
    shown["params"] = [f"{p / 1e6:.3f} M" if p is not None and not pd.isna(p) else "–" for p in out["params"]]
    text = ("# Tables 9 / 10: parameters, KV bytes per token, decode throughput (mixSGA vs GQA at "
            f"{100 * float(data.get('budget', 0.5)):g} % KV)\n\n"
            "Paper configs are counted on the meta device (no timing unless timed with random weights, source "
            "`paper config, random weights`); zoo, tiny and the profile's own checkpoints (`checkpoint:` rows, "
            "source = the checkpoint loaded) are timed on the device named in each row (p50 over repeats, "
            "interleaved). `kv_bytes_per_token`: our cache "
            "(uint8 expert index per layer); `..._paper_index`: the paper's packed 2-bit index. "
            "`mixsga_vs_gqa_throughput` < 1 means mixSGA decodes slower (the paper: 0.96-0.97). Columns headed "
            "`paper:` are the paper's own numbers.\n\n" + to_markdown(shown.fillna(value=math.nan)))
    protocol = data.get("protocol", {})
    if protocol:
        text += "\nProtocol: " + "; ".join(f"{k}: {v}" for k, v in protocol.items()) + "\n"
    return out, text


#: Performance metrics: column, header label, digits, scale.
PERF_METRICS = [
    ("prefill_ms", "prefill (ms)", 2, 1.0),
    ("decode_tps_mean", "decode (tokens/s)", 1, 1.0),
    ("peak_mem_prefill", "peak memory prefill (MiB)", 1, 1 / 2**20),
    ("peak_mem_decode", "peak memory decode (MiB)", 1, 1 / 2**20),
    ("kv_bytes_per_token", "realized KV (bytes/token)", 0, 1.0),
]
PERF_KEYS = ["device", "family", "method", "variant", "ratio", "budget_nominal"]


def perf_table(table: pd.DataFrame | str | Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """``(csv_table, {device: markdown})``: prefill ms, decode tokens/s, peak memory per phase per
    family x method x budget, mean ± 95 % CI over seeds, one Markdown table per device (never mixed)."""
    runs = read_table(table).copy()
    for k in PERF_KEYS:
        if k not in runs.columns:
            runs[k] = None
    timed = runs[runs.get("decode_tps_mean", pd.Series(dtype=float)).notna()
                 | runs.get("prefill_ms", pd.Series(dtype=float)).notna()]
    if timed.empty:
        raise ValueError("no run has a prefill or decode timing: nothing for the perf table")
    timed = timed.assign(device=timed["device"].fillna("unknown device"))
    summary = summarise(timed, PERF_KEYS, [m[0] for m in PERF_METRICS])
    summary = summary.sort_values(["device", "family", "method", "budget_nominal"], ascending=[True, True, True, False],
                                  ignore_index=True)
    texts = {}
    for device, part in summary.groupby("device", sort=True):
        shown = pd.DataFrame({
            "family": part["family"], "method": part["method"], "ratio": part["ratio"].fillna("–"),
            "budget": [f"{100 * b:g} %" if not pd.isna(b) else "–" for b in part["budget_nominal"]]})
        for col, label, digits, scale in PERF_METRICS:
            shown[label] = [format_ci(a, h, int(n), digits, scale) for a, h, n in
                            zip(part[col], part[f"{col}_ci"], part[f"{col}_n"])]
        shown["seeds"] = part["seeds"].astype(str)
        texts[str(device)] = (f"## {device}\n\nMean ± 95 % t-interval over seeds (n=1: single run); peak memory: "
                              "torch max allocated / process memory per phase as recorded.\n\n"
                              + to_markdown(shown.reset_index(drop=True)))
    return summary, texts


def write_perf(table: pd.DataFrame | str | Path, *, csv: str | Path, md: str | Path,
               figure: str | Path | None = None) -> pd.DataFrame:
    """Write the perf table (CSV, one Markdown with a section per device) and optionally a figure per device panel."""
    summary, texts = perf_table(table)
    write_atomic(csv, summary.to_csv(index=False))
    write_atomic(md, "# Performance per method x budget x family\n\n" + "\n".join(texts.values()))
    if figure is not None:
        plot_perf(summary, figure)
    return summary


def plot_perf(summary: pd.DataFrame, out: str | Path) -> Path:
    """Decode tokens/s against realized KV bytes per token: one row of panels per device, one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = summary[summary["decode_tps_mean"].notna()]
    if data.empty:
        raise ValueError("no decode timing to plot")
    devices, families = sorted(data["device"].unique()), sorted(data["family"].dropna().unique())
    fig, axes, left = facet_axes(plt, devices, families, height=3.9)
    for device in devices:
        for family in families:
            ax = axes[(device, family)]
            part = data[(data["device"] == device) & (data["family"] == family)]
            for method, pts in part.groupby("method"):
                half = pts["decode_tps_mean_ci"].fillna(0.0)
                # Throughput cannot go below zero; with two seeds the t-interval often would.
                below = [min(h, m) for h, m in zip(half, pts["decode_tps_mean"])]
                ax.errorbar(pts["kv_bytes_per_token"] / 1024, pts["decode_tps_mean"], yerr=[below, half],
                            color=method_style(method)[0], marker=method_style(method)[1], ls="none",
                            capsize=2, label=method_label(method))
            ax.set_title(f"{family}\n{device}", fontsize=9)
            ax.set_xlabel("realized KV cache (KiB per token)")
            if ax in left:
                ax.set_ylabel("decode throughput (tokens/s)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    shared_legend(fig, axes.values())
    fig.suptitle("Decode throughput vs realized KV size\n(batch 1; mean ± 95 % CI over seeds, cut at 0; one row per device)")
    return save_figure(fig, out, dpi=130)


def write_table9(source: dict | str | Path, *, csv: str | Path, md: str | Path) -> pd.DataFrame:
    """Write Tables 9 / 10 as CSV and Markdown; return the CSV table."""
    out, text = table9(source)
    write_atomic(csv, out.to_csv(index=False))
    write_atomic(md, text)
    return out

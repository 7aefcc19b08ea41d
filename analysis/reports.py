"""Tables 9 / 10 from the ``harness.measurement.overheads`` JSON, and the perf table from the benchmark JSONs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.collate import read_table, to_markdown
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


#: Benchmark JSON layout this analysis reads (harness.measurement.bench.SCHEMA).
BENCH_SCHEMA = 1
#: Labels of a benchmark row, taken from the records table by run id.
LABEL_KEYS = ["family", "model", "method", "variant", "ratio", "keep", "budget_nominal"]


def _bench_files(bench) -> list[dict]:
    items = [bench] if isinstance(bench, (str, Path, dict)) else list(bench)
    out = []
    for item in items:
        if isinstance(item, dict):
            out.append(item)
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"no benchmark JSON at {path} (rule perf_bench writes it)")
        data = json.loads(path.read_text())
        if data.get("schema") != BENCH_SCHEMA:
            raise ValueError(f"{path}: benchmark schema {data.get('schema')!r}, this analysis reads {BENCH_SCHEMA}; "
                             "delete it to rerun the benchmark")
        out.append(data)
    return out


def read_bench(bench, table: pd.DataFrame | str | Path | None = None) -> pd.DataFrame:
    """One row per model x method x context of the benchmark JSONs (harness.measurement.bench), labelled.

    With the records ``table``, each row takes its run's labels (variant, ratio, keep) and realized KV
    bytes per token by run id (the benchmark times the grid's first seed: that run's record).
    """
    rows = []
    for data in _bench_files(bench):
        for r in data["rows"]:
            ratio = {m: r[f"{m}_ratio"] for m in ("decode_tokens_per_s", "prefill_ms", "peak_memory_bytes")}
            rows.append({
                "run_id": r["run_id"], "model": data["model"], "family": data["family"], "device": data["device"],
                "method": r["method"], "budget_nominal": r["budget_nominal"], "context_len": r["context_len"],
                "new_tokens": r["new_tokens"], "rounds": r["decode_tokens_per_s"]["n"],
                "decode_tps": r["decode_tokens_per_s"]["p50"], "decode_tps_cv": r["decode_tokens_per_s"]["cv"],
                "decode_ms_per_token": r["decode_ms_per_token"],
                "prefill_ms": r["prefill_ms"]["p50"], "prefill_ms_cv": r["prefill_ms"]["cv"],
                "peak_memory_bytes": r["peak_memory_bytes"]["p50"], "memory_source": r["memory_source"],
                "kv_live_bytes": r["kv_live_bytes"],
                "decode_ratio": ratio["decode_tokens_per_s"]["median"], "decode_ratio_cv": ratio["decode_tokens_per_s"]["cv"],
                "prefill_ratio": ratio["prefill_ms"]["median"], "prefill_ratio_cv": ratio["prefill_ms"]["cv"],
                "memory_ratio": ratio["peak_memory_bytes"]["median"], "memory_ratio_cv": ratio["peak_memory_bytes"]["cv"],
                # relative standard error of the mean ratio (older JSONs: from cv and n)
                "decode_ratio_se": _se_rel(ratio["decode_tokens_per_s"]), "prefill_ratio_se": _se_rel(ratio["prefill_ms"]),
            })
    out = pd.DataFrame(rows)
    if out.empty:
        raise ValueError("the benchmark JSONs hold no rows: nothing for the perf table")
    if table is not None:
        runs = read_table(table)
        labels = runs.drop_duplicates("run_id").set_index("run_id")
        # a null run id: the untrained base model, timed as the reference of a grid without a base run
        missing = sorted(set(out["run_id"].dropna()) - set(labels.index))
        if missing:
            raise ValueError(f"benchmark rows of runs without a record in the table: {missing[:5]}")
        for key in ["variant", "ratio", "keep", "kv_bytes_per_token"]:
            out[key] = out["run_id"].map(labels[key]) if key in labels.columns else None
    for key in LABEL_KEYS + ["kv_bytes_per_token"]:
        if key not in out.columns:
            out[key] = None
    return out.sort_values(["device", "family", "context_len", "method", "budget_nominal"],
                           ascending=[True, True, True, True, False], ignore_index=True)


def _se_rel(ratio: dict) -> float:
    return ratio["se_rel"] if "se_rel" in ratio else ratio["cv"] / math.sqrt(max(1, ratio["n"]))


def _pct(value: float) -> str:
    return "–" if pd.isna(value) else f"{100 * value:.1f} %"


def perf_table(table: pd.DataFrame | str | Path, bench) -> tuple[pd.DataFrame, dict[str, str]]:
    """``(csv_table, {device: markdown})`` from the benchmark: per family x context x method, decode tokens/s,
    prefill ms and peak memory with their ratios to the base model and each one's coefficient of variation."""
    rows = read_bench(bench, table)
    texts = {}
    for device, part in rows.groupby("device", sort=True):
        shown = pd.DataFrame({
            "family": part["family"], "context": part["context_len"].astype(int), "method": part["method"],
            # two runs of one method at one budget (e.g. mixSGA with a straight-through router) differ here
            "variant": part["variant"].fillna("–"),
            "ratio": part["ratio"].fillna("–"),
            "budget": [f"{100 * b:g} %" if not pd.isna(b) else "–" for b in part["budget_nominal"]],
            "decode (tokens/s)": [f"{v:.1f}" for v in part["decode_tps"]],
            "decode × base": [f"{v:.3f}" for v in part["decode_ratio"]],
            "decode CV": [_pct(v) for v in part["decode_ratio_cv"]],
            "decode SE": [_pct(v) for v in part["decode_ratio_se"]],
            "prefill (ms)": [f"{v:.2f}" for v in part["prefill_ms"]],
            "prefill × base": [f"{v:.3f}" for v in part["prefill_ratio"]],
            "prefill CV": [_pct(v) for v in part["prefill_ratio_cv"]],
            "prefill SE": [_pct(v) for v in part["prefill_ratio_se"]],
            "peak memory (MiB)": [f"{v / 2**20:.2f}" for v in part["peak_memory_bytes"]],
            "memory × base": [f"{v:.3f}" for v in part["memory_ratio"]],
        })
        worst = float(part[["decode_ratio_cv", "prefill_ratio_cv"]].max().max())
        worst_se = float(part["decode_ratio_se"].max())
        source = ", ".join(sorted(set(part["memory_source"])))
        texts[str(device)] = (
            f"## {device}\n\nOne benchmark job per model, alone among the workflow's jobs: every method timed in lockstep "
            f"with a base generation (decode steps in alternation), {int(part['new_tokens'].max())} new tokens a "
            "generation; values are medians over rounds, `× base` the median ratio to the base sample of the same "
            "pair, CV the per-pair ratio's coefficient of variation (largest here: "
            f"{100 * worst:.1f} %), SE the relative standard error of the mean ratio, CV / √rounds (largest decode SE "
            f"here: {100 * worst_se:.1f} %). Peak memory: {source}.\n\n"
            + to_markdown(shown.reset_index(drop=True)))
    return rows, texts


def write_perf(table: pd.DataFrame | str | Path, bench, *, csv: str | Path, md: str | Path,
               figure: str | Path | None = None) -> pd.DataFrame:
    """Write the perf table (CSV, one Markdown with a section per device) and optionally its figure."""
    rows, texts = perf_table(table, bench)
    write_atomic(csv, rows.to_csv(index=False))
    write_atomic(md, "# Costs per method, from the lockstep benchmark\n\n" + "\n".join(texts.values()))
    if figure is not None:
        plot_perf(rows, figure)
    return rows


def plot_perf(rows: pd.DataFrame, out: str | Path) -> Path:
    """Decode throughput relative to the base model against realized KV bytes per token: one row of panels
    per device x context, one panel per family; error bars 1.96 relative standard errors of the mean ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows[rows["decode_ratio"].notna()].copy()
    if data.empty:
        raise ValueError("no decode timing to plot")
    # rows by each family's i-th context, so a model whose window is cut to fit its positions (OPT tiny:
    # 992 of 1,024) shares the row of the others' windows instead of getting a row of empty panels
    rank = data.groupby(["device", "family"])["context_len"].rank(method="dense").astype(int)
    data["panel_row"] = [f"{d}, context {r}" for d, r in zip(data["device"], rank)]
    panel_rows, families = sorted(data["panel_row"].unique()), sorted(data["family"].dropna().unique())
    fig, axes, left = facet_axes(plt, panel_rows, families, height=3.9)
    for panel in panel_rows:
        for family in families:
            ax = axes[(panel, family)]
            part = data[(data["panel_row"] == panel) & (data["family"] == family)]
            kib = pd.to_numeric(part["kv_bytes_per_token"], errors="coerce").fillna(
                part["kv_live_bytes"] / (part["context_len"] + part["new_tokens"] - 1)) / 1024
            for method in sorted(part["method"].unique()):
                pick = (part["method"] == method).to_numpy()
                pts = part[pick]
                ax.errorbar(kib[pick], pts["decode_ratio"], yerr=1.96 * pts["decode_ratio"] * pts["decode_ratio_se"],
                            color=method_style(method)[0], marker=method_style(method)[1], ls="none",
                            capsize=2, label=method_label(method))
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            contexts = ", ".join(str(int(c)) for c in sorted(part["context_len"].unique()))
            ax.set_title(f"{family}\n{panel.rsplit(', context', 1)[0]}, context {contexts}", fontsize=9)
            ax.set_xlabel("realized KV cache (KiB per token)")
            if ax in left:
                ax.set_ylabel("decode tokens/s × base")
            ax.grid(alpha=0.3)
    shared_legend(fig, axes.values())
    fig.suptitle("Decode throughput relative to the base model vs realized KV size\n"
                 "(one benchmark job per model, each method in lockstep with the base; median ratio ± 1.96 SE)")
    return save_figure(fig, out, dpi=130)


def write_table9(source: dict | str | Path, *, csv: str | Path, md: str | Path) -> pd.DataFrame:
    """Write Tables 9 / 10 as CSV and Markdown; return the CSV table."""
    out, text = table9(source)
    write_atomic(csv, out.to_csv(index=False))
    write_atomic(md, text)
    return out

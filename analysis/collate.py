"""Records -> one tidy pandas table (a row per run) and per-model summary tables.

Only the JSON records are read (validated by harness.records); nothing is recomputed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from harness.records import read_record

#: Grouping keys of the summary tables: one row per model x method x nominal budget.
SUMMARY_KEYS = ["model", "family", "method", "budget_nominal"]


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """One tidy row of a record: identity, budget, quality, performance, flags, provenance essentials."""
    ident, budget, quality, perf = record["identity"], record["budget"], record["quality"], record["performance"]
    prov, flags = record["provenance"], record["flags"]
    decode = perf["decode_tokens_per_s"] or {}
    cfg = ident["config"]
    return {
        "run_id": ident["run_id"],
        "profile": cfg.get("profile"),
        "model": ident["model"],
        "family": ident["family"],
        "method": ident["method"],
        "seed": ident["seed"],
        "budget_nominal": budget["nominal"],
        "budget_realized": budget["realized"],
        "analytic_bytes_per_token": budget["analytic_bytes_per_token"],
        "base_bytes_per_token": budget["base_bytes_per_token"],
        "measured_bytes": budget["measured_bytes"],
        "base_measured_bytes": budget["base_measured_bytes"],
        "measured_tokens": budget["measured_tokens"],
        "dtype": budget["dtype"],
        "ppl_token": quality["ppl_token"],
        "ppl_word": quality["ppl_word"],
        "ppl_unigram": quality["ppl_unigram"],
        "eval_set": quality["eval_set"],
        "eval_tokens": quality["eval_tokens"],
        "rouge_l": quality["rouge_l"],
        "rouge_impl": quality["rouge_impl"],
        "gen_len": quality["gen_len"],
        "prefill_ms": perf["prefill_ms"],
        "decode_tps_mean": decode.get("mean"),
        "decode_tps_p50": decode.get("p50"),
        "decode_tps_p90": decode.get("p90"),
        "decode_tps_std": decode.get("std"),
        "peak_mem_prefill_bytes": perf["peak_memory_bytes"]["prefill"],
        "peak_mem_decode_bytes": perf["peak_memory_bytes"]["decode"],
        "simulated": flags["simulated"],
        "query_aware": flags["query_aware"],
        "device_type": prov["device"]["type"],
        "device_name": prov["device"]["name"],
        "git_commit": prov["git"]["commit"],
        "git_dirty": prov["git"]["dirty"],
        "torch": prov["packages"].get("torch"),
        "transformers": prov["packages"].get("transformers"),
        "wall_time_s": record["wall_time_s"],
    }


def load_records(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Validate and flatten the records at ``paths`` into one DataFrame sorted by run id.

    ValueError if no path is given, a file is not a valid record, or two files share a run id.
    """
    rows = [flatten(read_record(p)) for p in paths]
    if not rows:
        raise ValueError("no records to collate")
    table = pd.DataFrame(rows)
    dupes = table["run_id"][table["run_id"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"duplicate run ids among the records: {sorted(set(dupes))}")
    return table.sort_values("run_id", ignore_index=True)


def perplexity_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Held-out perplexity per model x method x budget: mean and std over seeds, unigram floor."""
    grouped = table.groupby(SUMMARY_KEYS, sort=True, dropna=False)
    summary = grouped.agg(
        seeds=("seed", "nunique"),
        budget_realized=("budget_realized", "mean"),
        ppl_token=("ppl_token", "mean"),
        ppl_token_std=("ppl_token", "std"),
        ppl_word=("ppl_word", "mean"),
        ppl_unigram=("ppl_unigram", "mean"),
        eval_tokens=("eval_tokens", "first"),
    ).reset_index()
    summary["ppl_token_std"] = summary["ppl_token_std"].fillna(0.0)
    summary["ratio_to_unigram"] = summary["ppl_token"] / summary["ppl_unigram"]
    return summary


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(table: pd.DataFrame, digits: int = 2) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned, missing values as '–')."""
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    align = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(table[c]) else "---" for c in table.columns) + "|"
    body = ["| " + " | ".join(_cell(v, digits) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, align, *body]) + "\n"


def collate(
    record_paths: Iterable[str | Path],
    *,
    all_csv: str | Path,
    perplexity_csv: str | Path,
    perplexity_md: str | Path,
) -> pd.DataFrame:
    """Write the tidy table and the perplexity summary (CSV and Markdown); return the tidy table."""
    table = load_records(record_paths)
    summary = perplexity_summary(table)
    for path in (all_csv, perplexity_csv, perplexity_md):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(all_csv, index=False)
    summary.to_csv(perplexity_csv, index=False)
    title = "# Held-out perplexity per model\n\n"
    note = (
        "\nppl_token: perplexity per token on the eval split (mean over seeds, std beside it); "
        "ppl_word: per whitespace word; ppl_unigram: the tokenizer's unigram floor; "
        "ratio_to_unigram: ppl_token / ppl_unigram (a trained model is far below 1).\n"
    )
    Path(perplexity_md).write_text(title + to_markdown(summary) + note, encoding="utf-8")
    return table

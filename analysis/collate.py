"""Records -> one tidy pandas table (a row per run), tolerant of fields a record does not carry.

Only the JSON records are read (validated by ``harness.orchestration.records.read_record``); nothing is
recomputed. ``flatten`` looks every value up by path, so a field that is missing or null in a
record (an older schema, a run that did not measure it) becomes NaN / empty, never an error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from harness.atomic import write_atomic
from harness.orchestration.records import read_record

#: Grouping keys of the perplexity summary: one row per model x method x nominal budget.
SUMMARY_KEYS = ["model", "family", "method", "variant", "budget_nominal"]

#: Sizes of the paper's three experts; a ratio over these sizes is written x:y:z (Table 5's "3:4:0").
PAPER_GROUP_SIZES = (1, 2, 4)

_MISSING = object()


def get(record: Mapping[str, Any], *paths: str, default: Any = None) -> Any:
    """The first non-null value among dotted ``paths`` (``"budget.params.ratios"``), else ``default``."""
    for path in paths:
        cur: Any = record
        for key in path.split("."):
            if not isinstance(cur, Mapping) or key not in cur:
                cur = _MISSING
                break
            cur = cur[key]
        if cur is not _MISSING and cur is not None:
            return cur
    return default


def _num(value: Any) -> float:
    """A float, the ``mean`` of a summary dict, or NaN."""
    if isinstance(value, Mapping):
        value = value.get("mean")
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def ratio_label(ratios: Any, group_sizes: Any = None) -> str | None:
    """``"3:1:6"`` for ratios over group sizes (1, 2, 4); experts the run lacks show 0 (``"3:4:0"``).

    Other group sizes are spelled out: ``"1:3 (g1,8)"``.
    """
    if not isinstance(ratios, (list, tuple)) or not ratios:
        return None
    sizes = [int(g) for g in (group_sizes or PAPER_GROUP_SIZES[: len(ratios)])]
    fmt = [f"{float(r):g}" for r in ratios]
    if len(sizes) == len(ratios) and len(set(sizes)) == len(sizes) and set(sizes) <= set(PAPER_GROUP_SIZES):
        by_size = dict(zip(sizes, fmt))
        return ":".join(by_size.get(g, "0") for g in PAPER_GROUP_SIZES)
    return ":".join(fmt) + f" (g{','.join(map(str, sizes))})"


def _params(record: Mapping[str, Any]) -> dict:
    params = get(record, "identity.params", "budget.params", "identity.config.params", default={})
    return dict(params) if isinstance(params, Mapping) else {}


def method_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's structured method fields; asked of the method's spec for records made without them."""
    fields = get(record, "identity.method_fields")
    if isinstance(fields, Mapping):
        return dict(fields)
    from harness.methods import get_spec

    try:
        return get_spec(str(get(record, "identity.method", default="?"))).fields(_params(record))
    except (ValueError, KeyError, TypeError):
        return {}


def method_columns(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Readable method knobs from structured fields: mixSGA ratio label, eviction keep, router variant."""
    arch = fields.get("architecture")
    arch_params = fields.get("architecture_params") or {}
    ratio = ratio_label(arch_params.get("ratios"), arch_params.get("group_sizes"))
    if ratio is None and arch == "gqa":
        ratio = "0:1:0"  # the paper's spelling of the GQA baseline
    group_sizes = arch_params.get("group_sizes")
    return {
        "arch": arch,
        "eviction": fields.get("eviction"),
        "ratio": ratio,
        "group_sizes": None if group_sizes is None else ",".join(str(int(g)) for g in group_sizes),
        "keep": _num(fields.get("keep")),
        "router": arch_params.get("router"),
        "aux_loss": arch_params.get("aux_loss"),
        "aux_loss_weight": _num(arch_params.get("aux_loss_weight")),
        "variant": fields.get("variant"),
        # the architecture's params verbatim: what makes a stacked run's un-evicted inner model the same model
        "arch_params": json.dumps(arch_params, sort_keys=True) if arch else None,
    }


def _scalar_items(prefix: str, value: Any) -> dict[str, Any]:
    """Flatten nested dicts / lists of numbers into ``prefix_key`` columns (lists: 1-based positions)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_scalar_items(f"{prefix}_{k}", v))
        return out
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return {f"{prefix}_{i + 1}": float(v) for i, v in enumerate(value)}
        return {prefix: json.dumps(value)}
    return {prefix: value}


def _zeroshot(value: Any) -> dict[str, float]:
    """``zs_{task}`` accuracy columns (a task's dict gives its ``acc``), and their mean ``zs_avg``.

    ``zs_avg`` averages the tasks' accuracies only: a ``{task}_norm`` (length-normalised) column is
    shown but is a second score of the same task, not another task.
    """
    if not isinstance(value, Mapping) or not value:
        return {}
    out = {}
    for task, acc in sorted(value.items()):
        if isinstance(acc, Mapping):
            acc = acc.get("acc", acc.get("accuracy"))
        out[f"zs_{task}"] = _num(acc)
    scores = [v for k, v in out.items() if not k.endswith("_norm")]
    out["zs_avg"] = math.fsum(scores) / len(scores) if scores and all(math.isfinite(s) for s in scores) else math.nan
    return out


def _rouge_by_set(value: Any) -> dict[str, Any]:
    """``rouge_l_{set}`` per instruction set, their unweighted mean ``rouge_l_avg`` and ``instruct_sets``."""
    if not isinstance(value, Mapping) or not value:
        return {}
    out: dict[str, Any] = {f"rouge_l_{name}": _num(got.get("rouge_l")) for name, got in value.items()
                           if isinstance(got, Mapping)}
    scores = list(out.values())
    out["rouge_l_avg"] = math.fsum(scores) / len(scores) if scores and all(map(math.isfinite, scores)) else math.nan
    out["instruct_sets"] = ";".join(value)
    out["instruct_rows"] = ";".join(f"{name}={got.get('rows')}" for name, got in value.items()
                                    if isinstance(got, Mapping))
    return out


def _windows(value: Any, prefix: str = "ppl") -> dict[str, Any]:
    """``{prefix}_window_nll`` / ``{prefix}_window_tokens``: the per-window lists as JSON text (the paired
    bootstrap's input); ``prefix`` ``ppl`` = every scored token, ``longrange`` = the long-range task's."""
    if not isinstance(value, Mapping):
        return {f"{prefix}_window_nll": None, f"{prefix}_window_tokens": None}
    return {f"{prefix}_window_nll": json.dumps([float(v) for v in value.get("nll", [])]),
            f"{prefix}_window_tokens": json.dumps([int(v) for v in value.get("tokens", [])])}


def _experiments(record: Mapping[str, Any]) -> str:
    names = get(record, "identity.experiments", "identity.config.experiments", default=[])
    if isinstance(names, str):
        names = [names]
    return ";".join(sorted(str(n) for n in names))


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One tidy row of a record: identity, method knobs, budget, quality, performance, device, provenance.

    The realized KV bytes per token are the measured live-cache bytes over the tokens measured
    (falling back to realized budget x base bytes, then to the analytic bytes).
    """
    method = str(get(record, "identity.method", default="?"))
    params = _params(record)
    measured, tokens = _num(get(record, "budget.measured_bytes")), _num(get(record, "budget.measured_tokens"))
    base_bpt = _num(get(record, "budget.base_bytes_per_token"))
    realized = _num(get(record, "budget.realized"))
    if not math.isfinite(realized):
        base_measured = _num(get(record, "budget.base_measured_bytes"))
        realized = measured / base_measured if base_measured > 0 else math.nan
    if tokens > 0 and math.isfinite(measured):
        kv_bpt = measured / tokens
    elif math.isfinite(realized) and math.isfinite(base_bpt):
        kv_bpt = realized * base_bpt
    else:
        kv_bpt = _num(get(record, "budget.analytic_bytes_per_token"))
    decode = get(record, "performance.decode_tokens_per_s", default={})
    decode = decode if isinstance(decode, Mapping) else {"mean": decode}
    training = get(record, "identity.training", "identity.config.training")
    by_context = get(record, "performance.by_context", default=[])
    row: dict[str, Any] = {
        "run_id": get(record, "identity.run_id"),
        "experiments": _experiments(record),
        "profile": get(record, "identity.config.profile", "identity.profile"),
        "model": get(record, "identity.model"),
        "family": get(record, "identity.family"),
        "method": method,
        **method_columns(method_fields(record)),
        "params": json.dumps(params, sort_keys=True) if params else None,
        "training": (training.get("kind") or training.get("stage") or training.get("name") or json.dumps(training))
        if isinstance(training, Mapping) else training,
        "seed": get(record, "identity.seed"),
        "budget_nominal": _num(get(record, "budget.nominal")),
        "budget_realized": realized,
        "kv_bytes_per_token": kv_bpt,
        "analytic_bytes_per_token": _num(get(record, "budget.analytic_bytes_per_token")),
        "base_bytes_per_token": base_bpt,
        "measured_bytes": measured,
        "base_measured_bytes": _num(get(record, "budget.base_measured_bytes")),
        "measured_tokens": tokens,
        "dtype": get(record, "budget.dtype"),
        "ppl_token": _num(get(record, "quality.ppl_token")),
        "ppl_word": _num(get(record, "quality.ppl_word")),
        "ppl_unigram": _num(get(record, "quality.ppl_unigram")),
        "eval_set": get(record, "quality.eval_set"),
        "eval_tokens": _num(get(record, "quality.eval_tokens")),
        "rouge_l": _num(get(record, "quality.rouge_l")),
        "rouge_impl": get(record, "quality.rouge_impl"),
        "gen_length": _num(get(record, "quality.gen_length", "quality.gen_len")),
        **_rouge_by_set(get(record, "quality.rouge_by_set")),
        **_zeroshot(get(record, "quality.zeroshot")),
        "ppl_protocol": get(record, "quality.ppl_protocol"),
        **_windows(get(record, "quality.ppl_windows")),
        "ppl_longrange": _num(get(record, "quality.ppl_longrange")),
        "longrange_tokens": _num(get(record, "quality.longrange_tokens")),
        "longrange_min_distance": _num(get(record, "quality.longrange_min_distance")),
        **_windows(get(record, "quality.longrange_windows"), "longrange"),
        "context_len": _num(get(record, "performance.context_len")),
        "prefill_ms": _num(get(record, "performance.prefill_ms")),
        "prefill_ms_p50": _num(get(record, "performance.prefill_ms.p50")),
        "decode_tps_mean": _num(decode.get("mean")),
        "decode_tps_p50": _num(decode.get("p50")),
        "decode_tps_p90": _num(decode.get("p90")),
        "decode_tps_std": _num(decode.get("std")),
        **_scalar_items("peak_mem", get(record, "performance.peak_memory_bytes", default={})),
        **_scalar_items("decode_frac", get(record, "budget.decode_expert_fractions", default=[])),
        **_scalar_items("prefill_frac", get(record, "budget.prefill_expert_fractions", default=[])),
        **_scalar_items("train", get(record, "identity.training_summary", default={})),
        "simulated": get(record, "flags.simulated"),
        "query_aware": get(record, "flags.query_aware"),
        "device_type": get(record, "provenance.device.type"),
        "device_name": get(record, "provenance.device.name"),
        "device": get(record, "performance.device"),
        "by_context": json.dumps(by_context) if by_context else None,
        "git_commit": get(record, "provenance.git.commit"),
        "git_dirty": get(record, "provenance.git.dirty"),
        "torch": get(record, "provenance.packages.torch"),
        "transformers": get(record, "provenance.packages.transformers"),
        "wall_time_s": _num(get(record, "wall_time_s")),
    }
    if not row["device"] and row["device_type"]:
        row["device"] = f"{row['device_type']}: {row['device_name']}"  # never mix CPU and GPU timings
    tps = row["decode_tps_mean"]
    row["decode_ms_per_token"] = 1000.0 / tps if tps > 0 else math.nan
    return row


def records_table(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Flatten records (already validated) into one DataFrame sorted by run id; ValueError on duplicates."""
    rows = [flatten(r) for r in records]
    if not rows:
        raise ValueError("no records to collate")
    table = pd.DataFrame(rows)
    dupes = table["run_id"][table["run_id"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"duplicate run ids among the records: {sorted(set(dupes))}")
    return table.sort_values("run_id", ignore_index=True)


def load_records(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Validate (``harness.orchestration.records.read_record``) and flatten the records at ``paths``.

    ValueError if no path is given, a file is not a valid record, or two files share a run id.
    """
    return records_table(read_record(p) for p in paths)


def record_paths(items: Iterable[str | Path]) -> list[Path]:
    """Record files named directly or found (``*.json``) in the named directories."""
    out: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            out.extend(sorted(item.glob("*.json")))
        elif item.is_file():
            out.append(item)
        else:
            raise FileNotFoundError(f"no record file or directory at {item}")
    return out


def read_table(table: pd.DataFrame | str | Path) -> pd.DataFrame:
    """The tidy table itself, or read from the CSV that ``collate`` wrote."""
    if isinstance(table, pd.DataFrame):
        return table
    path = Path(table)
    if not path.is_file():
        raise FileNotFoundError(f"no tidy table at {path} (run 'python -m analysis collate' first)")
    try:
        frame = pd.read_csv(path, dtype={"experiments": str, "ratio": str, "group_sizes": str})
    except pd.errors.EmptyDataError:
        raise ValueError(f"tidy table {path} is empty (no header, no rows); rerun 'python -m analysis collate'") from None
    if frame.empty:
        raise ValueError(f"tidy table {path} has no rows (columns only); it holds no run to analyse")
    return frame


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
    record_paths_: Iterable[str | Path],
    *,
    all_csv: str | Path,
    perplexity_csv: str | Path | None = None,
    perplexity_md: str | Path | None = None,
) -> pd.DataFrame:
    """Write the tidy table (and, if asked, the perplexity summary as CSV and Markdown); return the tidy table."""
    table = load_records(record_paths(record_paths_))
    write_atomic(all_csv, table.to_csv(index=False))
    if perplexity_csv is not None or perplexity_md is not None:
        summary = perplexity_summary(table)
        if perplexity_csv is not None:
            write_atomic(perplexity_csv, summary.to_csv(index=False))
        if perplexity_md is not None:
            note = (
                "\nppl_token: perplexity per token on the eval split (mean over seeds, std beside it); "
                "ppl_word: per whitespace word; ppl_unigram: the tokenizer's unigram floor; "
                "ratio_to_unigram: ppl_token / ppl_unigram (a trained model is far below 1).\n"
            )
            write_atomic(perplexity_md, "# Held-out perplexity per model\n\n" + to_markdown(summary) + note)
    return table

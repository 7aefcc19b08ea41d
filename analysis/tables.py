"""Per-experiment tables laid out like the paper's: rows = method / ratio / variant, columns = metrics.

Every metric cell is the mean over seeds ± the half width of its 95 % Student-t interval
(``analysis.stats``); a single seed shows the value and "(n=1)". Where an experiment maps onto
a paper table, the paper's numbers follow in a separate block of columns headed ``paper:``,
and the change against the reference row (GQA, or the paper's best ratio) is shown for ours
and for the paper, so agreement in *direction* is visible even though scales differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from analysis import paper
from analysis.collate import read_table, to_markdown
from analysis.stats import (BOOTSTRAP_RESAMPLES, SIGNIFICANT, Delta, bootstrap_ppl_difference, format_ci, format_delta,
                            paired_difference, summarise)
from harness.atomic import write_atomic


@dataclass(frozen=True)
class Metric:
    """One metric column: tidy-table column, header label (with unit), digits, display scale."""

    column: str
    label: str
    digits: int = 2
    scale: float = 1.0


@dataclass(frozen=True)
class Layout:
    """How one experiment's table is laid out (see ``LAYOUTS``)."""

    title: str
    keys: tuple[str, ...]
    metrics: tuple[Metric, ...]
    #: row key values -> {paper column label: value}; None where the paper has no counterpart
    paper: Callable[[dict], dict[str, float]] | None = None
    #: (key column, value) of the reference row within each context, the metric compared, and the paper column
    reference: tuple[str, Any] | None = None
    context: tuple[str, ...] = ()
    primary: str | None = None
    paper_primary: str | None = None
    zeroshot: bool = False
    note: str = ""
    fill: dict = field(default_factory=dict)
    #: further metrics with their own paired-difference column (``{metric}_delta*`` in the CSV)
    also_paired: tuple[Metric, ...] = ()


ROUGE = Metric("rouge_l", "ROUGE-L (x100)")
GEN = Metric("gen_length", "gen. length (tokens)", 1)
PPL = Metric("ppl_token", "perplexity (per token)")
LONGRANGE = Metric("ppl_longrange", "long-range ppl")
LONGRANGE_N = Metric("longrange_tokens", "long-range tokens", 0)
REALIZED = Metric("budget_realized", "realized KV budget (%)", 1, 100.0)
BYTES = Metric("kv_bytes_per_token", "realized KV (bytes/token)", 0)
DECODE = Metric("decode_tps_mean", "decode (tokens/s)", 1)
FRACS = tuple(Metric(f"decode_frac_{e}", f"decode fraction expert {e}", 3) for e in (1, 2, 3))


def _paper_sft(by_model: dict) -> Callable[[dict], dict]:
    """Paper ROUGE-L looked up by (paper model of the row's family, ratio) (Table 1)."""
    def lookup(row: dict) -> dict[str, float]:
        got = by_model.get((paper.PAPER_MODEL.get(row.get("family")), row.get("ratio")))
        return {} if got is None else {"paper: Dolly ROUGE-L": got[0], "paper: avg ROUGE-L": got[1]}
    return lookup


def _paper_ratio(by_ratio: dict) -> Callable[[dict], dict]:
    """Paper ROUGE-L looked up by ratio (ablations on one paper model, Tables 4 / 5 / 11)."""
    def lookup(row: dict) -> dict[str, float]:
        got = by_ratio.get(row.get("ratio"))
        return {} if got is None else {"paper: Dolly ROUGE-L": got[0], "paper: avg ROUGE-L": got[1]}
    return lookup


def _paper_table2(row: dict) -> dict[str, float]:
    got = paper.TABLE2.get(row.get("arch")) if row.get("family") == "tinyllama" else None
    return {} if got is None else {"paper: avg acc. (%)": got[0], "paper: WikiText-2 ppl": got[1]}


def _paper_table3(row: dict) -> dict[str, float]:
    keep, arch = row.get("keep"), row.get("arch")
    got = paper.TABLE2.get(arch) if keep == 1.0 else paper.TABLE3.get((round(float(keep), 2), arch))
    return {} if got is None else {"paper: avg acc. (%)": got[0], "paper: WikiText-2 ppl": got[1]}


def _paper_table6(row: dict) -> dict[str, float]:
    got = paper.TABLE6.get(row.get("variant"))
    if got is None:
        return {}
    out = {"paper: Dolly ROUGE-L": got[0], "paper: avg ROUGE-L": got[1]}
    if row.get("variant") == "no aux loss":
        out.update({f"paper: decode fraction expert {e + 1}": f
                    for e, f in enumerate(paper.TABLE6_NO_AUX_DECODE_FRACTIONS)})
    return out


_SFT_NOTE = "Paper: Dolly-15k SFT, ROUGE-L x100 on Dolly (DL) and the average over DL/SI/VC/SN/UN."
#: The paper's short names of the instruction sets (the offline set keeps its name).
SET_LABELS = {"dolly": "DL", "self_instruct": "SI", "vicuna": "VC", "sni": "SN", "unnatural": "UN"}

#: Experiment name (as in the records' ``experiments``) -> layout.
LAYOUTS: dict[str, Layout] = {
    "table1_sft": Layout(
        "Table 1: SFT at 50 % KV, GQA (0:1:0) vs mixSGA", ("family", "arch", "ratio"), (ROUGE, GEN, REALIZED),
        paper=_paper_sft(paper.TABLE1), reference=("arch", "gqa"), context=("family",), primary="rouge_l",
        paper_primary="paper: avg ROUGE-L",
        note=_SFT_NOTE + " Paper model per family: " + ", ".join(f"{k} -> {v}" for k, v in paper.PAPER_MODEL.items()
                                                                  if k != "tinyllama") + "."),
    "table2_cpt": Layout(
        "Table 2: continued pretraining at 50 % KV", ("family", "arch"), (PPL, REALIZED), paper=_paper_table2,
        reference=("arch", "gqa"), context=("family",), primary="ppl_token", paper_primary="paper: WikiText-2 ppl",
        zeroshot=True,
        note="Every run is continued-pretrained on identical tokens. Paper: TinyLlama-1.1B on MiniPile, lm-eval "
             "zero-shot HS/PI/WG/ARC-E/ARC-C average and WikiText-2 perplexity."),
    "table3_eviction_stack": Layout(
        "Table 3: H2O keep ratio on top of GQA / mixSGA at 50 % KV", ("family", "keep", "arch"),
        (PPL, REALIZED, BYTES), paper=_paper_table3, reference=("arch", "gqa"), context=("family", "keep"),
        primary="ppl_token", paper_primary="paper: WikiText-2 ppl", zeroshot=True, fill={"keep": 1.0},
        note="Perplexity through the bounded cache (token by token, the evicting cache live); keep 100 % = no eviction "
             "(paper column from Table 2). Paper: labelled Gemma2-2b, numbers match the TinyLlama CPT models."),
    "table4_middle_ratio": Layout(
        "Table 4: middle-expert ratio (mixSGA, 50 % KV)", ("family", "ratio"), (ROUGE, GEN, REALIZED),
        paper=_paper_ratio(paper.TABLE4), reference=("ratio", "1:1:2"),
        context=("family",), primary="rouge_l", paper_primary="paper: avg ROUGE-L",
        note=_SFT_NOTE + " Paper: Llama3.2-1B."),
    "table5_expert_count": Layout(
        "Table 5: number of experts (two-expert variants drop the 3rd expert)", ("family", "ratio", "group_sizes"),
        (ROUGE, GEN, REALIZED), paper=_paper_ratio(paper.TABLE5),
        reference=("ratio", "3:1:6"), context=("family",), primary="rouge_l", paper_primary="paper: avg ROUGE-L",
        note=_SFT_NOTE + " Paper: Llama3.2-1B, said to be 50 % KV; with group sizes (1, 2) 3:4:0 and 1:2:0 store "
                         "71 % and 67 % (see the realized budget column)."),
    "table6_router": Layout(
        "Table 6: learned router vs random router vs no auxiliary loss (mixSGA 3:1:6)", ("family", "variant"),
        (ROUGE, GEN, REALIZED, *FRACS), paper=_paper_table6, reference=("variant", "learned router"),
        context=("family",), primary="rouge_l", paper_primary="paper: avg ROUGE-L",
        note=_SFT_NOTE + " Paper: Gemma2-2B. Decode fractions: share of decoded tokens routed to each expert "
                         "(group sizes 1, 2, 4); the prefill ratio is 0.3 : 0.1 : 0.6."),
    "table11_ratio_grid": Layout(
        "Table 11: ratio grid at 50 % KV (mixSGA)", ("family", "ratio"), (ROUGE, GEN, REALIZED),
        paper=_paper_ratio(paper.TABLE11), reference=("ratio", "3:1:6"),
        context=("family",), primary="rouge_l", paper_primary="paper: avg ROUGE-L",
        note=_SFT_NOTE + " Paper: Gemma2-2B."),
    "figure3_budget_sweep": Layout(
        "Figure 3 data: perplexity vs KV budget", ("family", "arch", "ratio", "budget_nominal"),
        (PPL, REALIZED, BYTES),
        note="Perplexity per token on the held-out split after continued pretraining; the paper gives no numbers "
             "for Figure 3 beyond its 50 % points (Table 2)."),
}

#: Layout of any experiment without its own (the main grid: every method x budget).
DEFAULT_LAYOUT = Layout("All runs: method x budget", ("family", "method", "variant", "budget_nominal"),
                        (PPL, LONGRANGE, LONGRANGE_N, REALIZED, BYTES, DECODE), also_paired=(LONGRANGE,),
                        note="Held-out perplexity per token (bounded cache for eviction methods). Long-range ppl: "
                             "the same pass's perplexity on the tokens of Python identifiers whose previous "
                             "occurrence in the same module starts at least eval.longrange.min_distance tokens "
                             "earlier and inside the scored window (harness.evaluation.longrange), where keeping "
                             "every token pays; `long-range tokens` counts them.")

_KEY_LABELS = {"arch": "method", "budget_nominal": "nominal budget", "group_sizes": "group sizes"}
_ARCH_ORDER = ["base", "gqa", "mqa", "cla", "mixsga"]
_VARIANT_ORDER = ["learned router", "random router", "no aux loss"]


def _architecture(method: str) -> str:
    """The architecture a method runs on, as its spec states (the name itself for one the registry lacks)."""
    from harness.methods import get_spec

    try:
        return get_spec(method).train_key(1.0, {})[0]
    except ValueError:
        return method


def _sort_value(column: str, value: Any) -> Any:
    if column in ("arch", "method"):
        name = _architecture(str(value)) if column == "method" else str(value)
        return (_ARCH_ORDER.index(name) if name in _ARCH_ORDER else len(_ARCH_ORDER), str(value))
    if column == "variant":
        return (_VARIANT_ORDER.index(value) if value in _VARIANT_ORDER else 99, str(value))
    if column in ("keep", "budget_nominal"):
        return -float(value) if value is not None and not pd.isna(value) else 0.0
    return (0, "") if value is None or (isinstance(value, float) and math.isnan(value)) else (1, str(value))


def experiment_runs(table: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """The runs whose ``experiments`` name ``experiment`` ("all" = every run); ValueError if there are none."""
    if experiment == "all":
        return table
    names = table.get("experiments", pd.Series([""] * len(table))).fillna("").astype(str)
    part = table[names.str.split(";").apply(lambda xs: experiment in xs)]
    if part.empty:
        known = sorted({n for ns in names for n in ns.split(";") if n})
        raise ValueError(f"no runs of experiment {experiment!r} in the table (experiments present: {known})")
    return part


def _joined(runs: pd.DataFrame, column: str, sep: str | None = None) -> list[str]:
    """Distinct values of ``column`` (each split at ``sep``), in first-seen order."""
    seen: list[str] = []
    for value in runs[column].dropna() if column in runs.columns else []:
        for part in (str(value).split(sep) if sep else [str(value)]):
            if part and part not in seen:
                seen.append(part)
    return seen


def _ours_note(runs: pd.DataFrame, metrics: list[Metric], sets: list[str], tasks: list[str]) -> str:
    """What *our* numbers are, read from the records (profile, models, recipe, data), not assumed."""
    columns = {m.column for m in metrics}
    parts = [f"Ours ({', '.join(_joined(runs, 'profile')) or 'unknown'} profile): "
             f"{', '.join(sorted(_joined(runs, 'model')))}"]
    recipes = _joined(runs, "train_recipe")
    if recipes:
        parts.append(f"trained with recipe {', '.join(recipes)}")
    if "ppl_token" in columns:
        parts.append(f"perplexity on {', '.join(_joined(runs, 'eval_set')) or 'the held-out split'}")
    if sets:
        rows = dict(p.split("=", 1) for p in _joined(runs, "instruct_rows", ";") if "=" in p)
        shown = [f"{n}" + (f" ({rows[n]} rows)" if n in rows else "") for n in sets]
        text = "ROUGE-L x100 (MiniLLM convention) on " + ", ".join(shown)
        if "offline" in sets:
            text += " (offline = the instruct set built here: code -> its docstring's first sentence)"
        if len(sets) > 1:
            text += "; `avg ROUGE-L` is their unweighted mean, beside the paper's five-set average"
        parts.append(text)
    if tasks:
        parts.append(f"zero-shot accuracy through lm-eval on {', '.join(tasks)}")
    return "; ".join(parts) + "."


def _fmt_key(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column in ("keep", "budget_nominal"):
        return f"{100 * float(value):g} %"
    return str(value)


def experiment_table(table: pd.DataFrame | str | Path, experiment: str) -> tuple[pd.DataFrame, str]:
    """``(csv_table, markdown)`` of one experiment.

    The CSV keeps numbers (``{metric}``, ``{metric}_ci``, ``{metric}_n`` per metric, ``seeds``, the paper
    block, the deltas); the Markdown shows formatted "mean ± CI" cells.
    """
    runs = experiment_runs(read_table(table), experiment).copy()
    layout = LAYOUTS.get(experiment, DEFAULT_LAYOUT)
    for column, value in layout.fill.items():
        if column in runs.columns:
            runs[column] = runs[column].fillna(value)
    for key in layout.keys:
        if key not in runs.columns:
            runs[key] = None
    metrics = list(layout.metrics)
    primary = layout.primary
    order = list(SET_LABELS)  # the paper's order: DL, SI, VC, SN, UN (others after)
    sets = sorted(_joined(runs, "instruct_sets", ";"), key=lambda n: order.index(n) if n in order else len(order))
    sets = sets if ROUGE in metrics else []
    if len(sets) > 1:
        # one column per instruction set the records hold, and their mean, compared with the paper's average
        at = metrics.index(ROUGE)
        metrics[at:at + 1] = [Metric(f"rouge_l_{n}", f"ROUGE-L {SET_LABELS.get(n, n)} (x100)") for n in sets] + [
            Metric("rouge_l_avg", "avg ROUGE-L (x100)")]
        primary = "rouge_l_avg" if primary == "rouge_l" else primary
    tasks: list[str] = []
    if layout.zeroshot:
        tasks = sorted(c for c in runs.columns if c.startswith("zs_") and c != "zs_avg")
        # Records hold accuracy as a fraction; the paper's columns are percentages.
        metrics += [Metric(c, f"{c[3:]} acc. (%)", digits=1, scale=100.0) for c in tasks]
        if tasks:
            metrics.append(Metric("zs_avg", "avg acc. (%, tasks' acc, not _norm)", digits=1, scale=100.0))
    summary = summarise(runs, layout.keys, [m.column for m in metrics])
    summary = summary.iloc[sorted(range(len(summary)), key=lambda i: tuple(
        _sort_value(k, summary.iloc[i][k]) for k in layout.keys))].reset_index(drop=True)
    rows = [{k: summary.at[i, k] for k in layout.keys} for i in range(len(summary))]
    paper_cols: list[str] = []
    paper_vals = [layout.paper(r) if layout.paper else {} for r in rows]
    for vals in paper_vals:
        paper_cols += [c for c in vals if c not in paper_cols]
    for c in paper_cols:
        summary[c] = [v.get(c, math.nan) for v in paper_vals]
    # paired difference of the primary metric to each row's reference (the layout's, else the suite's rule)
    primary = primary or ("ppl_token" if PPL in metrics else None)
    rule = layout_reference(layout) if layout.reference else default_reference
    paired_cols: list[str] = []
    if primary:
        for c in ("arch", "eviction", "arch_params", "budget_nominal", *PAIR_KEYS):
            if c not in runs.columns:
                runs[c] = None
        fields = [paired_row(runs[_in_row(runs, layout.keys, rows[i])], runs, primary, rule)
                  for i in range(len(summary))]
        paired_cols = list(fields[0]) if fields else []
        for c in paired_cols:
            summary[c] = [f[c] for f in fields]
        for extra in layout.also_paired:  # same reference rule and pairing, the metric's own windows
            more = [paired_row(runs[_in_row(runs, layout.keys, rows[i])], runs, extra.column, rule)
                    for i in range(len(summary))]
            for c in (list(more[0]) if more else []):
                summary[f"{extra.column}_{c}"] = [f[c] for f in more]
    delta_cols: list[str] = []
    if layout.reference and primary:
        ref_col, ref_val = layout.reference
        label = f"{ref_val}" if ref_col != "arch" else ref_val.upper()
        ours_col, paper_col = f"delta vs {label} (ours)", f"delta vs {label} (paper)"
        ours, theirs = [], []
        for i, row in enumerate(rows):
            ref = [j for j, r in enumerate(rows) if r[ref_col] == ref_val
                   and all(_same(r[c], row[c]) for c in layout.context)]
            if not ref or row[ref_col] == ref_val:
                ours.append(math.nan), theirs.append(math.nan)
                continue
            j = ref[0]
            # the paired mean difference where the row has seed pairs, else the difference of the means
            paired = summary.at[i, "delta"]
            ours.append(paired if not pd.isna(paired) else summary.at[i, primary] - summary.at[j, primary])
            p = summary[layout.paper_primary] if layout.paper_primary in summary else None
            theirs.append(math.nan if p is None else p.iloc[i] - p.iloc[j])
        summary[ours_col], summary[paper_col] = ours, theirs
        summary["same direction"] = [
            None if math.isnan(a) or math.isnan(b) else ("yes" if (a > 0) == (b > 0) else "no")
            for a, b in zip(ours, theirs)]
        delta_cols = [paper_col, "same direction"]
    primary_metric = next((m for m in metrics if m.column == primary), None)
    note = " ".join(t for t in (_ours_note(runs, metrics, sets or _joined(runs, "instruct_sets", ";"),
                                           [t[3:] for t in tasks if not t.endswith("_norm")]), layout.note) if t)
    md = _markdown(layout, experiment, summary, metrics, paper_cols, delta_cols, note,
                   primary_metric if paired_cols else None,
                   [m for m in layout.also_paired if f"{m.column}_delta" in summary] if paired_cols else [])
    return summary, md


def _in_row(runs: pd.DataFrame, keys: tuple[str, ...], row: dict) -> pd.Series:
    """Mask of the runs that make up the table row with key values ``row``."""
    return pd.Series([all(_same(v, row[k]) for k, v in zip(keys, values)) for values in zip(*(runs[k] for k in keys))],
                     index=runs.index, dtype=bool)


#: What a run is paired with: same model, seed and training (hence the same training and evaluation tokens).
PAIR_KEYS = ("model", "seed", "training")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(value: Any) -> str:
    return f"{100 * float(value):g} %"


#: How a reference label names an architecture (default: upper case).
_ARCH_LABELS = {"mixsga": "mixSGA", "base": "base"}


def _quantizes(method: Any) -> bool:
    """Whether the registry's spec of ``method`` stores a quantized cache (False for a name it lacks)."""
    from harness.methods import SPECS

    spec = None if _missing(method) else SPECS.get(str(method))
    return bool(getattr(spec, "quantizes", False))


def default_reference(run: pd.Series, runs: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
    """Candidate reference runs of ``run`` under the suite's rule, and the reference's label; None = none.

    * eviction on the base model (and PyramidKV): the base model, no eviction;
    * eviction stacked on a trained architecture: the un-evicted inner model (same architecture and
      architecture params), so the column isolates what the eviction costs;
    * a quantized cache (``kvquant``, ``kvquant+gqa``, ``kvquant+mixsga``): the same model with its
      unquantized cache (same architecture and architecture params), what the quantization costs;
    * a trained architecture other than GQA (MQA, CLA, mixSGA): GQA at the same nominal budget;
    * the base model and GQA themselves: none (they are the references).

    Candidates still have to match ``PAIR_KEYS`` (the caller pairs them by seed).
    """
    arch, eviction = run.get("arch"), run.get("eviction")
    no_evict = runs["eviction"].isna() if "eviction" in runs else pd.Series(True, index=runs.index)
    if _quantizes(run.get("method")):
        unquantized = pd.Series([not _quantizes(m) for m in runs["method"]], index=runs.index, dtype=bool)
        plain = runs[(runs["arch"] == arch) & no_evict & unquantized]
        if "arch_params" in runs and not _missing(run.get("arch_params")):
            plain = plain[plain["arch_params"] == run.get("arch_params")]
        return plain, f"{_ARCH_LABELS.get(arch, str(arch).upper())}, not quantized"
    if not _missing(eviction):
        if arch == "base" or _missing(arch):
            return runs[(runs["arch"] == "base") & no_evict], "base"
        same = runs[(runs["arch"] == arch) & no_evict]
        if "arch_params" in runs and not _missing(run.get("arch_params")):
            same = same[same["arch_params"] == run.get("arch_params")]
        return same, f"{_ARCH_LABELS.get(arch, str(arch).upper())}, no eviction"
    if _missing(arch) or arch in ("base", "gqa"):
        return None
    budget = run.get("budget_nominal")
    same_budget = (runs["budget_nominal"] - float(budget)).abs() < 1e-9 if not _missing(budget) else False
    label = f"GQA {_pct(budget)}" if not _missing(budget) else "GQA"
    return runs[(runs["arch"] == "gqa") & no_evict & same_budget], label


def layout_reference(layout: Layout) -> Callable[[pd.Series, pd.DataFrame], tuple[pd.DataFrame, str] | None]:
    """The reference rule of a layout that names one: the row with ``reference`` in the same ``context``."""
    ref_col, ref_val = layout.reference  # type: ignore[misc]
    label = ref_val.upper() if ref_col == "arch" else str(ref_val)
    same = [_KEY_LABELS.get(c, c) for c in layout.context if c != "family"]
    label += f", same {', '.join(same)}" if same else ""

    def rule(run: pd.Series, runs: pd.DataFrame) -> tuple[pd.DataFrame, str] | None:
        if _same(run.get(ref_col), ref_val):
            return None
        keep = [_same(v, ref_val) and all(_same(x, run.get(c)) for c, x in zip(layout.context, others))
                for v, *others in zip(runs[ref_col], *(runs[c] for c in layout.context))]
        return runs.loc[keep], label
    return rule


#: Metrics with per-window NLL sums in the tidy table (``{prefix}_window_nll`` / ``_tokens``): bootstrappable.
WINDOWED = {"ppl_token": "ppl", "ppl_longrange": "longrange"}


def _windows(run: pd.Series, metric: str = "ppl_token") -> tuple[list[float], list[int]] | None:
    prefix = WINDOWED[metric]
    nll, tokens = run.get(f"{prefix}_window_nll"), run.get(f"{prefix}_window_tokens")
    if _missing(nll) or _missing(tokens):
        return None
    return json.loads(nll), json.loads(tokens)


def paired_row(group: pd.DataFrame, runs: pd.DataFrame, metric: str,
               rule: Callable[[pd.Series, pd.DataFrame], tuple[pd.DataFrame, str] | None]) -> dict[str, Any]:
    """The paired difference of one table row (``group``: its runs) to its reference in ``runs``.

    Each run is paired with the reference run of the same ``PAIR_KEYS``; with >= 2 pairs the interval
    is Student-t over the per-pair differences, with one pair and perplexity it is the paired bootstrap
    over evaluation windows (``analysis.stats``). Returns the CSV fields of the row.
    """
    values, refs, labels, pair_ids, unmatched = [], [], [], [], []
    is_reference = False
    for _, run in group.iterrows():
        got = rule(run, runs)
        if got is None:
            is_reference = True
            continue
        candidates, label = got
        for k in PAIR_KEYS:
            if k in candidates:
                candidates = candidates.loc[[_same(v, run.get(k)) for v in candidates[k]]]
        candidates = candidates[candidates["run_id"] != run["run_id"]].sort_values("run_id")
        if candidates.empty or _missing(run.get(metric)) or _missing(candidates.iloc[0].get(metric)):
            unmatched.append(f"no reference run ({label})" if candidates.empty else f"{label}: metric not measured")
            continue
        ref = candidates.iloc[0]
        values.append(float(run[metric])), refs.append(float(ref[metric]))
        labels.append(label), pair_ids.append((run, ref))
    ref_text = ";".join(dict.fromkeys(labels)) or ("reference" if is_reference else ";".join(dict.fromkeys(unmatched)))
    out: dict[str, Any] = {"delta_ref": ref_text or None,
                           "delta_source": None, "delta_n": len(values), "delta": math.nan, "delta_lo": math.nan,
                           "delta_hi": math.nan, "delta_ref_mean": math.nan, "delta_significant": None}
    if not values:
        return out
    delta: Delta = paired_difference(values, refs)
    if len(values) == 1 and metric in WINDOWED:
        run, ref = pair_ids[0]
        a, b = _windows(run, metric), _windows(ref, metric)
        if a is not None and b is not None:
            try:
                delta = bootstrap_ppl_difference(a[0], a[1], b[0], b[1])
            except ValueError:
                pass  # not the same windows: no interval, the point difference stays
    out.update(delta=delta.mean, delta_lo=delta.lo, delta_hi=delta.hi, delta_source=delta.source,
               delta_ref_mean=math.fsum(refs) / len(refs), delta_significant=delta.significant if
               delta.source != "none" else None)
    if delta.source == "windows":
        out["delta_n"] = delta.n  # windows resampled (one seed pair)
    return out


def _delta_from(source: Any, n: Any) -> str:
    if source == "seeds":
        return f"{int(n)} seed pairs, t"
    if source == "windows":
        return f"1 seed pair, bootstrap over {int(n)} windows"
    if source == "none":
        return "1 seed pair, no CI"
    return "–"


def _same(a: Any, b: Any) -> bool:
    if (a is None or (isinstance(a, float) and math.isnan(a))) and (b is None or (isinstance(b, float) and math.isnan(b))):
        return True
    return a == b


def _markdown(layout: Layout, experiment: str, summary: pd.DataFrame, metrics: list[Metric],
              paper_cols: list[str], delta_cols: list[str], note: str, paired: Metric | None = None,
              also_paired: list[Metric] | None = None) -> str:
    shown = pd.DataFrame({_KEY_LABELS.get(k, k): [_fmt_key(k, v) for v in summary[k]] for k in layout.keys})
    for m in metrics:
        shown[m.label] = [format_ci(a, h, int(n), m.digits, m.scale) for a, h, n in
                          zip(summary[m.column], summary[f"{m.column}_ci"], summary[f"{m.column}_n"])]
    shown["seeds"] = summary["seeds"].astype(int).astype(str)
    if paired is not None:
        shown["Δ vs ref"] = [
            "ref" if ref == "reference" else format_delta(
                None if pd.isna(d) else Delta(d, lo, hi, int(n), str(src)), paired.digits, paired.scale, rm)
            for d, lo, hi, n, src, rm, ref in zip(summary["delta"], summary["delta_lo"], summary["delta_hi"],
                                                 summary["delta_n"], summary["delta_source"],
                                                 summary["delta_ref_mean"], summary["delta_ref"])]
        shown["ref"] = [("–" if _missing(r) else "this row" if r == "reference" else r) for r in summary["delta_ref"]]
        shown["Δ from"] = [_delta_from(src, n) for src, n in zip(summary["delta_source"], summary["delta_n"])]
        for m in also_paired or []:
            c = f"{m.column}_delta"
            shown[f"Δ {m.label} vs ref"] = [
                "ref" if ref == "reference" else format_delta(
                    None if pd.isna(d) else Delta(d, lo, hi, int(n), str(src)), m.digits, m.scale, rm)
                for d, lo, hi, n, src, rm, ref in zip(summary[c], summary[f"{c}_lo"], summary[f"{c}_hi"],
                                                     summary[f"{c}_n"], summary[f"{c}_source"],
                                                     summary[f"{c}_ref_mean"], summary[f"{c}_ref"])]
    for c in paper_cols:
        shown[c] = summary[c]
    for c in delta_cols:
        shown[c] = summary[c]
    text = [f"# {layout.title}", "", f"Experiment `{experiment}`. Cells: mean ± half width of the 95 % Student-t "
            "confidence interval over seeds; \"(n=1)\" marks a single run. `seeds` counts the runs per row.", ""]
    if paper_cols:
        text += ["Columns headed `paper:` are the paper's own numbers (different models, data and scale): compare "
                 "directions, not values.", ""]
    if paired is not None:
        if layout.reference:
            ref_col, ref_val = layout.reference
            where = ", ".join(_KEY_LABELS.get(c, c) for c in layout.context)
            reference = f"the row whose {_KEY_LABELS.get(ref_col, ref_col)} is {ref_val} with the same {where}"
        else:
            reference = DEFAULT_REFERENCE_TEXT
        text += [paired_note(paired.label, reference), ""]
    if delta_cols:
        text += ["`delta vs ... (paper)`: the paper's row minus its reference row; `same direction` says whether "
                 "its sign agrees with ours (`Δ vs ref`).", ""]
    body = to_markdown(shown)
    return "\n".join(text) + "\n" + body + ("\n" + note + "\n" if note else "")


#: How the suite's rule (``default_reference``) picks each row's reference, for the footnote.
DEFAULT_REFERENCE_TEXT = ("GQA at the same nominal budget for trained architectures (MQA, CLA, mixSGA; none where "
                          "the grid has no GQA run at that budget), the base model for eviction on it, and the "
                          "un-evicted inner model for eviction stacked on GQA / mixSGA (what the eviction costs), "
                          "and the same model with its unquantized cache for KV-cache quantization")


def paired_note(label: str, reference: str = DEFAULT_REFERENCE_TEXT) -> str:
    """The footnote of the `Δ vs ref` column: reference, pairing, n and interval method."""
    return (f"`Δ vs ref`: {label} of the row minus its reference `ref` (in the metric's units; in brackets, relative "
            f"to the reference's mean). Reference: {reference}. Pairing: each run with the reference run of the "
            "same model, seed "
            "and training (identical training and evaluation tokens), so what the seeds share cancels. Interval "
            "(`Δ from`): with n >= 2 seed pairs, mean ± the 95 % Student-t half width over the n per-seed "
            "differences; with one seed pair, perplexity gets a paired bootstrap over evaluation windows (the "
            f"same windows resampled for both runs, {BOOTSTRAP_RESAMPLES} resamples, fixed seed; 95 % percentile "
            f"interval in [ ]), other metrics no interval. {SIGNIFICANT}: the interval excludes 0. The bootstrap "
            "treats windows as independent, which windows of one document are not: read it as a lower bound on "
            "the uncertainty.")


def write_experiment_table(table: pd.DataFrame | str | Path, experiment: str, csv: str | Path,
                           md: str | Path, references: Sequence[str | Path] = ()) -> pd.DataFrame:
    """Write one experiment's table as CSV and Markdown; return the CSV table.

    ``references``: trivial-reference ROUGE-L files (``harness.evaluation.instruct_reference``), printed
    under the Markdown table and, as ``rouge_l_trivial_<set>``, as CSV columns beside the models' ROUGE-L.
    """
    summary, text = experiment_table(table, experiment)
    notes = []
    for path in references:
        ref = json.loads(Path(path).read_text())
        summary[f"rouge_l_trivial_{ref['set']}"] = ref["rouge_l"]
        notes.append(f"- {ref['set']}:{ref['split']} ({ref['rows']} rows): ROUGE-L {ref['rouge_l']:.2f} "
                     f"with {ref['predictor']} as the prediction")
    if notes:
        text = (text.rstrip("\n") + "\n\nTrivial reference on the same test rows (no trained model; "
                "a model below it has not learned the task):\n" + "\n".join(notes) + "\n")
    write_atomic(csv, summary.to_csv(index=False))
    write_atomic(md, text)
    return summary

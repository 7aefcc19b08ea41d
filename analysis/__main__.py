"""``python -m analysis``: records -> tables -> figures (command lines in ``analysis/__init__.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the analysis commands."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description="records -> tables -> figures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("collate", help="validate records and write the tidy table (one row per run)")
    p.add_argument("records", nargs="+", help="record JSON files or directories of them")
    p.add_argument("--all-csv", required=True, help="tidy table CSV")
    p.add_argument("--perplexity-csv", help="optional: perplexity per model x method x budget (CSV)")
    p.add_argument("--perplexity-md", help="optional: the same as Markdown")

    p = sub.add_parser("table", help="one experiment's paper-style table (mean ± 95 %% CI over seeds)")
    p.add_argument("--table", required=True, help="tidy table CSV from 'collate'")
    p.add_argument("--experiment", required=True, help="experiment name as in the records (or 'all')")
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--reference", action="append", default=[],
                   help="trivial-reference ROUGE-L JSON (harness.evaluation.instruct_reference), printed beside")

    p = sub.add_parser("pareto", help="Pareto fronts of quality vs realized KV bytes and vs decode latency")
    p.add_argument("--table", required=True)
    p.add_argument("--csv", required=True, help="front rows (both axes)")
    p.add_argument("--md")
    p.add_argument("--kv-figure", help="PNG: quality vs realized KV bytes, a panel per family")
    p.add_argument("--latency-figure", help="PNG: quality vs decode ms/token, a panel per family x device")
    p.add_argument("--longrange-figure", help="PNG: long-range perplexity vs realized KV bytes, a panel per family")
    p.add_argument("--bench", nargs="+", help="benchmark JSONs (harness.measurement.bench): the latency axis")
    p.add_argument("--quality", default="ppl_token", help="ppl_token (default), ppl_word, ppl_longrange, rouge_l or zs_avg")
    p.add_argument("--experiment", default="all", help="only runs of this experiment (default: all runs)")

    p = sub.add_parser("figure3", help="Figure 3: perplexity vs realized KV budget")
    p.add_argument("--table", required=True)
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--experiment", default="figure3_budget_sweep")
    p.add_argument("--csv", help="optional: the figure's data table (CSV)")
    p.add_argument("--md", help="optional: the same as Markdown")

    p = sub.add_parser("figure1", help="Figure 1 from the harness.evaluation.token_importance JSON")
    p.add_argument("--json", required=True)
    p.add_argument("--out", required=True, help="PNG path")

    p = sub.add_parser("table9", help="Tables 9/10 from the harness.measurement.overheads JSON")
    p.add_argument("--json", required=True)
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)

    p = sub.add_parser("perf", help="prefill ms, decode tokens/s, peak memory and ratios to base, from the benchmark")
    p.add_argument("--table", required=True, help="tidy table CSV (labels and realized KV bytes by run id)")
    p.add_argument("--bench", nargs="+", required=True, help="benchmark JSONs (harness.measurement.bench)")
    p.add_argument("--csv", required=True)
    p.add_argument("--md", required=True)
    p.add_argument("--figure", help="optional PNG: decode tokens/s x base vs realized KV bytes, per device x context")

    p = sub.add_parser("recovery", help="held-out perplexity vs uptraining tokens of the CPT runs (recovery curves)")
    # none is an error named by the analysis (a config whose `main` grid has no compared CPT run)
    p.add_argument("records", nargs="*", help="record JSON files or directories of them")
    p.add_argument("--csv", required=True, help="per family x method: final ppl, last-quarter change, plateaued")
    p.add_argument("--md", required=True)
    p.add_argument("--figure", required=True, help="PNG: one panel per family")

    p = sub.add_parser("plot-perplexity", help="bar chart of base-model perplexity vs the unigram baseline")
    p.add_argument("--table", required=True)
    p.add_argument("--out", required=True, help="PNG path")
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "collate":
        from analysis.collate import collate

        table = collate(args.records, all_csv=args.all_csv, perplexity_csv=args.perplexity_csv,
                        perplexity_md=args.perplexity_md)
        return f"collated {len(table)} records -> {args.all_csv}"
    if args.command == "table":
        from analysis.tables import write_experiment_table

        rows = write_experiment_table(args.table, args.experiment, args.csv, args.md, references=args.reference)
        return f"{args.experiment}: {len(rows)} rows -> {args.md}"
    if args.command == "pareto":
        from analysis.pareto import write_pareto

        fronts = write_pareto(args.table, csv=args.csv, md=args.md, kv_figure=args.kv_figure,
                              latency_figure=args.latency_figure, quality=args.quality,
                              experiment=args.experiment, longrange_figure=args.longrange_figure,
                              bench=args.bench)
        return f"pareto: {int(fronts['on_front'].sum())} front points of {len(fronts)} -> {args.csv}"
    if args.command == "figure3":
        from analysis.figures import figure3
        from analysis.tables import write_experiment_table

        if args.csv and args.md:
            write_experiment_table(args.table, args.experiment, args.csv, args.md)
        elif args.csv or args.md:
            raise ValueError("give both --csv and --md, or neither")
        return f"figure 3 -> {figure3(args.table, args.out, experiment=args.experiment)}"
    if args.command == "figure1":
        from analysis.figures import figure1

        return f"figure 1 -> {figure1(args.json, args.out)}"
    if args.command == "table9":
        from analysis.reports import write_table9

        rows = write_table9(args.json, csv=args.csv, md=args.md)
        return f"tables 9/10: {len(rows)} rows -> {args.md}"
    if args.command == "perf":
        from analysis.reports import write_perf

        rows = write_perf(args.table, args.bench, csv=args.csv, md=args.md, figure=args.figure)
        return f"perf: {len(rows)} rows -> {args.md}"
    if args.command == "recovery":
        from analysis.curves import write_recovery

        table = write_recovery(args.records, csv=args.csv, md=args.md, figure=args.figure)
        return f"recovery curves: {len(table)} family x method rows -> {args.figure}"
    from analysis.plots import plot_perplexity

    return f"figure -> {plot_perplexity(args.table, args.out)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; missing inputs or unusable data exit with status 2 and the reason."""
    args = build_parser().parse_args(argv)
    try:
        print(_run(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

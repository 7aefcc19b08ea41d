"""``python -m analysis``: collate records into tables and draw figures (see README.md)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the analysis commands."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description="records -> tables -> figures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("collate", help="validate records and write the tidy and perplexity tables")
    p.add_argument("records", nargs="+", help="record JSON files")
    p.add_argument("--all-csv", required=True, help="tidy table, one row per run")
    p.add_argument("--perplexity-csv", required=True, help="perplexity per model x method x budget")
    p.add_argument("--perplexity-md", required=True, help="the same as a Markdown table")
    p = sub.add_parser("plot-perplexity", help="bar chart of base-model perplexity vs the unigram baseline")
    p.add_argument("--table", required=True, help="tidy table CSV from 'collate'")
    p.add_argument("--out", required=True, help="PNG path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; invalid records or tables exit with status 2 and the reason."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "collate":
            from analysis.collate import collate

            table = collate(
                args.records,
                all_csv=args.all_csv,
                perplexity_csv=args.perplexity_csv,
                perplexity_md=args.perplexity_md,
            )
            print(f"collated {len(table)} records -> {args.all_csv}")
        else:
            from analysis.plots import plot_perplexity

            print(f"figure -> {plot_perplexity(args.table, args.out)}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

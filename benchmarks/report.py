"""Markdown tables from a ``benchmarks.decode`` JSON: ``python -m benchmarks.report results/bench/decode-cpu.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _p50(row: dict, key: str = "decode_tokens_per_s") -> float:
    return row[key]["p50"]


def headline_table(blocks: list[dict]) -> list[str]:
    lines = ["| model | batch | context | base tok/s | GQA tok/s | static GQA tok/s | mixSGA tok/s "
             "| mixSGA / GQA | mixSGA / fastest GQA | mixSGA / base | mixSGA KV | GQA KV | mixSGA reserved / live "
             "| prefill mixSGA / GQA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for block in blocks:
        for ctx, entry in block["contexts"].items():
            by = {r["label"]: r for r in entry["rows"]}
            r = entry["ratios"]
            mix = by["mixsga-3:1:6@50%"]
            kv = mix["kv_bytes"]
            reserved = kv.get("reserved_final")
            res = f"{reserved / kv['final']:.2f}" if reserved else "-"
            static = by.get("gqa-static@50%")
            lines.append(
                f"| {block['model']} | {block['batch']} | {ctx} | {_p50(by['base']):.2f} | {_p50(by['gqa@50%']):.2f} "
                f"| {_p50(static):.2f} | {_p50(mix):.2f} | **{r['mixsga_vs_gqa_decode_tps']:.3f}** "
                f"| **{r['mixsga_vs_fastest_gqa_decode_tps']:.3f}** | {r['mixsga_vs_base_decode_tps']:.3f} "
                f"| {r['mixsga_kv_fraction_final']:.3f} | {r['gqa_kv_fraction_final']:.3f} | {res} "
                f"| {r['mixsga_vs_gqa_prefill_ms']:.2f} |")
    return lines


def methods_table(block: dict) -> list[str]:
    lines = [f"{block['model']}, context {block['context']}, batch {block['batch']} "
             f"(base: {_p50(block['base']):.2f} tok/s overall)", "",
             "| method | tok/s | vs base (interleaved) | live KV / base | analytic KV / base | prefill ms |",
             "|---|---|---|---|---|---|"]
    for row in block["rows"]:
        if "infeasible" in row:
            lines.append(f"| {row['label']} | infeasible: {row['infeasible']} | | | | |")
            continue
        kv = row["kv_bytes"]
        lines.append(f"| {row['label']} | {_p50(row):.2f} | {row['vs_base_decode_tps']:.3f} "
                     f"| {kv['final'] / kv['base_final']:.3f} | {kv['analytic_final'] / kv['base_final']:.3f} "
                     f"| {_p50(row, 'prefill_ms'):.0f} ({row['prefill_mode']}) |")
    return lines


def report(payload: dict) -> str:
    env = payload["environment"]
    out = [f"Measured on {env['device']} ({env.get('gpu', env.get('cpu_model') or env['processor'])}), "
           f"torch {env['torch']}, "
           f"{env['threads']} threads, load average {env['load_average_start']} -> {env['load_average_end']}, "
           f"{env['wall_seconds']} s.", "", "Headline (median decode tokens/s per sequence):", ""]
    out += headline_table(payload["headline"])
    if payload["batched"]:
        out += ["", "Batched:", ""] + headline_table(payload["batched"])
    for block in payload["all_methods"]:
        out += ["", "Every method:", ""] + methods_table(block)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m benchmarks.report RESULT.json")
    print(report(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

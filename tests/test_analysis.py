"""analysis/: tidy table, CI over seeds, experiment tables, Pareto fronts, figures, CLI (synthetic records)."""

from __future__ import annotations

import json
import math
import random

import pandas as pd
import pytest
from scipy import stats

from analysis.__main__ import main as analysis_main
from analysis.collate import flatten, load_records, ratio_label, records_table, to_markdown
from analysis.pareto import pareto_mask
from analysis.stats import (Delta, bootstrap_ppl_difference, format_ci, format_delta, mean_ci,
                            paired_difference, summarise)
from analysis.tables import experiment_table
from harness.orchestration.provenance import utc_now
from harness.orchestration.records import new_record, write_record

FAMILIES = ("llama3", "tinyllama")


def make_run(*, family: str = "llama3", method: str = "base", budget: float = 1.0, seed: int = 0,
             experiments=("main",), params=None, training: str = "cpt", ppl: float | None = 50.0,
             rouge: float | None = None, zeroshot=None, decode_fractions=None, realized: float | None = None,
             tps: float | None = 100.0, device=("cpu", "test cpu"), run_id: str | None = None,
             windows: tuple[list[float], list[int]] | None = None) -> dict:
    """A schema-valid record built with harness.orchestration.records.new_record (values are synthetic)."""
    run_id = run_id or f"{family}__{method}__kv{round(100 * budget)}__s{seed}"
    spec = {"run_id": run_id, "model": {"name": family, "family": family}, "method": method, "seed": seed,
            "experiments": list(experiments), "training": {"kind": training}}
    now = utc_now()
    realized = budget if realized is None else realized
    base_bpt = 1024.0
    timing = None if tps is None else {"mean": tps, "p50": tps, "p90": tps * 1.1, "std": 1.0, "n": 5}
    return new_record(
        spec=spec,
        provenance={"git": {"commit": "0" * 40, "dirty": False}, "packages": {"torch": "2.13.0"},
                    "python": "3.11", "platform": "Linux", "hostname": "h",
                    "device": {"type": device[0], "name": device[1]}, "seed": seed, "dataset_fingerprint": None,
                    "started_at": now, "finished_at": now},
        budget={"nominal": budget, "realized": realized, "analytic_bytes_per_token": base_bpt * budget,
                "base_bytes_per_token": base_bpt, "measured_bytes": base_bpt * realized * 64,
                "base_measured_bytes": base_bpt * 64, "measured_tokens": 64, "dtype": "float32", "params": params,
                "decode_expert_fractions": decode_fractions},
        quality={"ppl_token": ppl, "ppl_word": None if ppl is None else 2 * ppl, "rouge_l": rouge,
                 "gen_length": None if rouge is None else 12.0, "zeroshot": zeroshot,
                 "ppl_windows": None if windows is None else {"nll": list(windows[0]), "tokens": list(windows[1])}},
        performance={"device": f"{device[0]}: {device[1]}",
                     "prefill_ms": None if tps is None else {"mean": 5.0, "p50": 5.0, "p90": 6.0, "std": 0.5},
                     "decode_tokens_per_s": timing,
                     "peak_memory_bytes": {"prefill": 2.0**20, "decode": 3.0 * 2**20}},
        flags={"simulated": False, "query_aware": None},
        wall_time_s=1.0,
        params=params,
    )


def mixsga_params(ratios, group_sizes=(1, 2, 4), router="learned", aux=0.1) -> dict:
    return {"ratios": list(ratios), "group_sizes": list(group_sizes), "router": router, "aux_loss_weight": aux,
            "aux_loss": "sigmoid", "seed": 0}


def synthetic_records(seeds=(0, 1, 2)) -> list[dict]:
    """A realistic small grid: main grid on two families, Table 1 / 3 / 5 / 6 runs, Figure 3 sweep."""
    rng = random.Random(0)
    out = []
    for seed in seeds:
        for family in FAMILIES:
            base = 40.0 if family == "llama3" else 55.0
            grid = [("base", 1.0, None), ("gqa", 0.5, {}), ("mqa", 0.25, {}), ("cla", 0.5, {"share": 2}),
                    ("cla", 0.25, {"share": 4}), ("h2o", 0.5, {"keep": 0.5})]
            grid += [("mixsga", b, mixsga_params(r)) for b, r in
                     ((0.25, (0, 0, 1)), (0.35, (1, 1, 8)), (0.5, (3, 1, 6)), (0.75, (1, 1, 0)))]
            for method, budget, params in grid:
                penalty = {"base": 0, "gqa": 6, "mqa": 14, "cla": 9 / budget, "h2o": 10,
                           "mixsga": 2 / budget}[method]
                exps = ["main"] + (["figure3_budget_sweep"] if family == "tinyllama" and method != "h2o" else [])
                exps += ["table2_cpt"] if family == "tinyllama" and budget == 0.5 and method != "h2o" else []
                ppl = base + penalty + rng.gauss(0, 0.8)
                zs = {"arc_easy": 40 - penalty / 3 + rng.gauss(0, 1), "piqa": 55 - penalty / 4 + rng.gauss(0, 1)}
                out.append(make_run(family=family, method=method, budget=budget, seed=seed, experiments=exps,
                                    params=params, ppl=ppl, zeroshot=zs,
                                    realized=budget * (1 + rng.uniform(-0.01, 0.01)),
                                    tps=300 * (1 + 0.4 * (1 - budget)) + rng.gauss(0, 5)))
            for ratio, rouge in (((0, 1, 0), 20.0), ((1, 1, 2), 22.0), ((3, 1, 6), 23.5)):
                method = "gqa" if ratio == (0, 1, 0) else "mixsga"
                out.append(make_run(family=family, method=method, budget=0.5, seed=seed, experiments=["table1_sft"],
                                    params=None if method == "gqa" else mixsga_params(ratio), training="sft",
                                    ppl=None, rouge=rouge + rng.gauss(0, 0.5), tps=None,
                                    run_id=f"{family}__sft_{''.join(map(str, ratio))}__s{seed}"))
        for ratios, sizes, budget, rouge in (((3, 1, 6), (1, 2, 4), 0.5, 23.0), ((3, 4), (1, 2), 0.714, 21.0),
                                             ((1, 2), (1, 2), 0.667, 18.0)):
            out.append(make_run(method="mixsga", budget=round(budget, 3), seed=seed, experiments=["table5_expert_count"],
                                params=mixsga_params(ratios, sizes), training="sft", ppl=None, tps=None,
                                rouge=rouge + rng.gauss(0, 0.5),
                                run_id=f"llama3__t5_{''.join(map(str, ratios))}__s{seed}"))
        for variant, router, aux, fr in (("learned", "learned", 0.1, [0.31, 0.1, 0.59]),
                                          ("random", "random", 0.1, [0.3, 0.1, 0.6]),
                                          ("noaux", "learned", 0.0, [0.35, 0.33, 0.32])):
            out.append(make_run(family="gemma2", method="mixsga", budget=0.5, seed=seed, experiments=["table6_router"],
                                params=mixsga_params((3, 1, 6), router=router, aux=aux), training="sft",
                                ppl=None, tps=None, decode_fractions=fr,
                                rouge={"learned": 22.0, "random": 19.0, "noaux": 8.0}[variant] + rng.gauss(0, 0.4),
                                run_id=f"gemma2__t6_{variant}__s{seed}"))
        for keep in (0.8, 0.4):
            for inner, base in (("gqa", 47.0), ("mixsga", 44.0)):
                params = {"inner": {} if inner == "gqa" else mixsga_params((3, 1, 6)), "inner_budget": 0.5,
                          "eviction": {"method": "h2o", "keep": keep}}
                out.append(make_run(family="tinyllama", method=f"h2o+{inner}", budget=0.5 * keep, seed=seed,
                                    experiments=["table3_eviction_stack"], params=params,
                                    ppl=base + 5 * (1 - keep) + rng.gauss(0, 0.5), tps=None))
    return out


def synthetic_bench(records: list[dict], device: str = "cpu: test cpu", contexts=(64, 128)) -> list[dict]:
    """Benchmark JSONs (harness.measurement.bench layout, through its own ratio_rows) for the main runs of the
    first seed: 5 rounds whose speed drifts alike for every method; throughput falls with the KV budget."""
    from harness.measurement.bench import SCHEMA, ratio_rows

    main = [r for r in records if "main" in r["identity"]["experiments"]]
    seed = min(r["identity"]["seed"] for r in main)
    out = []
    for family in sorted({r["identity"]["family"] for r in main}):
        mine = [r for r in main if r["identity"]["family"] == family and r["identity"]["seed"] == seed]
        entries, samples = {}, {}
        for r in mine:
            key = "base" if r["identity"]["method"] == "base" else r["identity"]["run_id"]
            budget = r["budget"]["nominal"]
            entries[key] = {"run_id": r["identity"]["run_id"], "method": r["identity"]["method"], "budget": budget,
                            "params": {}, "weights_bytes": 10_000}
            samples[key] = [{"prefill_ms": 5.0 * d, "decode_tokens_per_s": 300 * (1.4 - 0.4 * budget) / d,
                             "kv_live_bytes": 1024.0 * budget * 64, "phase_peak_bytes": 4096.0 * budget}
                            for d in (1.0, 1.1, 0.9, 1.2, 1.0)]
        pairs = {key: list(zip(got, samples["base"])) for key, got in samples.items()}
        rows = []
        for n in contexts:
            rows += ratio_rows(pairs, entries, context_len=n, new_tokens=8, device_type=device.split(":")[0])
        out.append({"schema": SCHEMA, "model": family, "family": family, "seed": seed, "device": device,
                    "threads": 1, "reference": "base", "protocol": {}, "rows": rows})
    return out


@pytest.fixture(scope="module")
def grid() -> pd.DataFrame:
    return records_table(synthetic_records())


# ---- confidence intervals -------------------------------------------------------------------------

def test_mean_ci_matches_scipy_and_hand_values():
    mean, half, n = mean_ci([40.0, 60.0])
    assert (mean, n) == (50.0, 2)
    assert half == pytest.approx(12.7062047 * 14.1421356 / math.sqrt(2))  # t_{0.975,1} s / sqrt(n)
    xs = [1.0, 2.0, 4.0, 7.0, 11.0]
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 5, scale=stats.sem(xs))
    _, half, _ = mean_ci(xs)
    assert half == pytest.approx((hi - lo) / 2)


def test_mean_ci_single_missing_and_bad_level():
    assert mean_ci([3.0])[0] == 3.0 and math.isnan(mean_ci([3.0])[1])
    assert mean_ci([None, float("nan")])[2] == 0
    assert format_ci(3.0, math.nan, 1) == "3.00 (n=1)"
    assert format_ci(3.0, 0.26, 3, digits=1) == "3.0 ± 0.3"
    assert format_ci(0.5, 0.01, 2, digits=1, scale=100.0) == "50.0 ± 1.0"
    assert format_ci(math.nan, math.nan, 0) == "–"
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=1.5)


def test_summarise_counts_seeds_and_tolerates_missing_metrics():
    df = pd.DataFrame({"m": ["a", "a", "b"], "x": [1.0, 3.0, 5.0]})
    s = summarise(df, ["m"], ["x", "absent"]).set_index("m")
    assert s.loc["a", "seeds"] == 2 and s.loc["a", "x"] == 2.0 and s.loc["b", "x_n"] == 1
    assert s.loc["a", "absent_n"] == 0
    with pytest.raises(ValueError, match="grouping columns"):
        summarise(df, ["nope"], ["x"])


# ---- Pareto ------------------------------------------------------------------------------------

def test_pareto_mask_hand_example():
    cost = [1, 2, 3, 4, 2, 5, float("nan")]
    ppl = [10, 8, 9, 5, 8, 5, 1]
    assert pareto_mask(cost, ppl).tolist() == [True, True, False, True, True, False, False]
    rouge = [10, 8, 12, 11, 8, 13, 99]  # higher is better
    assert pareto_mask(cost, rouge, lower_quality_better=False).tolist() == [True, False, True, False, False, True,
                                                                              False]
    with pytest.raises(ValueError, match="differ in length"):
        pareto_mask([1, 2], [1])


# ---- tidy table ----------------------------------------------------------------------------------

def test_flatten_reads_the_extended_schema(grid):
    row = grid.set_index("run_id").loc["tinyllama__mixsga__kv50__s1"]
    assert row["ratio"] == "3:1:6" and row["arch"] == "mixsga" and row["variant"] == "learned router"
    assert row["experiments"] == "figure3_budget_sweep;main;table2_cpt"
    assert row["training"] == "cpt" and row["device"] == "cpu: test cpu"
    assert row["kv_bytes_per_token"] == pytest.approx(1024.0 * row["budget_realized"])
    assert row["zs_avg"] == pytest.approx((row["zs_arc_easy"] + row["zs_piqa"]) / 2)
    assert row["decode_ms_per_token"] == pytest.approx(1000.0 / row["decode_tps_mean"])
    assert row["prefill_ms"] == 5.0 and row["peak_mem_decode"] == 3.0 * 2**20
    stacked = grid.set_index("run_id").loc["tinyllama__h2o+gqa__kv40__s0"]
    assert stacked["keep"] == 0.8 and stacked["arch"] == "gqa" and stacked["eviction"] == "h2o"
    assert ratio_label([3, 4], [1, 2]) == "3:4:0" and ratio_label([1, 3], [1, 8]) == "1:3 (g1,8)"
    fracs = grid.set_index("run_id").loc["gemma2__t6_noaux__s0"]
    assert (fracs["variant"], fracs["decode_frac_2"]) == ("no aux loss", 0.33)


def test_method_columns_come_from_the_structured_fields():
    from analysis.collate import flatten

    fields = {"architecture": "mixsga", "eviction": "pyramidkv", "keep": 0.25, "variant": "snapkv scores",
              "architecture_params": {"ratios": [3, 1, 6], "group_sizes": [1, 2, 4]}}
    row = flatten({"identity": {"run_id": "x", "method": "some-new-method", "method_fields": fields}})
    assert (row["arch"], row["eviction"], row["keep"], row["variant"], row["ratio"]) == \
        ("mixsga", "pyramidkv", 0.25, "snapkv scores", "3:1:6")


def test_flatten_tolerates_missing_fields():
    row = flatten({"identity": {"run_id": "x", "method": "gqa"}})
    assert row["run_id"] == "x" and row["ratio"] == "0:1:0"
    assert math.isnan(row["ppl_token"]) and math.isnan(row["kv_bytes_per_token"]) and row["experiments"] == ""


def test_load_records_validates_and_rejects(tmp_path):
    recs = synthetic_records(seeds=(0,))[:3]
    paths = [write_record(tmp_path / f"{r['identity']['run_id']}.json", r) for r in recs]
    table = load_records(paths)
    assert len(table) == 3 and list(table["run_id"]) == sorted(table["run_id"])
    with pytest.raises(ValueError, match="duplicate run ids"):
        load_records([paths[0], paths[0]])
    with pytest.raises(ValueError, match="no records"):
        load_records([])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"identity": {}}))
    with pytest.raises(ValueError, match="bad.json"):
        load_records([bad])


def test_markdown_marks_missing_values():
    md = to_markdown(pd.DataFrame({"name": ["a"], "x": [float("nan")], "y": [1.23456]}))
    assert md.splitlines() == ["| name | x | y |", "|---|---:|---:|", "| a | – | 1.23 |"]


# ---- experiment tables ------------------------------------------------------------------------------

def test_table1_layout_ci_and_paper_block(grid):
    summary, md = experiment_table(grid, "table1_sft")
    assert len(summary) == 6 and set(summary["seeds"]) == {3}
    row = summary[(summary["family"] == "llama3") & (summary["ratio"] == "3:1:6")].iloc[0]
    runs = grid[grid["run_id"].str.startswith("llama3__sft_316")]["rouge_l"]
    mean, half, _ = mean_ci(runs)
    assert row["rouge_l"] == pytest.approx(mean) and row["rouge_l_ci"] == pytest.approx(half)
    assert row["paper: avg ROUGE-L"] == 16.10  # Llama3.2-1B, 3:1:6
    gqa = summary[(summary["family"] == "llama3") & (summary["ratio"] == "0:1:0")].iloc[0]
    assert row["delta vs GQA (ours)"] == pytest.approx(row["rouge_l"] - gqa["rouge_l"])
    assert row["delta vs GQA (paper)"] == pytest.approx(16.10 - 13.63) and row["same direction"] == "yes"
    tiny = summary[summary["family"] == "tinyllama"]
    assert tiny["paper: avg ROUGE-L"].isna().all(), "TinyLlama has no Table 1 row in the paper"
    assert "± " in md and "paper: avg ROUGE-L" in md and "| 3 |" in md


def test_tables_2_3_5_6_and_default(grid):
    t2, md2 = experiment_table(grid, "table2_cpt")
    assert set(t2["arch"]) == {"gqa", "cla", "mixsga"} and "zs_avg" in t2 and "piqa acc. (%)" in md2
    assert t2.set_index("arch").loc["mixsga", "paper: WikiText-2 ppl"] == 20.46
    t3, _ = experiment_table(grid, "table3_eviction_stack")
    assert list(zip(t3["keep"], t3["arch"])) == [(0.8, "gqa"), (0.8, "mixsga"), (0.4, "gqa"), (0.4, "mixsga")]
    assert t3.set_index(["keep", "arch"]).loc[(0.4, "mixsga"), "paper: WikiText-2 ppl"] == 20.98
    t5, md5 = experiment_table(grid, "table5_expert_count")
    assert set(t5["ratio"]) == {"3:1:6", "3:4:0", "1:2:0"} and "71.4 ±" in md5
    t6, md6 = experiment_table(grid, "table6_router")
    assert list(t6["variant"]) == ["learned router", "random router", "no aux loss"]
    assert t6.set_index("variant").loc["no aux loss", "paper: decode fraction expert 1"] == 0.3458
    assert "decode fraction expert 3" in md6
    main, md = experiment_table(grid, "main")
    assert len(main) == 2 * 10 and "decode (tokens/s)" in md
    with pytest.raises(ValueError, match="no runs of experiment 'nope'"):
        experiment_table(grid, "nope")


def test_single_seed_shows_n1():
    table = records_table(synthetic_records(seeds=(0,)))
    _, md = experiment_table(table, "table1_sft")
    body = md[md.index("| family"):]
    assert "(n=1)" in body and "± " not in body


# ---- command line ----------------------------------------------------------------------------------

def test_every_subcommand_writes_its_outputs(tmp_path, capsys):
    records = tmp_path / "records"
    for rec in synthetic_records(seeds=(0, 1)):
        write_record(records / f"{rec['identity']['run_id']}.json", rec)
    t, f = tmp_path / "tables", tmp_path / "figures"
    assert analysis_main(["collate", str(records), "--all-csv", str(t / "all.csv")]) == 0
    for exp in ("table1_sft", "table2_cpt", "table3_eviction_stack", "table5_expert_count", "table6_router", "main"):
        assert analysis_main(["table", "--table", str(t / "all.csv"), "--experiment", exp,
                              "--csv", str(t / f"{exp}.csv"), "--md", str(t / f"{exp}.md")]) == 0
    bench = []
    for data in synthetic_bench(synthetic_records(seeds=(0, 1))):
        bench.append(tmp_path / f"{data['model']}.json")
        bench[-1].write_text(json.dumps(data))
    # the latency axis comes from the benchmark only
    assert analysis_main(["pareto", "--table", str(t / "all.csv"), "--csv", str(t / "pareto.csv"),
                          "--latency-figure", str(f / "pareto_latency.png")]) == 2
    assert analysis_main(["pareto", "--table", str(t / "all.csv"), "--csv", str(t / "pareto.csv"),
                          "--md", str(t / "pareto.md"), "--kv-figure", str(f / "pareto_kv.png"),
                          "--latency-figure", str(f / "pareto_latency.png"), "--bench", *map(str, bench)]) == 0
    assert analysis_main(["figure3", "--table", str(t / "all.csv"), "--out", str(f / "figure3.png"),
                          "--csv", str(t / "f3.csv"), "--md", str(t / "f3.md")]) == 0
    assert analysis_main(["perf", "--table", str(t / "all.csv"), "--bench", *map(str, bench), "--csv",
                          str(t / "perf.csv"), "--md", str(t / "perf.md"), "--figure", str(f / "perf.png")]) == 0
    ti = {"positions": list(range(63)), "delta_pct": [0.01 * (i % 7) for i in range(63)], "base_ppl": 8.1,
          "family": "llama3", "text_set": "stdlib", "split": "test"}
    (tmp_path / "ti.json").write_text(json.dumps(ti))
    assert analysis_main(["figure1", "--json", str(tmp_path / "ti.json"), "--out", str(f / "figure1.png")]) == 0
    timing = {"mean": 50.0, "p50": 50.0, "p90": 55.0, "std": 1.0}
    over = {"budget": 0.5, "rows": [
        {"model": "llama3.2-1b", "source": "paper config, meta device", "method": m, "params": p,
         "kv_bytes_per_token": kv, "kv_bytes_per_token_paper_index": kv, "base_kv_bytes_per_token": 65536.0,
         "decode_tokens_per_s": None, "prefill_ms": None, "device": None}
        for m, p, kv in (("gqa", 1.22e9, 32768.0), ("mixsga", 1.24e9, 32772.0))] + [
        {"model": "tiny:llama3", "source": "random", "method": m, "params": 1e6, "kv_bytes_per_token": 512.0,
         "decode_tokens_per_s": timing, "prefill_ms": timing, "device": "cpu: x"} for m in ("gqa", "mixsga")],
        "throughput": [{"model": "tiny:llama3", "mixsga_vs_gqa": 0.95}],
        "paper_reported": {"table9": {"params": {"gqa": {"llama3.2-1b": "1.22b"}}}}}
    (tmp_path / "over.json").write_text(json.dumps(over))
    assert analysis_main(["table9", "--json", str(tmp_path / "over.json"), "--csv", str(t / "t9.csv"),
                          "--md", str(t / "t9.md")]) == 0
    assert analysis_main(["plot-perplexity", "--table", str(t / "all.csv"), "--out", str(f / "ppl.png")]) == 0
    for png in f.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert len(list(f.glob("*.png"))) == 6
    front = pd.read_csv(t / "pareto.csv")
    assert set(front["axis"]) == {"kv", "latency"} and "base" in set(front["method"])
    assert "1.220 M" not in (t / "t9.md").read_text() and "1220.000 M" in (t / "t9.md").read_text()
    assert "## cpu: test cpu" in (t / "perf.md").read_text()
    assert analysis_main(["figure1", "--json", str(tmp_path / "missing.json"), "--out", "x.png"]) == 2
    assert analysis_main(["table", "--table", str(t / "all.csv"), "--experiment", "nope", "--csv", "a", "--md",
                          "b"]) == 2
    assert "error:" in capsys.readouterr().err


def test_perf_reads_the_benchmark_and_never_mixes_devices(grid):
    from analysis.reports import perf_table

    records = synthetic_records()
    bench = synthetic_bench(records) + synthetic_bench(records, device="cuda: H100", contexts=(512,))
    summary, texts = perf_table(grid, bench)
    assert set(texts) == {"cpu: test cpu", "cuda: H100"}
    assert summary.groupby(["family", "method", "budget_nominal", "device", "context_len"]).size().max() == 1
    assert set(summary[summary["device"] == "cuda: H100"]["context_len"]) == {512}
    # labels and realized bytes come from the timed run's record (seed 0), ratios from the benchmark
    gqa = summary[(summary["method"] == "gqa") & (summary["family"] == "llama3") & (summary["context_len"] == 64)
                  & (summary["device"] == "cpu: test cpu")].iloc[0]
    assert gqa["run_id"].endswith("__s0") and gqa["kv_bytes_per_token"] == pytest.approx(
        grid.set_index("run_id").loc[gqa["run_id"], "kv_bytes_per_token"])
    assert gqa["decode_ratio"] == pytest.approx(1.2 / 1.0) and gqa["decode_ratio_cv"] == pytest.approx(0.0, abs=1e-12)
    assert gqa["decode_tps_cv"] > 0.05  # the drift is in the raw samples, not in the ratio
    assert "| 1.200 |" in texts["cpu: test cpu"] and "0.0 %" in texts["cpu: test cpu"]
    # a variant column tells apart two runs of one method at one budget (e.g. a straight-through router)
    assert "| family | context | method | variant | ratio |" in texts["cpu: test cpu"]
    # the runs' own timings are not read: a record's tokens/s never reaches the table
    assert not set(summary["decode_tps"]) & set(grid["decode_tps_mean"].dropna())
    with pytest.raises(ValueError, match="without a record"):
        perf_table(grid[grid["method"] != "gqa"], bench)


def test_latency_front_uses_the_benchmark_at_the_longest_context(grid):
    from analysis.pareto import pareto_fronts

    fronts = pareto_fronts(grid, "ppl_token", "main", bench=synthetic_bench(synthetic_records()))
    latency = fronts[fronts["axis"] == "latency"]
    assert set(latency["device"]) == {"cpu: test cpu"} and set(latency["context_len"]) == {128}
    kv = fronts[fronts["axis"] == "kv"]
    # every configuration of the main grid has a benchmark cost, and its quality is the mean over seeds
    assert len(latency) == len(kv)
    base = latency[(latency["method"] == "base") & (latency["family"] == "llama3")].iloc[0]
    assert base["cost"] == pytest.approx(1000 / 300) and base["seeds"] == 3
    assert "latency" not in set(pareto_fronts(grid, "ppl_token", "main")["axis"])


def _sft_record(family: str, method: str, params, seed: int, by_set: dict, profile: str) -> dict:
    record = make_run(family=family, method=method, budget=0.5, seed=seed, experiments=("table1_sft",),
                      params=params, training="sft", ppl=None, rouge=next(iter(by_set.values())),
                      run_id=f"{family}__sft__{method}{'-r' if params else ''}__kv50__s{seed}")
    record["identity"]["config"]["profile"] = profile
    record["quality"]["rouge_by_set"] = {n: {"rouge_l": v, "gen_length": 10.0, "rows": 20} for n, v in by_set.items()}
    return record


def test_table1_columns_and_footnote_follow_the_records_sets():
    sets = ("dolly", "self_instruct", "vicuna", "sni", "unnatural")
    paper_runs = []
    for seed in (0, 1):
        paper_runs.append(_sft_record("opt", "gqa", None, seed, dict(zip(sets, (20, 10, 12, 14, 16))), "paper"))
        paper_runs.append(_sft_record("opt", "mixsga", mixsga_params((1, 1, 2)), seed,
                                      dict(zip(sets, (21, 13, 13, 15, 18))), "paper"))
    summary, md = experiment_table(records_table(paper_runs), "table1_sft")
    for label in ("ROUGE-L DL (x100)", "ROUGE-L SI (x100)", "ROUGE-L UN (x100)", "avg ROUGE-L (x100)"):
        assert label in md
    assert "Ours (paper profile)" in md and "offline" not in md
    mix = summary[summary["arch"] == "mixsga"].iloc[0]
    # the delta against GQA is on the five-set average (16.0 vs 14.4), the paper's average beside it
    assert mix["rouge_l_avg"] == pytest.approx(16.0) and mix["delta vs GQA (ours)"] == pytest.approx(1.6)
    offline_runs = [_sft_record("opt", "gqa", None, 0, {"offline": 20.0}, "offline")]
    _, md = experiment_table(records_table(offline_runs), "table1_sft")
    assert "ROUGE-L (x100)" in md and "ROUGE-L DL" not in md and "Ours (offline profile)" in md
    assert "offline = the instruct set built here" in md


def test_zero_shot_average_counts_each_task_once():
    row = flatten(make_run(zeroshot={"arc_easy": 0.5, "arc_easy_norm": 0.25, "piqa": 0.7, "piqa_norm": 0.9}))
    assert row["zs_avg"] == pytest.approx(0.6) and row["zs_arc_easy_norm"] == 0.25


# ---- paired differences -----------------------------------------------------------------------------

def test_paired_difference_matches_hand_computation():
    # differences 2, 3, 4: mean 3, sd 1, t_{0.975, 2} = 4.30265272975 -> half width 2.484138
    got = paired_difference([12.0, 23.0, 34.0], [10.0, 20.0, 30.0])
    half = 4.30265272975 * 1.0 / math.sqrt(3.0)
    assert (got.mean, got.n, got.source) == (3.0, 3, "seeds")
    assert got.lo == pytest.approx(3.0 - half, rel=1e-9) and got.hi == pytest.approx(3.0 + half, rel=1e-9)
    assert got.significant and format_delta(got, reference=20.0) == "+3.00 ± 2.48 (+15.0 %) †"
    # pairing is what resolves it: the unpaired intervals of the two columns overlap widely
    assert mean_ci([12.0, 23.0, 34.0])[1] > 20
    wide = paired_difference([12.0, 27.0], [10.0, 20.0])  # differences 2, 7: t_{0.975,1} = 12.7062
    assert wide.hi - wide.mean == pytest.approx(12.706204736 * math.sqrt(12.5) / math.sqrt(2), rel=1e-9)
    assert not wide.significant and "†" not in format_delta(wide)
    one = paired_difference([5.0], [4.0])
    assert (one.source, one.n, format_delta(one)) == ("none", 1, "+1.00")
    with pytest.raises(ValueError, match="2 values but 1 references"):
        paired_difference([1.0, 2.0], [1.0])


def _windows(rng: random.Random, n: int, shift: float, difficulty: list[float]) -> tuple[list[float], list[int]]:
    """Per-window NLL sums of 64 tokens whose per-token NLL is the window's difficulty + shift + noise."""
    return [64 * (difficulty[i] + shift + rng.gauss(0, 0.01)) for i in range(n)], [64] * n


def test_bootstrap_is_deterministic_and_paired():
    rng = random.Random(3)
    diff = [rng.uniform(3.0, 5.0) for _ in range(40)]  # windows differ far more than the methods do
    a, tokens = _windows(rng, 40, 0.02, diff)
    b, _ = _windows(rng, 40, 0.0, diff)
    one, two = bootstrap_ppl_difference(a, tokens, b, tokens), bootstrap_ppl_difference(a, tokens, b, tokens)
    assert one == two and one.source == "windows" and one.n == 40
    assert one.mean == pytest.approx(math.exp(sum(a) / sum(tokens)) - math.exp(sum(b) / sum(tokens)))
    assert one.lo < one.mean < one.hi and one.significant  # paired: the window difficulty cancels
    assert bootstrap_ppl_difference(a, tokens, b, tokens, seed=1) != one  # the seed is what fixes it
    with pytest.raises(ValueError, match="same windows"):
        bootstrap_ppl_difference(a, tokens, b[:-1], tokens[:-1])
    with pytest.raises(ValueError, match="same windows"):
        bootstrap_ppl_difference(a, tokens, b, [65] + tokens[1:])


def test_bootstrap_covers_the_true_difference():
    """Simulated: windows drawn from a known population; the 95 % interval covers the truth ~95 % of the time."""
    rng = random.Random(11)
    shift, covered, trials = 0.03, 0, 200
    # population: per-token NLL of the reference uniform on [3, 5] per window; the method adds `shift`
    # (+ window noise of mean 0): the true per-token NLLs are 4 and 4 + shift
    truth = math.exp(4.0 + shift) - math.exp(4.0)
    for _ in range(trials):
        difficulty = [rng.uniform(3.0, 5.0) for _ in range(60)]
        a, tokens = _windows(rng, 60, shift, difficulty)
        b, _ = _windows(rng, 60, 0.0, difficulty)
        got = bootstrap_ppl_difference(a, tokens, b, tokens)
        covered += got.lo <= truth <= got.hi
    # 0.925 measured (percentile intervals run a little short at 60 windows); an unpaired or
    # too-wide interval would cover every time, a too-narrow one far less often
    assert 0.88 <= covered / trials <= 0.99


def test_tables_show_paired_delta_with_seed_ci(grid):
    main, md = experiment_table(grid, "main")
    row = main[(main["family"] == "llama3") & (main["method"] == "mixsga") & (main["budget_nominal"] == 0.5)].iloc[0]
    runs = grid.set_index("run_id")["ppl_token"]
    diffs = [runs[f"llama3__mixsga__kv50__s{s}"] - runs[f"llama3__gqa__kv50__s{s}"] for s in (0, 1, 2)]
    mean, half, n = mean_ci(diffs)
    assert (row["delta"], row["delta_n"], row["delta_source"], row["delta_ref"]) == (
        pytest.approx(mean), 3, "seeds", "GQA 50 %")
    assert row["delta_lo"] == pytest.approx(mean - half) and row["delta_hi"] == pytest.approx(mean + half)
    h2o = main[(main["family"] == "llama3") & (main["method"] == "h2o")].iloc[0]
    assert h2o["delta_ref"] == "base" and h2o["delta_significant"]  # eviction vs the base model
    base = main[(main["family"] == "llama3") & (main["method"] == "base")].iloc[0]
    assert base["delta_ref"] == "reference" and math.isnan(base["delta"])
    mqa = main[(main["family"] == "llama3") & (main["method"] == "mqa")].iloc[0]
    assert mqa["delta_ref"] == "no reference run (GQA 25 %)" and mqa["delta_n"] == 0
    assert "Δ vs ref" in md and "3 seed pairs, t" in md and "†" in md and "GQA at the same nominal budget" in md
    t3, _ = experiment_table(grid, "table3_eviction_stack")
    mix = t3[(t3["keep"] == 0.4) & (t3["arch"] == "mixsga")].iloc[0]
    ref = grid.set_index("run_id")
    d3 = [ref.loc[f"tinyllama__h2o+mixsga__kv20__s{s}", "ppl_token"] - ref.loc[f"tinyllama__h2o+gqa__kv20__s{s}",
                                                                                "ppl_token"] for s in (0, 1, 2)]
    assert mix["delta"] == pytest.approx(sum(d3) / 3) and mix["delta_ref"] == "GQA, same keep"
    assert mix["delta vs GQA (ours)"] == pytest.approx(mix["delta"])


def test_stacked_eviction_is_paired_with_its_inner_model():
    params = {"inner": mixsga_params((3, 1, 6)), "inner_budget": 0.5, "eviction": {"method": "h2o", "keep": 0.4}}
    recs = []
    for seed in (0, 1):
        recs.append(make_run(method="mixsga", budget=0.5, seed=seed, params=mixsga_params((3, 1, 6)), ppl=40.0 + seed))
        recs.append(make_run(method="mixsga", budget=0.5, seed=seed, params=mixsga_params((1, 1, 2)), ppl=90.0,
                             run_id=f"llama3__mixsga112__kv50__s{seed}"))
        recs.append(make_run(method="h2o+mixsga", budget=0.2, seed=seed, params=params, ppl=43.0 + 2 * seed))
    main, _ = experiment_table(records_table(recs), "main")
    stacked = main[main["method"] == "h2o+mixsga"].iloc[0]
    # the 3:1:6 model without eviction, not the 1:1:2 one: differences 3 and 4
    assert stacked["delta"] == pytest.approx(3.5) and stacked["delta_ref"] == "mixSGA, no eviction"


def test_single_seed_table_uses_the_window_bootstrap():
    rng = random.Random(5)
    difficulty = [rng.uniform(3.0, 5.0) for _ in range(32)]
    recs = []
    for method, budget, shift in (("base", 1.0, 0.0), ("gqa", 0.5, 0.05), ("mixsga", 0.5, 0.03), ("cla", 0.5, 0.06)):
        nll, tokens = _windows(random.Random(method), 32, shift, difficulty)
        recs.append(make_run(method=method, budget=budget, params=mixsga_params((3, 1, 6)) if method == "mixsga" else {},
                             ppl=math.exp(sum(nll) / sum(tokens)), windows=(nll, tokens)))
    table = records_table(recs)
    main, md = experiment_table(table, "main")
    mix = main[main["method"] == "mixsga"].iloc[0]
    rows = table.set_index("method")
    want = bootstrap_ppl_difference(json.loads(rows.loc["mixsga", "ppl_window_nll"]),
                                    json.loads(rows.loc["mixsga", "ppl_window_tokens"]),
                                    json.loads(rows.loc["gqa", "ppl_window_nll"]),
                                    json.loads(rows.loc["gqa", "ppl_window_tokens"]))
    assert (mix["delta_source"], mix["delta_n"]) == ("windows", 32)
    assert (mix["delta"], mix["delta_lo"], mix["delta_hi"]) == (want.mean, want.lo, want.hi)
    assert mix["delta_significant"] == want.significant and mix["delta"] < 0
    assert "1 seed pair, bootstrap over 32 windows" in md and "[" in md
    assert experiment_table(table, "main")[1] == md  # deterministic
    # a reference scored on other windows: the point difference stays, no interval
    other = [*recs[:1], make_run(method="gqa", budget=0.5, ppl=60.0, windows=([1.0] * 4, [8] * 4)), recs[2]]
    mixed, _ = experiment_table(records_table(other), "main")
    got = mixed[mixed["method"] == "mixsga"].iloc[0]
    assert got["delta_source"] == "none" and math.isnan(got["delta_lo"]) and got["delta"] == pytest.approx(
        mix["ppl_token"] - 60.0)


def test_a_quantized_cache_is_paired_with_its_unquantized_model():
    """kvquant+mixsga (mixSGA 3:1:6 weights): the plain mixSGA 3:1:6 run, not GQA at 12.5 % nor another mixSGA."""
    quant_params = {"inner": mixsga_params((3, 1, 6)), "inner_budget": 0.5,
                    "quant": {"bits": 4, "group_size": 8, "residual": 0}}
    recs = []
    for seed in (0, 1):
        recs.append(make_run(method="mixsga", budget=0.5, seed=seed, params=mixsga_params((3, 1, 6)), ppl=40.0 + seed))
        recs.append(make_run(method="mixsga", budget=0.5, seed=seed, params=mixsga_params((1, 1, 2)), ppl=90.0,
                             run_id=f"llama3__mixsga112__kv50__s{seed}"))
        recs.append(make_run(method="kvquant+mixsga", budget=0.125, seed=seed, params=quant_params,
                             ppl=41.0 + 2 * seed))
        recs.append(make_run(method="base", budget=1.0, seed=seed, ppl=30.0))
        recs.append(make_run(method="kvquant", budget=0.25, seed=seed, ppl=33.0 + seed,
                             params={"quant": {"bits": 4, "group_size": 8, "residual": 0}}))
    main, md = experiment_table(records_table(recs), "main")
    quant = main[main["method"] == "kvquant+mixsga"].iloc[0]
    assert quant["delta"] == pytest.approx(1.5) and quant["delta_ref"] == "mixSGA, not quantized"  # 1 and 2
    on_base = main[main["method"] == "kvquant"].iloc[0]
    assert on_base["delta"] == pytest.approx(3.5) and on_base["delta_ref"] == "base, not quantized"
    assert "unquantized cache for KV-cache quantization" in md


# ---- recovery curves -------------------------------------------------------------------------------

def curve_record(family: str, method: str, budget: float, seed: int, losses: list[float], *,
                 params=None, explicit=None, run_id=None, tokens_per_point: int = 1024) -> dict:
    """A CPT record whose training summary carries a held-out curve of ``losses`` at even token counts.

    ``params``: the resolved params; ``explicit``: the grid entry's (an ablation's) params.
    """
    rec = make_run(family=family, method=method, budget=budget, seed=seed, params=params,
                   run_id=run_id or f"{family}__cpt__{method}__kv{round(100 * budget)}__s{seed}")
    rec["identity"]["config"]["params"] = dict(explicit or {})
    steps = len(losses) - 1
    rec["identity"]["training_summary"] = {
        "train_id": rec["identity"]["run_id"], "recipe": "cpt_offline", "steps": steps,
        "tokens": steps * tokens_per_point, "target_tokens": steps * tokens_per_point, "token_hash": "ab" * 32,
        "final_loss": losses[-1], "final_loss_avg": losses[-1], "aux_loss_final": None, "agreement_final": None,
        "precision": "fp32", "wall_time_s": 1.0, "curve_time_s": 0.1,
        "curve": [{"step": i, "tokens": i * tokens_per_point, "loss": l, "ppl": math.exp(l)}
                  for i, l in enumerate(losses)]}
    return rec


def test_recovery_curves_from_records(tmp_path):
    from analysis.curves import last_quarter_change, load_curves, recovery_table

    flat = [7.0, 6.0, 5.5, 5.3, 5.20, 5.19, 5.185, 5.182, 5.18]  # last quarter (points 6 to 8): -0.1 %
    moving = [7.0, 6.5, 6.0, 5.8, 5.6, 5.4, 5.2, 5.0, 4.8]  # 5.2 -> 4.8, -7.7 %
    records = tmp_path / "records"
    for seed in (0, 1):
        shift = 0.01 * seed
        for rec in (curve_record("llama3", "gqa", 0.5, seed, [l + shift for l in flat]),
                    curve_record("llama3", "mixsga", 0.5, seed, [l + shift for l in moving],
                                 params=mixsga_params((3, 1, 6))),
                    curve_record("llama3", "base", 1.0, seed, [l - 1 for l in flat]),
                    curve_record("tinyllama", "mqa", 0.25, seed, moving),
                    # not compared: another budget, an eviction method, an ablation (explicit params)
                    curve_record("llama3", "cla", 0.25, seed, moving, params={"share": 4}),
                    curve_record("llama3", "h2o", 0.5, seed, moving, params={"keep": 0.5}),
                    curve_record("llama3", "mixsga", 0.5, seed, moving, explicit={"router_grad": "straight_through"},
                                 run_id=f"llama3__cpt__mixsga-st__kv50__s{seed}")):
            write_record(records / f"{rec['identity']['run_id']}.json", rec)
    points = load_curves([records])
    assert set(zip(points["family"], points["method"])) == {("llama3", "gqa"), ("llama3", "mixsga"),
                                                           ("llama3", "base"), ("tinyllama", "mqa")}
    table = recovery_table(points).set_index(["family", "method"])
    gqa = table.loc[("llama3", "gqa")]
    assert gqa["status"] == "plateaued" and gqa["seeds"] == 2 and gqa["tokens"] == 8 * 1024
    assert gqa["ppl_final"] == pytest.approx(math.exp(5.185))  # seed-mean loss of 5.18 and 5.19
    assert gqa["loss_change_last_quarter"] == pytest.approx((5.185 - 5.19) / 5.19)  # from 6 of 8 points to the end
    assert table.loc[("llama3", "mixsga"), "status"] == "moving"
    assert table.loc[("tinyllama", "mqa"), "loss_change_last_quarter"] == pytest.approx((4.8 - 5.2) / 5.2)
    assert table.loc[("llama3", "base"), "ppl_step0"] == pytest.approx(math.exp(6.0))
    # between curve points the start of the last quarter is interpolated
    assert last_quarter_change([0, 10, 20], [3.0, 2.0, 1.0]) == pytest.approx((1.0 - 1.5) / 1.5)

    t, f = tmp_path / "tables", tmp_path / "figures"
    assert analysis_main(["recovery", str(records), "--csv", str(t / "recovery_curves.csv"),
                          "--md", str(t / "recovery_curves.md"), "--figure", str(f / "recovery_curves.png")]) == 0
    assert (f / "recovery_curves.png").stat().st_size > 10_000
    md = (t / "recovery_curves.md").read_text()
    assert "plateaued" in md and "moving" in md and "-0.10%" in md
    assert len(pd.read_csv(t / "recovery_curves.csv")) == 4


def test_recovery_curves_refuse_a_compared_run_without_curve(tmp_path, capsys):
    rec = curve_record("llama3", "gqa", 0.5, 0, [6.0, 5.0])
    rec["identity"]["training_summary"].pop("curve")
    write_record(tmp_path / "r.json", rec)
    assert analysis_main(["recovery", str(tmp_path / "r.json"), "--csv", str(tmp_path / "c.csv"),
                          "--md", str(tmp_path / "c.md"), "--figure", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "llama3__cpt__gqa__kv50__s0" in err and "curve.points" in err
    assert not (tmp_path / "c.png").exists()


def test_sft_tables_print_the_trivial_reference_beside_them(tmp_path):
    records = tmp_path / "records"
    for rec in synthetic_records(seeds=(0, 1)):
        write_record(records / f"{rec['identity']['run_id']}.json", rec)
    t = tmp_path / "tables"
    assert analysis_main(["collate", str(records), "--all-csv", str(t / "all.csv")]) == 0
    ref = {"set": "offline", "split": "test", "rows": 32, "rouge_l": 7.25,
           "predictor": "the function's name split into words", "rouge_impl": "x", "examples": []}
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    assert analysis_main(["table", "--table", str(t / "all.csv"), "--experiment", "table1_sft", "--csv",
                          str(t / "t1.csv"), "--md", str(t / "t1.md"), "--reference", str(tmp_path / "ref.json")]) == 0
    md = (t / "t1.md").read_text()
    assert "Trivial reference" in md and "offline:test (32 rows): ROUGE-L 7.25 with the function's name" in md
    csv = pd.read_csv(t / "t1.csv")
    assert (csv["rouge_l_trivial_offline"] == 7.25).all()
    # without one the table is as before
    assert analysis_main(["table", "--table", str(t / "all.csv"), "--experiment", "table1_sft", "--csv",
                          str(t / "t0.csv"), "--md", str(t / "t0.md")]) == 0
    assert "Trivial" not in (t / "t0.md").read_text() and md.startswith((t / "t0.md").read_text().rstrip("\n"))

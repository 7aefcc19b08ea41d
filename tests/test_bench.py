"""The cost benchmark (harness.measurement.bench): per-round ratios and CVs, contexts, and one real job on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.measurement.bench import cv, main, ratio_rows, resolve_contexts
from harness.orchestration.config import ConfigError, bench_runs, bench_spec, run_spec, run_table, validate_config


def _entries(*methods: str) -> dict:
    return {m: {"run_id": f"r_{m}", "method": m, "budget": 1.0 if m == "base" else 0.5, "params": {},
                "weights_bytes": 1000} for m in methods}


def test_ratios_are_taken_per_pair_so_common_drift_cancels():
    # the machine slows down by 2x over the rounds; gqa is always 1.25x its lockstep base's throughput
    speed = [100.0, 150.0, 200.0, 250.0, 300.0]
    samples = {"base": [{"prefill_ms": 10.0 * 100 / s, "decode_tokens_per_s": s, "kv_live_bytes": 400.0}
                        for s in speed],
               "gqa": [{"prefill_ms": 8.0 * 100 / s, "decode_tokens_per_s": 1.25 * s, "kv_live_bytes": 200.0}
                       for s in speed]}
    pairs = {name: list(zip(got, samples["base"])) for name, got in samples.items()}
    rows = {r["method"]: r for r in ratio_rows(pairs, _entries("base", "gqa"), context_len=64, new_tokens=8,
                                               device_type="cpu")}
    gqa, base = rows["gqa"], rows["base"]
    assert gqa["decode_tokens_per_s_ratio"]["median"] == pytest.approx(1.25)
    assert gqa["decode_tokens_per_s_ratio"]["cv"] == pytest.approx(0.0, abs=1e-12)
    assert gqa["prefill_ms_ratio"]["median"] == pytest.approx(0.8)
    # the raw samples carry the drift: their CV is large, the ratio's is not
    assert gqa["decode_tokens_per_s"]["cv"] == pytest.approx(cv([1.25 * s for s in speed])) and \
        gqa["decode_tokens_per_s"]["cv"] > 0.3
    # CPU memory: weights + live K/V; the base is its own reference
    assert gqa["peak_memory_bytes"]["p50"] == 1200.0 and gqa["peak_memory_bytes_ratio"]["median"] == pytest.approx(
        1200 / 1400)
    assert base["decode_tokens_per_s_ratio"] == {"median": 1.0, "mean": 1.0, "cv": 0.0, "n": 5, "se_rel": 0.0}
    assert gqa["decode_ms_per_token"] == pytest.approx(1000 / (1.25 * 200.0))
    assert gqa["memory_source"] == "weights + live K/V" and gqa["run_id"] == "r_gqa"
    with pytest.raises(ValueError, match="'base'"):
        ratio_rows({"gqa": pairs["gqa"]}, _entries("gqa"), context_len=64, new_tokens=8, device_type="cpu")


def test_cv_and_contexts():
    assert cv([1.0]) == 0.0 and cv([1.0, 1.0, 1.0]) == 0.0
    assert cv([9.0, 11.0]) == pytest.approx(2 ** 0.5 / 10)
    # "window": the model's longest window, cut to leave room for the generated tokens
    assert resolve_contexts([512, "window"], window=1024, positions=2048, new_tokens=32) == [512, 1024]
    assert resolve_contexts([512, "window"], window=1024, positions=1024, new_tokens=32) == [512, 992]
    assert resolve_contexts([512, "window"], window=256, positions=None, new_tokens=32) == [256, 512]
    assert resolve_contexts([512, "window"], window=512, positions=2048, new_tokens=32) == [512]


def test_step_clock_times_the_cached_steps_inside_one_generation():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.measurement.generation import StepClock, generate_exactly
    from harness.measurement.measure import time_generation

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()
    prompt = torch.randint(1, 64, (1, 12))
    clock = StepClock().begin()
    out = generate_exactly(model, prompt, 5, logits_processor=clock.processors())
    # one stamp per new token (the first right after the prefill's forward); stamps are ordered
    assert len(clock.stamps) == 5 and clock.stamps == sorted(clock.stamps)
    assert clock.first_token_seconds > 0 and clock.decode_seconds > 0
    # the clock changes nothing: the same tokens as without it
    assert torch.equal(out.sequences, generate_exactly(model, prompt, 5).sequences)
    one = StepClock().begin()
    generate_exactly(model, prompt, 1, logits_processor=one.processors())
    with pytest.raises(RuntimeError, match="at least 2"):
        one.decode_seconds
    with pytest.raises(RuntimeError, match="did not run"):
        StepClock().first_token_seconds

    def generate(n, **kwargs):
        return generate_exactly(model, prompt, n, **kwargs)

    got = time_generation(generate, new_tokens=4, device="cpu", repeats=3, warmup=0)
    tps = got["decode_tokens_per_s"]
    assert 0 < tps["min"] <= tps["p90"] < 1e7 and tps["n"] == 3  # real steps, never a clamped near-zero difference


def test_lockstep_alternates_steps_and_each_clock_leaves_out_the_others_time():
    import time

    import torch

    from harness.measurement.generation import lockstep

    log = []

    def run(name, pause, steps=4):
        def go(clock):
            clock.begin()
            for i in range(steps):
                time.sleep(pause)
                log.append((name, i))
                clock(None, torch.zeros(1))
            return clock
        return go

    t0 = time.perf_counter()
    fast, slow = lockstep([run("fast", 0.001), run("slow", 0.03)])
    wall = time.perf_counter() - t0
    # prefill of one, prefill of the other, then one step each in turn
    assert log == [(n, i) for i in range(4) for n in ("fast", "slow")]
    # each clock runs only while its generation holds the turn: the slow one's sleeps are not the fast one's
    assert wall > 0.1 and fast.first_token_seconds + fast.decode_seconds < 0.05
    assert slow.decode_seconds > 0.08
    # unequal lengths: the longer one goes on alone once the other has finished
    log.clear()
    lockstep([run("a", 0, 1), run("b", 0, 3)])
    assert log == [("a", 0), ("b", 0), ("b", 1), ("b", 2)]


def test_lockstep_reraises_a_failure_without_hanging():
    import torch

    from harness.measurement.generation import lockstep

    def good(clock):
        clock.begin()
        for _ in range(3):
            clock(None, torch.zeros(1))
        return "ok"

    def bad(clock):
        clock.begin()
        clock(None, torch.zeros(1))
        raise ValueError("broken cache")

    with pytest.raises(ValueError, match="broken cache"):
        lockstep([good, bad])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A corpus of a few stdlib modules, a 300-token BPE, a random tiny Llama and a main grid with CPT checkpoints."""
    import email
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from harness.data.corpus import build_corpus
    from harness.data.tokenizer import train_tokenizer
    from harness.models.zoo import build_config
    from harness.orchestration.config import train_table
    from harness.orchestration.run import execute_train

    root = tmp_path_factory.mktemp("bench")
    shutil.copytree(Path(email.__file__).parent, root / "src" / "email", ignore=shutil.ignore_patterns("__pycache__"))
    corpus = root / "corpus"
    build_corpus(corpus, val_fraction=0.3, test_fraction=0.3, source_dir=root / "src")
    tokenizer = train_tokenizer(corpus, root / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("llama3", "tiny", tokenizer))
    model.save_pretrained(root / "llama3")
    tokenizer.save_pretrained(root / "llama3")
    cfg = validate_config({
        "models": [{"name": "llama3", "family": "llama3", "size": "tiny"}],
        "seeds": [3, 1],
        "pretrain": {"seq_len": 32},
        "eval": {"seq_len": 40, "batch_size": 4, "max_tokens": 300, "cache_tokens": 12},
        "training": {"cpt": {"overrides": {"total_tokens": 64, "batch_size": 2, "micro_batch_size": 2,
                                           "seq_len": 32, "checkpoint_every": 1}}},
        "measure": {"context_lengths": [12], "new_tokens": 4, "repeats": 5, "warmup": 0},
        "perf": {"context_lengths": [24, "window"], "new_tokens": 4, "repeats": 5, "warmup": 1},
        "experiments": {"main": {"training": "cpt", "runs": [
            {"method": "base"}, {"method": "gqa", "budgets": [0.5]}, {"method": "mixsga", "budgets": [0.5]},
            {"method": "h2o", "budgets": [0.5]}]}},
    })
    rows = run_table(cfg)
    work = root / "work"
    trains = train_table(cfg, rows)
    seed, mine = bench_runs(rows, "llama3")
    for train_id in sorted({r["train_id"] for r in mine}):
        execute_train(trains[train_id], work / "trained" / train_id, model_path=root / "llama3", corpus_dir=corpus)
    return {"root": root, "corpus": corpus, "model": root / "llama3", "cfg": cfg, "rows": rows, "work": work,
            "seed": seed, "mine": mine}


def test_spec_times_the_first_seeds_checkpoints(tiny):
    spec = bench_spec(tiny["cfg"], "llama3", tiny["rows"], tiny["work"])
    assert tiny["seed"] == 1 and spec["seed"] == 1
    assert [r["run_id"] for r in spec["runs"]] == [r["run_id"] for r in tiny["mine"]]
    assert {r["method"] for r in spec["runs"]} == {"base", "gqa", "mixsga", "h2o"}
    # h2o runs on the CPT'd base: the same checkpoint
    trained = {r["method"]: r["trained"] for r in spec["runs"]}
    assert trained["h2o"] == trained["base"] and trained["gqa"] != trained["base"]
    assert all(r["training"] == run_spec(tiny["cfg"], r["run_id"], tiny["rows"])["training"] for r in spec["runs"])
    # the longest configured window: eval.seq_len 40 beats pretrain.seq_len 32
    assert spec["window"] == 40 and spec["bench"]["context_lengths"] == [24, "window"]
    with pytest.raises(ConfigError, match="'nope'"):
        bench_spec(tiny["cfg"], "nope", tiny["rows"], tiny["work"])


def test_benchmark_job_writes_ratios_and_cvs_and_the_perf_table_reads_them(tiny, tmp_path, capsys):
    from analysis.reports import perf_table, write_perf

    spec = bench_spec(tiny["cfg"], "llama3", tiny["rows"], tiny["work"])
    out = tmp_path / "perf" / "llama3.json"
    assert main(["--spec", json.dumps(spec), "--model", str(tiny["model"]), "--corpus", str(tiny["corpus"]),
                 "--code", "abc", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == 1 and data["model"] == "llama3" and data["family"] == "llama3" and data["seed"] == 1
    assert data["code"] == "abc" and data["device"].startswith("cpu: ") and data["reference"] == "base"
    assert data["protocol"]["contexts"] == [24, 40] and data["protocol"]["repeats"] == 5
    assert data["protocol"]["group"] == spec["bench"]["group"] == 3  # the schema's default
    rows = data["rows"]
    assert len(rows) == 4 * 2 and {(r["method"], r["context_len"]) for r in rows} == {
        (m, n) for m in ("base", "gqa", "mixsga", "h2o") for n in (24, 40)}
    for row in rows:
        # every round runs the 3 other methods in groups of `group`, each beside a fresh base generation
        n = 5 * -(-3 // spec["bench"]["group"]) if row["method"] == "base" else 5
        for metric in ("prefill_ms", "decode_tokens_per_s", "peak_memory_bytes"):
            assert row[metric]["n"] == n and row[metric]["p50"] > 0 and 0 <= row[metric]["cv"] < 10
            ratio = row[f"{metric}_ratio"]
            assert ratio["n"] == n and ratio["median"] > 0
            assert ratio["se_rel"] == pytest.approx(ratio["cv"] / n ** 0.5)
        if row["method"] == "base":
            assert row["decode_tokens_per_s_ratio"]["median"] == 1.0 and row["prefill_ms_ratio"]["cv"] == 0.0
    by = {(r["method"], r["context_len"]): r for r in rows}
    # the base's live cache: (context + 3 stored new tokens) x 2 (K, V) x 4 layers x 4 heads x 16 dims x 4 bytes
    assert by[("base", 40)]["kv_live_bytes"] == (40 + 3) * 2 * 4 * 4 * 16 * 4
    # GQA at 50 % stores half the K/V and has half the K/V projections: less memory than the base
    assert by[("gqa", 40)]["kv_live_bytes"] == by[("base", 40)]["kv_live_bytes"] / 2
    assert by[("gqa", 40)]["peak_memory_bytes_ratio"]["median"] < 1.0
    assert by[("h2o", 40)]["weights_bytes"] == by[("base", 40)]["weights_bytes"]

    summary, texts = perf_table(None, out)
    assert set(texts) == {data["device"]} and len(summary) == 8
    assert "decode × base" in texts[data["device"]] and "largest here" in texts[data["device"]]
    csv, md, png = tmp_path / "perf.csv", tmp_path / "perf.md", tmp_path / "perf.png"
    write_perf(None, [out], csv=csv, md=md, figure=png)
    assert png.read_bytes()[:4] == b"\x89PNG" and "context" in md.read_text()


def test_benchmark_refuses_a_grid_without_base(tiny, tmp_path, capsys):
    spec = bench_spec(tiny["cfg"], "llama3", tiny["rows"], tiny["work"])
    spec["runs"] = [r for r in spec["runs"] if r["method"] != "base"]
    assert main(["--spec", json.dumps(spec), "--model", str(tiny["model"]), "--corpus", str(tiny["corpus"]),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "exactly one 'base' run" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_a_grid_without_base_is_timed_against_the_untrained_base_model():
    cfg = validate_config({"models": [{"name": "llama3", "family": "llama3", "size": "tiny"}],
                           "experiments": {"main": {"training": "cpt", "runs": [{"method": "gqa", "budgets": [0.5]}]}}})
    rows = run_table(cfg)
    spec = bench_spec(cfg, "llama3", rows, "work")
    assert [r["method"] for r in spec["runs"]] == ["base", "gqa"]
    assert spec["runs"][0] == {"run_id": None, "method": "base", "budget": 1.0, "params": {},
                               "training": {"kind": "none"}, "trained": None}
    assert spec["runs"][1]["trained"].startswith("work/trained/llama3__cpt__gqa")


def test_paired_rounds_share_one_reference_generation_per_group(monkeypatch):
    import harness.measurement.generation as generation
    from harness.measurement.bench import paired_rounds

    calls = []

    def fake_lockstep(runs, device="cpu"):
        calls.append([run.__name__ for run in runs])
        return [{"call": len(calls), "who": run.__name__} for run in runs]

    monkeypatch.setattr(generation, "lockstep", fake_lockstep)

    def trial(name):
        def run(clock):
            return {"warm": name}
        run.__name__ = name
        return run

    names = ["base", "a", "b", "c", "d", "e"]
    pairs = paired_rounds({n: trial(n) for n in names}, repeats=2, warmup=0, group=3)
    # round 0: base first, then a group of 3; round 1: reversed order, base last
    assert calls == [["base", "a", "b", "c"], ["base", "d", "e"], ["e", "d", "c", "base"], ["b", "a", "base"]]
    for name in "abcde":
        assert len(pairs[name]) == 2
        for got, ref in pairs[name]:  # each ratio is to the reference sample of its own lockstep call
            assert got["who"] == name and ref["who"] == "base" and ref["call"] == got["call"]
    assert len(pairs["base"]) == 4  # one entry per group
    calls.clear()
    paired_rounds({n: trial(n) for n in names[:3]}, repeats=1, warmup=0)  # group 1: a base generation each
    assert calls == [["base", "a"], ["base", "b"]]
    with pytest.raises(ValueError, match="group"):
        paired_rounds({n: trial(n) for n in names}, repeats=1, warmup=0, group=0)


def test_bracketing_prefill_closes_each_group_and_interpolates_the_reference(monkeypatch):
    import harness.measurement.generation as generation
    from harness.measurement.bench import paired_rounds

    calls = []

    def fake_lockstep(runs, device="cpu"):
        calls.append([run.__name__ for run in runs])
        # the machine slows down steadily: each prefill of a group takes 10 % longer than its cost
        return [{"who": run.__name__, "prefill_ms": run.cost * (1 + 0.1 * i), "decode_tokens_per_s": 1.0}
                for i, run in enumerate(runs)]

    monkeypatch.setattr(generation, "lockstep", fake_lockstep)

    def trial(name, cost):
        def run(clock):
            return {}
        run.__name__, run.cost = name, cost
        return run

    trials = {"base": trial("base", 100.0), "a": trial("a", 50.0), "b": trial("b", 50.0), "c": trial("c", 50.0)}
    bracket = trial("bracket", 100.0)  # the reference's prefill alone
    pairs = paired_rounds(trials, repeats=2, warmup=0, group=3, bracket=bracket)
    # the reference generation at one end of each group, the bracketing prefill at the other
    assert calls == [["base", "a", "b", "c", "bracket"], ["bracket", "c", "b", "a", "base"]]
    for name in "abc":  # the drift cancels: every method's prefill is half its interpolated reference
        assert [got["prefill_ms"] / ref["prefill_ms"] for got, ref in pairs[name]] == pytest.approx([0.5, 0.5])
        assert all(got["who"] == name and ref["who"] == "base" for got, ref in pairs[name])
    assert [r["prefill_ms"] for _, r in pairs["base"]] == pytest.approx([100.0, 140.0])  # its own samples: as timed
    # without the bracket the same drift falls on the methods by their place in the group
    calls.clear()
    plain = paired_rounds(trials, repeats=1, warmup=0, group=3)
    assert calls == [["base", "a", "b", "c"]]
    assert [plain[n][0][0]["prefill_ms"] / plain[n][0][1]["prefill_ms"] for n in "abc"] == pytest.approx(
        [0.55, 0.6, 0.65])

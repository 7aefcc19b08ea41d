"""The harness command line and the per-run pipeline: help, grid, config errors, real tiny train + run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from harness.cli import main
from harness.orchestration.config import run_spec, train_table, validate_config
from harness.orchestration.records import read_record


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    proc = run_module("harness", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("corpus", "instruct", "tokenizer", "unigram", "pretrain", "check-config", "grid", "train", "run"):
        assert command in proc.stdout
    assert run_module("analysis", "--help").returncode == 0


def test_subcommand_help():
    proc = run_module("harness", "run", "--help")
    assert proc.returncode == 0 and "--spec" in proc.stdout and "--out" in proc.stdout


def test_grid_prints_the_run_table(tmp_path, capsys):
    out = tmp_path / "runs.tsv"
    assert main(["grid", "--configfile", str(REPO_ROOT / "config" / "config.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split("\t") == ["run_id", "experiments", "model", "family", "source", "training", "method",
                                      "budget", "params", "seed", "evaluate", "train_id"]
    assert len(printed) == 112 and printed[1].startswith("llama3__cpt__base__kv100__s0\tmain\tllama3\t")
    assert out.read_text().splitlines() == printed


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  split: train\n")
    assert main(["check-config", "--configfile", str(REPO_ROOT / "config" / "config.yaml"), str(bad)]) == 2
    assert "config key 'eval.split': 'train' is not one of" in capsys.readouterr().err


def test_run_needs_exactly_one_of_spec_and_run_id(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r.json")]) == 2
    assert "exactly one of --spec" in capsys.readouterr().err


TINY_EXPERIMENTS = {
    "main": {"training": "none", "runs": [{"method": "base"}, {"method": "h2o", "budgets": [0.5]}]},
    "cpt": {"models": ["llama3"], "training": "cpt",
            "runs": [{"method": "base"}, {"method": "mixsga", "budgets": [0.5]},
                     {"method": "h2o+mixsga", "budgets": [0.2]}]},
    "sft": {"models": ["llama3"], "training": "sft", "evaluate": ["ppl", "rouge"],
            "runs": [{"method": "mixsga", "params": {"ratios": [1, 1, 2]}}]},
}


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A corpus of a few stdlib modules, its instruction set, a 300-token BPE, random tiny Llama / Gemma 2."""
    import email
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from harness.data.corpus import build_corpus
    from harness.data.instruct import build_instruct
    from harness.data.tokenizer import train_tokenizer
    from harness.models.zoo import build_config

    root = tmp_path_factory.mktemp("tiny")
    source = root / "src"
    shutil.copytree(Path(email.__file__).parent, source / "email", ignore=shutil.ignore_patterns("__pycache__"))
    corpus = root / "corpus"
    build_corpus(corpus, val_fraction=0.3, test_fraction=0.3, source_dir=source)
    build_instruct(root / "instruct", corpus)
    tokenizer = train_tokenizer(corpus, root / "tokenizer", vocab_size=300)
    for family in ("llama3", "gemma2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tokenizer))
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    cfg = validate_config({
        "models": [{"name": "llama3", "family": "llama3", "size": "tiny"},
                   {"name": "gemma2", "family": "gemma2", "size": "tiny"}],
        "eval": {"seq_len": 32, "batch_size": 4, "max_tokens": 300, "cache_tokens": 12,
                 "instruct": {"max_rows": 3, "max_new_tokens": 4, "batch_size": 3}},
        "training": {"cpt": {"overrides": {"total_tokens": 128, "batch_size": 2, "micro_batch_size": 2,
                                           "seq_len": 32, "checkpoint_every": 1},
                             "curve": {"points": 2, "val_tokens": 96}},
                     "sft": {"overrides": {"epochs": 1.0, "batch_size": 2, "micro_batch_size": 2, "seq_len": 512},
                             "max_rows": 4, "curve": {"points": 2, "val_rows": 2}}},
        "measure": {"context_lengths": [12, 20], "new_tokens": 4, "repeats": 5, "warmup": 0},
        "experiments": TINY_EXPERIMENTS,
    })
    return {"root": root, "corpus": corpus, "instruct": root / "instruct", "model": root / "llama3",
            "gemma2": root / "gemma2", "cfg": cfg, "spec": run_spec(cfg, "llama3__none__base__kv100__s0")}


def test_run_writes_a_valid_record_and_resumes(tiny_setup, capsys):
    out = tiny_setup["root"] / "records" / "llama3__none__base__kv100__s0.json"
    unigram = tiny_setup["root"] / "unigram.json"
    unigram.write_text(json.dumps({"ppl_unigram": 250.0}))
    args = ["run", "--spec", json.dumps(tiny_setup["spec"]), "--model", str(tiny_setup["model"]),
            "--corpus", str(tiny_setup["corpus"]), "--unigram", str(unigram), "--code", "abc", "--out", str(out)]
    assert main(args) == 0
    record = read_record(out)
    assert record["identity"]["config"] == tiny_setup["spec"]
    assert record["identity"]["experiments"] == ["main"] and record["identity"]["training"] == "none"
    q, b, prov, perf = record["quality"], record["budget"], record["provenance"], record["performance"]
    # a random-weight model is about as good as guessing among the 300 tokens
    assert 100 < q["ppl_token"] < 1000 and q["eval_tokens"] == 299 and q["ppl_unigram"] == 250.0
    assert q["ppl_protocol"] == "full" and q["rouge_l"] is None and q["zeroshot"] is None
    # the live cache of the unmodified model holds exactly the analytic bytes: 12 prompt + 3 stored new tokens
    assert b["measured_tokens"] == 15 and b["realized"] == 1.0
    assert b["measured_bytes"] == b["analytic_bytes_per_token"] * 15 == 15 * 2 * 4 * 4 * 16 * 4
    assert b["decode_expert_fractions"] is None
    assert prov["dataset_fingerprint"]["corpus"]["files"] > 10 and prov["device"]["type"] == "cpu"
    assert prov["code"] == "abc" and record["flags"] == {"simulated": False, "query_aware": None}
    assert perf["device"] == "cpu" and perf["context_len"] == 12 and perf["decode_tokens_per_s"]["n"] == 5
    assert [t["context_len"] for t in perf["by_context"]] == [12, 20]
    assert all(t["peak_memory_bytes"]["decode"] > 0 and t["memory_source"] == "rss" for t in perf["by_context"])

    # resume: the same spec keeps the existing record untouched
    mtime = out.stat().st_mtime_ns
    assert main(args) == 0
    assert out.stat().st_mtime_ns == mtime
    assert "skipping" in capsys.readouterr().err

    # the same spec run by changed code is recomputed
    assert main([*args[:-4], "--code", "abd", "--out", str(out)]) == 0
    assert read_record(out)["provenance"]["code"] == "abd"
    assert main(args) == 0  # and back (the test's later steps start from code "abc")
    record = read_record(out)

    # a run that another experiment now shares is relabelled, not recomputed
    relabelled = dict(tiny_setup["spec"], experiments=["main", "extra"])
    assert main([*args[:2], json.dumps(relabelled), *args[3:]]) == 0
    again = read_record(out)
    assert again["identity"]["experiments"] == ["main", "extra"]
    assert again["performance"] == record["performance"] and again["wall_time_s"] == record["wall_time_s"]

    # a changed spec reruns, and the quality is identical
    spec2 = dict(tiny_setup["spec"], eval=dict(tiny_setup["spec"]["eval"], batch_size=2))
    out2 = out.with_name("again.json")
    assert main([*args[:2], json.dumps(spec2), *args[3:-1], str(out2)]) == 0
    assert read_record(out2)["quality"]["ppl_token"] == pytest.approx(q["ppl_token"], rel=1e-5)


def test_realized_budget_is_relative_to_what_the_base_model_stores(tiny_setup):
    """Gemma 2's sliding-window layers keep fewer tokens than the ledger's full-cache figure."""
    from harness.orchestration.run import execute_run

    spec = run_spec(tiny_setup["cfg"], "gemma2__none__base__kv100__s0")
    spec["measure"] = dict(spec["measure"], context_lengths=[100])  # beyond the tiny model's 64-token window
    record = execute_run(spec, tiny_setup["root"] / "gemma2.json", model_path=tiny_setup["gemma2"],
                         corpus_dir=tiny_setup["corpus"])
    b = record["budget"]
    assert b["measured_tokens"] == 103
    assert b["measured_bytes"] == b["base_measured_bytes"] < b["analytic_bytes_per_token"] * 103
    assert b["realized"] == 1.0
    # the ledger counts what the base stores: the window on sliding layers, as measured
    assert b["measured_bytes"] == b["analytic_bytes"] == b["base_analytic_bytes"]


def test_eviction_is_scored_through_its_bounded_cache(tiny_setup):
    from harness.orchestration.run import execute_run

    spec = run_spec(tiny_setup["cfg"], "llama3__none__h2o__kv50__s0")
    record = execute_run(spec, tiny_setup["root"] / "h2o.json", model_path=tiny_setup["model"],
                         corpus_dir=tiny_setup["corpus"])
    assert record["quality"]["ppl_protocol"] == "bounded_cache" and record["identity"]["params"]["keep"] == 0.5
    assert record["flags"]["query_aware"] is True  # H2O ranks tokens by the attention they receive
    assert 0.4 < record["budget"]["realized"] <= 0.6  # keep half of 15 stored tokens (rounded per layer)


def _train(setup, train_id):
    from harness.orchestration.run import execute_train

    spec = train_table(setup["cfg"])[train_id]
    return execute_train(spec, setup["root"] / "trained" / train_id, model_path=setup["model"],
                         corpus_dir=setup["corpus"], instruct_dir=setup["instruct"])


def test_trained_runs_share_checkpoints_and_tokens(tiny_setup, capsys):
    from harness.orchestration.run import execute_run

    mix = _train(tiny_setup, "llama3__cpt__mixsga__kv50__s0")
    base = _train(tiny_setup, "llama3__cpt__base__kv100__s0")
    # identical CPT tokens for every architecture of a seed
    assert mix["summary"]["token_hash"] == base["summary"]["token_hash"]
    assert mix["summary"]["steps"] == 2 and mix["summary"]["aux_loss_final"] is not None
    assert base["summary"]["aux_loss_final"] is None
    # the held-out curve: step 0 (converted, untrained) and the 2 steps, 3 windows of 32 validation tokens
    curve = mix["summary"]["curve"]
    assert [(p["step"], p["tokens"]) for p in curve] == [(0, 0), (1, 64), (2, 128)]
    assert mix["result"]["curve"] == curve and base["summary"]["curve"] != curve  # another model, same slice
    stored = json.loads((tiny_setup["root"] / "trained" / "llama3__cpt__mixsga__kv50__s0" / "curve.json").read_text())
    assert stored["curve"] == curve and stored["slice"]["blocks"] == 3
    # a finished checkpoint is not retrained
    assert _train(tiny_setup, "llama3__cpt__mixsga__kv50__s0")["summary"] == mix["summary"]
    assert "trained checkpoint exists" in capsys.readouterr().err

    trained = tiny_setup["root"] / "trained" / "llama3__cpt__mixsga__kv50__s0"
    records = {}
    for run_id in ("llama3__cpt__mixsga__kv50__s0", "llama3__cpt__h2o+mixsga__kv20__s0"):
        spec = run_spec(tiny_setup["cfg"], run_id)
        assert spec["training"]["train_id"] == "llama3__cpt__mixsga__kv50__s0"
        records[run_id] = execute_run(spec, tiny_setup["root"] / f"{run_id}.json", model_path=tiny_setup["model"],
                                      trained_dir=trained, corpus_dir=tiny_setup["corpus"])
    plain, stacked = records.values()
    assert plain["identity"]["training_summary"] == mix["summary"] == stacked["identity"]["training_summary"]
    fractions = plain["budget"]["decode_expert_fractions"]
    assert len(fractions) == 3 and sum(fractions) == pytest.approx(1.0)
    assert plain["identity"]["params"]["ratios"] == [3.0, 1.0, 6.0]
    assert stacked["quality"]["ppl_protocol"] == "bounded_cache" and plain["quality"]["ppl_protocol"] == "full"
    assert stacked["budget"]["measured_bytes"] < plain["budget"]["measured_bytes"]


def test_trained_checkpoint_opens_with_the_auto_class_as_the_run_model(tiny_setup, tmp_path):
    """A CPT'd mixSGA checkpoint, taken out of the work tree, opens with plain AutoModelForCausalLM as the run's model."""
    import copy
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.methods import get_method
    from harness.orchestration.run import build

    train_id = "llama3__cpt__mixsga__kv50__s0"
    _train(tiny_setup, train_id)  # trained by the test above; a finished checkpoint is not retrained
    trained = tiny_setup["root"] / "trained" / train_id
    assert not (trained.parent / f".{train_id}.ckpt").exists()  # the resume state goes once the model is saved
    assert json.loads((trained / "config.json").read_text())["model_type"] == "mixsga_llama"
    assert {"model.safetensors", "tokenizer.json", "train.json"} <= {p.name for p in trained.iterdir()}
    assert not (trained / "model.pt").exists()
    elsewhere = shutil.copytree(trained, tmp_path / "my-model")

    spec = run_spec(tiny_setup["cfg"], train_id)
    built = build(spec, device="cpu", model_path=tiny_setup["model"], trained_dir=trained)
    loaded = AutoModelForCausalLM.from_pretrained(elsewhere).eval()
    tok = AutoTokenizer.from_pretrained(elsewhere)
    assert type(loaded) is type(built.model) and len(tok) == len(built.tokenizer)
    ids = tok(["def main(argv):\n    return parse(argv)"], return_tensors="pt").input_ids
    untrained = get_method("mixsga").apply(copy.deepcopy(built.base), built.params).eval()
    with torch.no_grad():
        want = built.model(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want)
        assert not torch.allclose(untrained(input_ids=ids).logits, want)  # the trained weights, not a conversion


def test_sft_run_scores_rouge_and_saves_predictions(tiny_setup):
    from harness.orchestration.run import execute_run

    run_id = "llama3__sft__mixsga-r1.1.2__kv50__s0"
    _train(tiny_setup, run_id)
    preds = tiny_setup["root"] / "predictions"
    record = execute_run(run_spec(tiny_setup["cfg"], run_id), tiny_setup["root"] / "sft.json",
                         model_path=tiny_setup["model"], trained_dir=tiny_setup["root"] / "trained" / run_id,
                         corpus_dir=tiny_setup["corpus"], instruct_dir=tiny_setup["instruct"], predictions_dir=preds)
    q = record["quality"]
    assert q["rouge_l"] is not None and 0 < q["gen_length"] <= 4 and q["instruct_rows"] == 3
    assert q["rouge_by_set"]["offline"]["rows"] == 3 and q["instruct_set"] == "offline:test"
    assert len((preds / f"{run_id}.offline.jsonl").read_text().splitlines()) == 3
    assert record["identity"]["training"] == "sft" and record["identity"]["training_summary"]["recipe"] == "sft_offline"
    # the SFT curve: response loss of the first 2 validation pairs at step 0 and after the one step
    curve = record["identity"]["training_summary"]["curve"]
    assert [p["step"] for p in curve] == [0, 1] and all(p["loss"] > 0 for p in curve)  # 3 pairs, batch 2: 1 step


def test_trained_run_needs_its_checkpoint(tiny_setup, capsys):
    spec = run_spec(tiny_setup["cfg"], "llama3__cpt__mixsga__kv50__s0")
    out = tiny_setup["root"] / "missing.json"
    args = ["run", "--spec", json.dumps(spec), "--model", str(tiny_setup["model"]),
            "--corpus", str(tiny_setup["corpus"]), "--out", str(out)]
    assert main(args) == 2
    assert "pass its checkpoint as trained_dir" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_evaluator_is_refused_before_the_model_loads(tiny_setup):
    from harness.orchestration.run import execute_run

    spec = dict(tiny_setup["spec"], evaluate=["ppl", "bleu"])
    out = tiny_setup["root"] / "bleu.json"
    with pytest.raises(ValueError, match=r"unknown evaluator\(s\) \['bleu'\]"):
        execute_run(spec, out, model_path=tiny_setup["root"] / "no-such-model", corpus_dir=tiny_setup["corpus"])
    assert not out.exists()

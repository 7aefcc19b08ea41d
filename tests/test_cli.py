"""The harness command line: help, grid, config errors, and one real (tiny) run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from harness.cli import main
from harness.config import load_config, run_spec
from harness.records import read_record


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    proc = run_module("harness", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("corpus", "instruct", "tokenizer", "unigram", "pretrain", "check-config", "grid", "run"):
        assert command in proc.stdout
    assert run_module("analysis", "--help").returncode == 0


def test_subcommand_help():
    proc = run_module("harness", "run", "--help")
    assert proc.returncode == 0 and "--spec" in proc.stdout and "--out" in proc.stdout


def test_grid_prints_the_run_table(tmp_path, capsys):
    out = tmp_path / "runs.tsv"
    assert main(["grid", "--configfile", str(REPO_ROOT / "config" / "config.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split("\t") == ["run_id", "model", "family", "source", "method", "budget", "seed"]
    assert len(printed) == 5 and printed[1].startswith("llama3__base__kv100__s0\t")
    assert out.read_text().splitlines() == printed


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("eval:\n  split: train\n")
    assert main(["check-config", "--configfile", str(REPO_ROOT / "config" / "config.yaml"), str(bad)]) == 2
    assert "config key 'eval.split': 'train' is not one of" in capsys.readouterr().err


def test_run_needs_exactly_one_of_spec_and_run_id(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r.json")]) == 2
    assert "exactly one of --spec" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A corpus of a few stdlib modules, a 300-token BPE and a random-weight tiny Llama saved to disk."""
    import email
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from harness.corpus import build_corpus
    from harness.tokenizer import train_tokenizer
    from harness.zoo import build_config

    root = tmp_path_factory.mktemp("tiny")
    source = root / "src"
    shutil.copytree(Path(email.__file__).parent, source / "email", ignore=shutil.ignore_patterns("__pycache__"))
    corpus = root / "corpus"
    build_corpus(corpus, val_fraction=0.3, test_fraction=0.3, source_dir=source)
    tokenizer = train_tokenizer(corpus, root / "tokenizer", vocab_size=300)
    for family in ("llama3", "gemma2"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tokenizer))
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    cfg = load_config(
        [REPO_ROOT / "config" / "config.yaml"],
        {
            "models": [{"name": "llama3", "family": "llama3", "size": "tiny"},
                       {"name": "gemma2", "family": "gemma2", "size": "tiny"}],
            "eval": {"seq_len": 32, "batch_size": 4, "max_tokens": 300, "cache_tokens": 12},
        },
    )
    return {"root": root, "corpus": corpus, "model": root / "llama3", "gemma2": root / "gemma2", "cfg": cfg,
            "spec": run_spec(cfg, "llama3__base__kv100__s0")}


def test_run_writes_a_valid_record_and_resumes(tiny_setup, capsys):
    out = tiny_setup["root"] / "records" / "llama3__base__kv100__s0.json"
    unigram = tiny_setup["root"] / "unigram.json"
    unigram.write_text(json.dumps({"ppl_unigram": 250.0}))
    args = ["run", "--spec", json.dumps(tiny_setup["spec"]), "--model", str(tiny_setup["model"]),
            "--corpus", str(tiny_setup["corpus"]), "--unigram", str(unigram), "--out", str(out)]
    assert main(args) == 0
    record = read_record(out)
    assert record["identity"]["config"] == tiny_setup["spec"]
    q, b, prov = record["quality"], record["budget"], record["provenance"]
    # a random-weight model is about as good as guessing among the 300 tokens
    assert 100 < q["ppl_token"] < 1000 and q["eval_tokens"] == 299 and q["ppl_unigram"] == 250.0
    # the live cache of the unmodified model holds exactly the analytic bytes
    assert b["realized"] == 1.0 and b["measured_bytes"] == b["analytic_bytes_per_token"] * b["measured_tokens"] == 12 * 2 * 4 * 4 * 16 * 4
    assert prov["dataset_fingerprint"]["corpus"]["files"] > 10 and prov["device"]["type"] == "cpu"
    assert record["flags"] == {"simulated": False, "query_aware": None}

    # resume: the same spec keeps the existing record untouched
    mtime = out.stat().st_mtime_ns
    assert main(args) == 0
    assert out.stat().st_mtime_ns == mtime
    assert "skipping" in capsys.readouterr().err

    # a changed spec reruns, and the result is identical apart from provenance and timing
    spec2 = dict(tiny_setup["spec"], eval=dict(tiny_setup["spec"]["eval"], batch_size=2))
    out2 = out.with_name("again.json")
    assert main([*args[:2], json.dumps(spec2), *args[3:-1], str(out2)]) == 0
    assert read_record(out2)["quality"]["ppl_token"] == pytest.approx(q["ppl_token"], rel=1e-5)


def test_realized_budget_is_relative_to_what_the_base_model_stores(tiny_setup):
    """Gemma 2's sliding-window layers keep fewer tokens than the ledger's full-cache figure."""
    from harness.run import execute_run

    spec = run_spec(tiny_setup["cfg"], "gemma2__base__kv100__s0")
    spec["eval"] = dict(spec["eval"], cache_tokens=100)  # beyond the tiny model's 64-token window
    record = execute_run(spec, tiny_setup["root"] / "gemma2.json", model_path=tiny_setup["gemma2"],
                         corpus_dir=tiny_setup["corpus"])
    b = record["budget"]
    assert b["measured_tokens"] == 100
    assert b["measured_bytes"] == b["base_measured_bytes"] < b["analytic_bytes_per_token"] * 100
    assert b["realized"] == 1.0


def test_run_rejects_a_method_it_cannot_evaluate_yet(tiny_setup, capsys):
    spec = dict(tiny_setup["spec"], method="gqa", budget=0.5, run_id="llama3__gqa__kv50__s0")
    out = tiny_setup["root"] / "gqa.json"
    args = ["run", "--spec", json.dumps(spec), "--model", str(tiny_setup["model"]),
            "--corpus", str(tiny_setup["corpus"]), "--out", str(out)]
    assert main(args) == 2
    assert "needs training" in capsys.readouterr().err
    assert not out.exists()

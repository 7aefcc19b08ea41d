"""Corpus of bad inputs (issue 14): each is refused before any work, clearly, and writes nothing.

Config cases are a YAML overlay given after the CI config (as ``snakemake --configfile
.test/config/config.yaml overlay.yaml`` would merge it); each must raise ConfigError whose
message matches every listed pattern (the offending key, file or value), and leave the
work and results trees (both in a tmp dir) unmade. API and CLI cases check the same for
loaders and commands. Method params are checked by each method's torch-free spec
(``harness.methods``) as the config expands. A few Snakemake dry runs prove the workflow
shares the checks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.orchestration.config import ConfigError, resolve_config, run_table

REPO_ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO_ROOT / ".test" / "config" / "config.yaml"


def _runs(*runs: dict, name: str = "main", **exp) -> str:
    """An overlay replacing the CI config's ``main`` runs."""
    return yaml.safe_dump({"experiments": {name: {"training": "cpt", "runs": list(runs)} | exp}})


def _yaml(**data) -> str:
    return yaml.safe_dump(data)


# (id, overlay YAML, patterns the message must match). "{tmp}" is the test's tmp dir.
CONFIG_CASES = [
    # --- silently accepted or wrong before issue 14 ---
    ("empty-experiments", "experiments: {}\n", [r"overlay\.yaml", r"'experiments'", "empty"]),
    ("run-id-collision", _runs({"method": "h2o", "budgets": [0.5, 0.50001]}),
     ["kv50", r"budget 0\.5\b", r"0\.50001", r"experiments\.main\.runs\[0\]"]),
    ("run-id-collision-across-experiments",
     yaml.safe_dump({"experiments": {"main": {"training": "cpt", "runs": [{"method": "h2o", "budgets": [0.5]}]},
                                     "other": {"training": "cpt", "runs": [{"method": "h2o", "budgets": [0.500001]}]}}}),
     [r"experiments\.main\.runs\[0\]", r"experiments\.other\.runs\[0\]", r"0\.500001"]),
    ("experiment-named-pareto", _runs({"method": "base"}, name="pareto"), [r"experiments\.pareto", "target"]),
    ("experiment-named-perf", _runs({"method": "base"}, name="perf"), [r"experiments\.perf", "target"]),
    ("experiment-named-all", _runs({"method": "base"}, name="all"), [r"experiments\.all"]),
    ("experiment-named-like-a-rule", _runs({"method": "base"}, name="collate_all"), [r"experiments\.collate_all"]),
    pytest.param("h2o-keeps-no-token", _runs({"method": "h2o", "budgets": [0.0001]}), [r"0\.0001", "smallest"],
                 id="h2o-keeps-no-token"),
    pytest.param("streamingllm-no-recent-window", _runs({"method": "streamingllm", "budgets": [0.05]}),
                 [r"0\.05", "smallest"], id="streamingllm-no-recent-window"),
    pytest.param("h2o+mixsga-keeps-no-token", _runs({"method": "h2o+mixsga", "budgets": [0.01]}),
                 [r"0\.01", "smallest"], id="h2o+mixsga-keeps-no-token"),
    # --- late before issue 14 (after pretraining or training) ---
    ("cpt-total-tokens-below-one-batch", _yaml(training={"cpt": {"overrides": {"total_tokens": 100}}}),
     # a profile's overrides replace the default's whole: the recipe's own batch x seq_len is the batch
     [r"training\.cpt\.overrides\.total_tokens", r"\b100\b", "less than one batch"]),
    ("default-skip-unknown-experiment", _yaml(default_skip=["table99_bogus"]),
     [r"'default_skip'", "table99_bogus", "not an experiment"]),
    ("unknown-recipe", _yaml(training={"sft": {"recipe": "sft_bogus"}}), [r"training\.sft\.recipe", "sft_bogus"]),
    ("curve-slice-below-one-window", _yaml(training={"cpt": {"curve": {"points": 4, "val_tokens": 32}}}),
     [r"training\.cpt\.curve\.val_tokens", r"\b32\b", "less than one window", r"seq_len 64"]),
    ("curve-negative-points", _yaml(training={"sft": {"curve": {"points": -1}}}),
     [r"training\.sft\.curve\.points", "-1"]),
    ("curve-unknown-key", _yaml(training={"cpt": {"curve": {"every": 3}}}), [r"training\.cpt\.curve", "every"]),
    ("recipe-of-the-wrong-kind", _yaml(training={"cpt": {"recipe": "sft_offline"}}),
     [r"training\.cpt\.recipe", "sft_offline"]),
    ("recipe-override-typo", _yaml(training={"sft": {"overrides": {"lrr": 0.1}}}),
     [r"training\.sft\.overrides", "lrr"]),
    ("recipe-override-bad-value", _yaml(training={"sft": {"overrides": {"lr": -1}}}),
     [r"training\.sft\.overrides", "lr", "-1"]),
    ("context-beyond-model-positions",
     _yaml(models=[{"name": "llama3", "family": "llama3", "size": "tiny"},
                   {"name": "gemma2", "family": "gemma2", "size": "tiny"},
                   {"name": "opt", "family": "opt", "size": "tiny"}],
           measure={"context_lengths": [1100]}),
     [r"measure\.context_lengths", r"\b1100\b", r"\b1024\b", "'opt'"]),
    # the long-range task: a distance no previous occurrence inside a window can reach, or no distance at all
    ("longrange-distance-not-below-the-window", _yaml(eval={"longrange": {"min_distance": 64}}),
     [r"eval\.longrange\.min_distance", r"\b64 tokens", r"eval\.seq_len 64", "no token would qualify"]),
    ("longrange-distance-zero", _yaml(eval={"longrange": {"min_distance": 0}}),
     [r"eval\.longrange\.min_distance", "minimum of 1"]),
    ("longrange-distance-not-an-integer", _yaml(eval={"longrange": {"min_distance": 12.5}}),
     [r"eval\.longrange\.min_distance", r"12\.5"]),
    ("longrange-unknown-key", _yaml(eval={"longrange": {"distance": 16}}), [r"eval\.longrange'", "distance"]),
    ("eval-seq-len-beyond-positions",
     _yaml(models=[{"name": "llama3", "family": "llama3", "size": "tiny"},
                   {"name": "gemma2", "family": "gemma2", "size": "tiny"}], eval={"seq_len": 4096}),
     [r"eval\.seq_len", r"\b4096\b", r"\b2048\b"]),
    pytest.param("gqa-unknown-param", _runs({"method": "gqa", "budgets": [0.5], "params": {"foo": 1}}),
                 [r"runs\[0\]\.params", "foo"], id="gqa-unknown-param"),
    pytest.param("mixsga-ratios-contradict-budget",
                 _runs({"method": "mixsga", "budgets": [0.25], "params": {"ratios": [3, 1, 6]}}),
                 [r"runs\[0\]", "ratios", r"0\.25"], id="mixsga-ratios-contradict-budget"),
    pytest.param("h2o+mixsga-above-inner-budget", _runs({"method": "h2o+mixsga", "budgets": [0.6]}),
                 [r"runs\[0\]", "inner", r"0\.6"], id="h2o+mixsga-above-inner-budget"),
    pytest.param("mixsga-budget-without-derivable-ratios",
                 _runs({"method": "mixsga", "budgets": [0.2], "params": {"group_sizes": [1, 2]}}),
                 [r"runs\[0\]", r"0\.2", "ratios"], id="mixsga-budget-without-derivable-ratios"),
    pytest.param("negative-ratios-with-budgets",
                 _runs({"method": "mixsga", "budgets": [0.5], "params": {"ratios": [-1, 1, 2]}}),
                 [r"params\.ratios", "negative"], id="negative-ratios-with-budgets"),
    pytest.param("unsorted-group-sizes",
                 _runs({"method": "mixsga", "params": {"ratios": [3, 1, 6], "group_sizes": [4, 2, 1]}}),
                 [r"params\.group_sizes", "increasing"], id="unsorted-group-sizes"),
    pytest.param("unknown-router", _runs({"method": "mixsga", "budgets": [0.5], "params": {"router": "foo"}}),
                 [r"params\.router", "foo"], id="unknown-router"),
    pytest.param("snapkv-window-beyond-context",
                 _runs({"method": "snapkv", "budgets": [0.5], "params": {"window": 64}}),
                 [r"params\.window", r"\b64\b", r"\b32\b"], id="snapkv-window-beyond-context"),
    # --- unclear before issue 14 ---
    ("all-zero-ratios", _runs({"method": "mixsga", "params": {"ratios": [0, 0, 0]}}),
     [r"experiments\.main\.runs\[0\]\.params\.ratios", "all zero"]),
    ("negative-ratios", _runs({"method": "mixsga", "params": {"ratios": [-1, 1, 2]}}),
     [r"experiments\.main\.runs\[0\]\.params\.ratios", "negative"]),
    ("ratios-not-numbers", _runs({"method": "mixsga", "params": {"ratios": "316"}}),
     [r"params\.ratios", "'316'"]),
    ("ratios-of-the-wrong-length", _runs({"method": "mixsga", "params": {"ratios": [1, 2]}}),
     [r"params\.ratios", "group sizes"]),
    ("yaml-syntax-error", "seeds: [0\nmodels: x\n", [r"overlay\.yaml", "line 2", "YAML"]),
    ("yaml-tab-indentation", "pretrain:\n\tsteps: 3\n", [r"overlay\.yaml", "line 2"]),
    ("paths-work-is-a-file", "paths: {work: '{tmp}/a_file'}\n", [r"paths\.work", "a_file", "not a directory"]),
    ("paths-results-is-work", "paths: {work: '{tmp}/same', results: '{tmp}/same'}\n", [r"paths\.results"]),
    ("seed-beyond-run-id-pattern", "seeds: [10000000000]\n", [r"seeds\[0\]", "10000000000", "999999999"]),
    ("experiment-seed-beyond-pattern", _runs({"method": "base"}, seeds=[1234567890]),
     [r"experiments\.main\.seeds\[0\]", "1234567890"]),
    # --- refused clearly before issue 14 (kept so that they stay so) ---
    ("unknown-top-level-key", "pretrian: {steps: 3}\n", ["pretrian"]),
    ("negative-steps", "pretrain: {steps: -3}\n", [r"pretrain\.steps", "-3"]),
    ("unknown-method", _runs({"method": "foo", "budgets": [0.5]}), [r"experiments\.main\.runs\[0\]\.method", "foo"]),
    ("unknown-model-in-experiment", _runs({"method": "base"}, models=["nope"]), [r"experiments\.main\.models", "nope"]),
    ("base-with-budgets", _runs({"method": "base", "budgets": [0.5]}), [r"runs\[0\]", "base", r"0\.5"]),
    ("gqa-without-budgets", _runs({"method": "gqa"}), [r"runs\[0\]", "gqa", "budgets"]),
    ("gqa-infeasible-budget", _runs({"method": "gqa", "budgets": [0.3]}), [r"runs\[0\]", "30.00%", "feasible"]),
    ("budget-above-one", _runs({"method": "gqa", "budgets": [1.5]}), [r"budgets\[0\]", r"1\.5"]),
    ("budget-zero", _runs({"method": "h2o", "budgets": [0]}), [r"budgets\[0\]"]),
    ("duplicate-budgets", _runs({"method": "h2o", "budgets": [0.5, 0.5]}), [r"budgets"]),
    ("mqa-wrong-budget", _runs({"method": "mqa", "budgets": [0.5]}), ["MQA", "25.00%"]),
    ("group-sizes-not-dividing-heads",
     _runs({"method": "mixsga", "params": {"ratios": [1, 1], "group_sizes": [1, 3]}}), ["group sizes", r"\[3\]"]),
    ("duplicate-model-name", _yaml(models=[{"name": "a", "family": "llama3", "size": "tiny"}] * 2),
     [r"models\[1\]\.name", "'a'"]),
    ("model-with-size-and-hub", _yaml(models=[{"name": "a", "family": "llama3", "size": "tiny", "hub": "x/y"}]),
     [r"models\[0\]", "exactly one"]),
    ("hub-model-pretrained", _yaml(models=[{"name": "a", "family": "llama3", "hub": "x/y", "pretrain": {"steps": 1}}]),
     [r"models\[0\]\.pretrain"]),
    ("unknown-family", _yaml(models=[{"name": "a", "family": "gpt9", "size": "tiny"}]), [r"models\[0\]\.family", "gpt9"]),
    ("bad-model-name", _yaml(models=[{"name": "a_b", "family": "llama3", "size": "tiny"}]), [r"models\[0\]\.name", "a_b"]),
    ("rouge-without-sft", _runs({"method": "base"}, evaluate=["rouge"], training="none"), [r"experiments\.main\.evaluate", "ROUGE"]),
    ("retired-text-path-key", "eval: {text_path: /x}\n", [r"config key 'eval'", "text_path"]),
    ("unknown-profile", "profile: nope\n", ["profile", "nope"]),
    ("unknown-device", "device: tpu\n", ["device", "tpu"]),
    ("duplicate-seeds", "seeds: [0, 0]\n", ["seeds"]),
    ("negative-seed", "seeds: [-1]\n", [r"seeds\[0\]", "-1"]),
    ("bad-experiment-name", _runs({"method": "base"}, name="Bad-Name"), ["Bad-Name"]),
    ("experiment-without-runs", "experiments: {extra: {training: cpt}}\n", [r"experiments\.extra", "runs"]),
    ("unknown-training", _runs({"method": "base"}, training="rlhf"), [r"experiments\.main\.training", "rlhf"]),
    ("vocab-too-small", "tokenizer: {vocab_size: 100}\n", [r"tokenizer\.vocab_size", "100"]),
    ("threads-zero", "threads: 0\n", ["threads"]),
    ("too-few-repeats", "measure: {repeats: 2}\n", [r"measure\.repeats"]),
    ("config-not-a-mapping", "- a\n- b\n", [r"overlay\.yaml", "mapping"]),
    # the cost benchmark (config key perf, rule perf_bench)
    ("perf-too-few-repeats", "perf: {repeats: 3}\n", [r"perf\.repeats", r"\b3\b"]),
    ("perf-one-new-token", "perf: {new_tokens: 1}\n", [r"perf\.new_tokens"]),
    ("perf-unknown-context-word", "perf: {context_lengths: [512, longest]}\n", [r"perf\.context_lengths", "longest"]),
    ("perf-no-contexts", "perf: {context_lengths: []}\n", [r"perf\.context_lengths"]),
    ("perf-unknown-key", "perf: {rounds: 5}\n", [r"config key 'perf'", "rounds"]),
    ("perf-duplicate-context", "perf: {context_lengths: [48, 48]}\n", [r"perf\.context_lengths", "twice"]),
    ("perf-context-beyond-positions", "perf: {context_lengths: [2040], new_tokens: 16}\n",
     [r"perf\.context_lengths\[0\]", r"\b2056\b", r"\b2048\b", "'llama3'"]),
]


def _case_id(case) -> str:
    return case.id if hasattr(case, "id") else case[0]


def _config_files(tmp_path: Path, overlay: str) -> list[Path]:
    """The CI config with its paths moved under tmp, then the overlay (``{tmp}`` expanded)."""
    ci = yaml.safe_load(CI_CONFIG.read_text())
    ci["paths"] = {"work": str(tmp_path / "work"), "results": str(tmp_path / "results")}
    (tmp_path / "ci.yaml").write_text(yaml.safe_dump(ci, sort_keys=False))
    (tmp_path / "a_file").write_text("not a directory\n")
    (tmp_path / "overlay.yaml").write_text(overlay.replace("{tmp}", str(tmp_path)))
    return [tmp_path / "ci.yaml", tmp_path / "overlay.yaml"]


def _nothing_written(tmp_path: Path) -> None:
    made = sorted(p.name for p in tmp_path.iterdir()) 
    assert made == ["a_file", "ci.yaml", "overlay.yaml"], f"something was written: {made}"


def _assert_names(message: str, patterns: list[str]) -> None:
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in message:\n{message}"


@pytest.mark.parametrize("case_id, overlay, patterns", CONFIG_CASES, ids=[_case_id(c) for c in CONFIG_CASES])
def test_bad_config_refused_at_expansion(tmp_path, case_id, overlay, patterns):
    with pytest.raises(ConfigError) as info:
        resolve_config(_config_files(tmp_path, overlay))
    _assert_names(str(info.value), patterns)
    _nothing_written(tmp_path)


def test_the_ci_config_itself_resolves(tmp_path):
    """The base every case starts from is valid (so each error is the overlay's)."""
    cfg = resolve_config(_config_files(tmp_path, "profile: test\n"))
    assert run_table(cfg)
    _nothing_written(tmp_path)


def test_budgets_apart_by_more_than_the_id_precision_stay_two_runs(tmp_path):
    cfg = resolve_config(_config_files(tmp_path, _runs({"method": "h2o", "budgets": [0.5, 0.5001]})))
    ids = [r["run_id"] for r in run_table(cfg) if r["method"] == "h2o" and r["model"] == "llama3"]
    assert len(ids) == len(set(ids)) == 2


@pytest.mark.parametrize("method, params, smallest", [
    ("h2o", {}, 1 / 32),  # one token of the 32-token measured prompt (CI: measure.context_lengths [32])
    ("tova", {}, 1 / 32),
    ("streamingllm", {}, 5 / 32),  # 4 sinks + 1 recent token
    ("streamingllm", {"sink_tokens": 1}, 2 / 32),
    ("h2o+gqa", {}, 0.5 / 32),  # keep = budget / 0.5 of equal-cost GQA tokens
    ("h2o+mixsga", {}, 1 / 32),  # 3:1:6 routes tokens to the full-head expert: one costs a whole base token
    ("h2o+mixsga", {"inner_budget": 0.25}, 0.25 / 32),  # 0:0:1: every token costs 1/4
    ("pyramidkv", {"policy": "streamingllm"}, 5 / 32),
])
def test_the_smallest_feasible_budget_named_is_feasible(tmp_path, method, params, smallest):
    run = {"method": method, "budgets": [round(smallest * 0.9, 6)], "params": params}
    with pytest.raises(ConfigError, match="smallest feasible budget there is ") as info:
        resolve_config(_config_files(tmp_path, _runs(run)))
    named = float(re.search(r"smallest feasible budget there is ([0-9.e-]+)", str(info.value)).group(1))
    assert named == pytest.approx(smallest, abs=1e-6) and named >= smallest
    cfg = resolve_config(_config_files(tmp_path, _runs({**run, "budgets": [named]})))
    assert any(r["method"] == method and r["budget"] == named for r in run_table(cfg))


def test_eviction_contexts_are_the_measured_prompts_and_the_ppl_windows(tmp_path):
    # no perplexity: the 64-token eval windows do not count, the 128-token measured prompt does
    overlay = yaml.safe_load(_runs({"method": "snapkv", "budgets": [0.5], "params": {"window": 64}}, evaluate=["rouge"],
                                   training="sft"))
    overlay["measure"] = {"context_lengths": [128]}
    resolve_config(_config_files(tmp_path, yaml.safe_dump(overlay)))
    overlay["experiments"]["main"]["evaluate"] = ["ppl"]
    with pytest.raises(ConfigError, match=r"params\.window'.*\(64 tokens, eval\.seq_len\)"):
        resolve_config(_config_files(tmp_path, yaml.safe_dump(overlay)))


def test_stacked_inner_params_are_checked_by_the_inner_spec(tmp_path):
    run = {"method": "h2o+mixsga", "budgets": [0.2], "params": {"inner": {"ratios": [3, 1, 6], "router": "foo"}}}
    with pytest.raises(ConfigError, match=r"runs\[0\]\.params\.inner\.router': .*'foo'"):
        resolve_config(_config_files(tmp_path, _runs(run)))
    run["params"] = {"inner": {"ratios": [1, 1, 0]}}  # stores 75 %, not the default inner budget 0.5
    with pytest.raises(ConfigError, match=r"runs\[0\]\.params\.inner\.ratios'.*not the budget 0\.5"):
        resolve_config(_config_files(tmp_path, _runs(run)))


def test_named_paper_experiments_are_not_reserved():
    from harness.orchestration.checks import reserved_experiment_names

    reserved = reserved_experiment_names()
    assert {"pareto", "perf", "all", "report", "run", "train"} <= reserved
    assert not {"main", "table1_sft", "figure3_budget_sweep"} & reserved


# --- the command line: the same resolution as Snakemake, clear errors, exit status 2 ---

def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from harness.cli import main

    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_check_config_resolves_over_the_default_config_as_snakemake_does(tmp_path, capsys):
    overlay = tmp_path / "only_profile.yaml"
    overlay.write_text("profile: test\nseeds: [3]\n")
    rc, out, _ = _cli(["check-config", "--configfile", str(overlay)], capsys)
    assert rc == 0
    resolved = yaml.safe_load(out)
    default = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    # everything the overlay does not set comes from config/config.yaml, as `configfile:` in the Snakefile
    assert [m["name"] for m in resolved["models"]] == [m["name"] for m in default["models"]]
    assert list(resolved["experiments"]) == list(default["experiments"])
    assert resolved["seeds"] == [3] and resolved["profile"] == "test"
    assert resolved == resolve_config([overlay])


@pytest.mark.parametrize("argv, patterns", [
    (["run", "--spec", "{not json", "--out", "{tmp}/results/r.json"], ["--spec", "not valid JSON"]),
    (["run", "--spec", "[1, 2]", "--out", "{tmp}/results/r.json"], ["--spec", "JSON object"]),
    (["run", "--spec", '{"run_id": "x"}', "--out", "{tmp}/results/r.json"], ["--spec", "lacks", "'model'"]),
    (["train", "--spec", '{"kind": "cpt"}', "--out", "{tmp}/work/t"], ["--spec", "lacks", "'train_id'"]),
    (["run", "--spec", "{}", "--run-id", "x", "--out", "{tmp}/results/r.json"], ["exactly one of"]),
    (["run", "--run-id", "nope__none__base__kv100__s0", "--configfile", "{tmp}/ci.yaml",
      "--out", "{tmp}/results/r.json"], ["nope__none__base__kv100__s0", "not in the grid"]),
    (["train", "--train-id", "nope", "--configfile", "{tmp}/ci.yaml", "--out", "{tmp}/work/t"],
     ["'nope'", "not needed"]),
    (["grid", "--configfile", "{tmp}/missing.yaml"], [r"missing\.yaml", "does not exist"]),
    (["check-config", "--configfile", "{tmp}/overlay.yaml"], [r"overlay\.yaml", "empty mapping"]),
], ids=["spec-bad-json", "spec-not-object", "run-spec-missing-fields", "train-spec-missing-fields",
        "spec-and-run-id", "unknown-run-id", "unknown-train-id", "missing-config-file", "check-config-empty-experiments"])
def test_cli_refuses_clearly(tmp_path, capsys, argv, patterns):
    _config_files(tmp_path, "experiments: {}\n")
    rc, _, err = _cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert rc == 2
    _assert_names(err, patterns)
    _nothing_written(tmp_path)


def test_spec_fields_are_those_the_config_produces(tmp_path):
    from harness.cli import SPEC_FIELDS
    from harness.orchestration.config import run_spec, train_table

    cfg = resolve_config(_config_files(tmp_path, "profile: test\n"))
    rows = run_table(cfg)
    assert set(SPEC_FIELDS["run"]) <= set(run_spec(cfg, rows[0]["run_id"], rows))
    for spec in train_table(cfg, rows).values():
        assert set(SPEC_FIELDS["train"]) <= set(spec)


def test_analysis_refuses_an_empty_table(tmp_path, capsys):
    from analysis.__main__ import main

    for name, text in (("empty.csv", ""), ("header_only.csv", "run_id,method\n")):
        table = tmp_path / name
        table.write_text(text)
        rc = main(["table", "--table", str(table), "--experiment", "main",
                   "--csv", str(tmp_path / "out.csv"), "--md", str(tmp_path / "out.md")])
        assert rc == 2
        _assert_names(capsys.readouterr().err, [re.escape(str(table)), "no rows|empty"])
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.md").exists()


# --- method packages and loaders ---

@pytest.mark.parametrize("ratios", ["316", b"316", (3, "1", 6), (True, 1, 2)])
def test_mixsga_config_refuses_ratios_that_are_not_numbers(ratios):
    from mixsga.config import MixSGAConfig

    with pytest.raises(ValueError, match="ratios must be a sequence of numbers"):
        MixSGAConfig(ratios=ratios)


@pytest.mark.parametrize("name, fields", [("h2o", {}), ("tova", {}), ("streamingllm", {}),
                                          ("streamingllm", {"sink_tokens": 1}), ("snapkv", {}),
                                          ("snapkv", {"window": 8})])
def test_eviction_specs_refuse_what_their_policies_cannot_do(name, fields):
    """The spec's config-time rule (torch-free) against the policy itself, over contexts and keeps."""
    import math

    from baselines.policies import EvictionPolicy
    from harness.methods import get_spec

    for n in (4, 8, 16, 20, 32, 33, 64):
        for keep in (0.01, 0.05, 0.1, 0.125, 0.2, 0.25, 0.5, 1.0):
            policy = EvictionPolicy(name, keep, **fields)
            try:  # the policy's own guard, and at least one token kept (``capacity``)
                policy.check_context(n)
                works = math.floor(keep * n + 1e-9) >= 1
            except ValueError:
                works = False
            try:
                get_spec(name).check_run(keep, fields, {"measure.context_lengths[0]": n})
                accepted = True
            except ValueError:
                accepted = False
            assert accepted == works, (name, fields, n, keep)


def test_eviction_spec_defaults_are_the_policy_defaults():
    import dataclasses

    from baselines.policies import EvictionPolicy
    from harness.methods.eviction import POLICY_DEFAULTS

    defaults = {f.name: f.default for f in dataclasses.fields(EvictionPolicy)}
    assert {k: defaults[k] for k in POLICY_DEFAULTS} == POLICY_DEFAULTS


def test_eviction_policy_refuses_a_bool_keep():
    from baselines.eviction import EvictionPolicy

    with pytest.raises(ValueError, match="keep fraction must be a number in .*got True"):
        EvictionPolicy(method="h2o", keep=True)
    assert EvictionPolicy(method="h2o", keep=1).keep == 1  # an int is a number


def _tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)).eval()


def test_convert_to_gqa_refuses_a_mixsga_model():
    from baselines.gqa import convert_to_gqa
    from mixsga import convert_to_mixsga
    from mixsga.config import MixSGAConfig

    model = convert_to_mixsga(_tiny_llama(), MixSGAConfig(ratios=(3, 1, 6), group_sizes=(1, 2, 4)))
    with pytest.raises(ValueError, match="mixSGA"):
        convert_to_gqa(model, 2)


def test_load_mixsga_names_a_missing_directory_or_config(tmp_path):
    from mixsga import load_mixsga

    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_mixsga(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_mixsga(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def saved_mixsga(tmp_path_factory) -> Path:
    from mixsga import convert_to_mixsga
    from mixsga.config import MixSGAConfig

    path = tmp_path_factory.mktemp("mixsga") / "model"
    convert_to_mixsga(_tiny_llama(), MixSGAConfig(ratios=(3, 1, 6))).save_pretrained(path)
    return path


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors_name_the_file(tmp_path, saved_mixsga, damage):
    import shutil

    from baselines.checkpoint import _read_state_dict
    from harness.models.zoo import load_base_model
    from mixsga import load_mixsga

    path = tmp_path / "model"
    shutil.copytree(saved_mixsga, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_mixsga(str(path))
    with pytest.raises(ValueError, match=re.escape(str(weights))):
        _read_state_dict(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_base_model(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "legacy"])
def test_damaged_trained_checkpoints_name_the_directory(tmp_path, saved_mixsga, damage):
    """A trained checkpoint the run cannot load is named, with the fix (retrain), before any evaluation."""
    import shutil

    import torch

    from harness.methods import get_method
    from harness.orchestration.run import LEGACY_MODEL_FILE, load_trained

    path = tmp_path / "trained"
    shutil.copytree(saved_mixsga, path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    if damage == "legacy":  # a checkpoint of the old format: a state dict and no Hugging Face files
        shutil.rmtree(path)
        path.mkdir()
        torch.save({"w": torch.zeros(4)}, path / LEGACY_MODEL_FILE)
    elif damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    method = get_method("mixsga")
    params = {"ratios": [3, 1, 6], "group_sizes": [1, 2, 4]}
    expected = "old model.pt format" if damage == "legacy" else "delete it to retrain"
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expected):
        load_trained(method, path, params, dtype=torch.float32, device="cpu")


# --- corrupt outputs: refused at workflow start ---

def test_check_records_names_a_truncated_record_and_accepts_valid_ones(tmp_path, make_record):
    from harness.orchestration.checks import check_records
    from harness.orchestration.records import write_record

    good, bad = make_record(seed=0), make_record(seed=1)
    ids = [good["identity"]["run_id"], bad["identity"]["run_id"]]
    write_record(tmp_path / f"{ids[0]}.json", good)
    check_records(tmp_path, ids + ["absent__none__base__kv100__s0"])  # valid and missing records pass
    path = write_record(tmp_path / f"{ids[1]}.json", bad)
    text = path.read_text()
    stat = path.stat()
    path.write_text(text[: len(text) // 2])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # truncated by hand, mtime kept
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        check_records(tmp_path, ids)
    assert ids[0] not in str(info.value)
    path.write_text(json.dumps({"identity": {"run_id": ids[1]}}))  # valid JSON, not a record
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        check_records(tmp_path, ids)


# --- the workflow: the same checks, before Snakemake builds a job (3 dry runs, ~2 s each) ---

def _snakemake_n(*configfiles: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", *map(str, configfiles)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_workflow_refuses_what_check_config_refuses(tmp_path):
    files = _config_files(tmp_path, "experiments: {}\n")
    done = _snakemake_n(*files)
    assert done.returncode != 0
    _assert_names(done.stdout + done.stderr, [r"overlay\.yaml", "'experiments'"])
    _nothing_written(tmp_path)


def test_workflow_refuses_a_truncated_record_naming_it(tmp_path, make_record):
    from harness.orchestration.records import write_record

    files = _config_files(tmp_path, "profile: test\n")
    run_id = next(r["run_id"] for r in run_table(resolve_config(files)) if r["method"] == "h2o")
    record = make_record()
    path = write_record(tmp_path / "results" / "records" / f"{run_id}.json", record)
    path.write_text(path.read_text()[:100])
    done = _snakemake_n(*files)
    assert done.returncode != 0
    _assert_names(done.stdout + done.stderr, [re.escape(str(path)), "corrupt"])
    assert sorted(p.name for p in (tmp_path / "results").rglob("*")) == sorted(["records", path.name])
    assert not (tmp_path / "work").exists()


def test_workflow_plans_the_same_grid_as_the_cli(tmp_path):
    files = _config_files(tmp_path, "profile: test\n")
    done = _snakemake_n(*files)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = run_table(resolve_config(files))
    planned = set(re.findall(r"records/([^\s/]+)\.json", done.stdout))
    assert planned == {r["run_id"] for r in rows}
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()

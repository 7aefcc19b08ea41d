"""Derived code hashes: editing a module in a scratch copy replans exactly the jobs that run it.

The scratch copy holds the repository's code and the CI config's outputs, created empty and
recorded by ``snakemake --touch`` (which stores each job's params, the code hash among them).
After an edit a dry run plans again the jobs whose hash changed, plus what consumes their outputs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from harness.orchestration.codehash import CodeHashes, ImportGraph
from harness.orchestration.config import load_config, run_table, train_table

SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
CI_CONFIG = ".test/config/config.yaml"
#: Eviction method names (a stacked method starts with one): the four policies and the budget
#: redistributions over them (PyramidKV, AdaKV), which run baselines/eviction.py too.
EVICTIONS = ("h2o", "streamingllm", "snapkv", "tova", "pyramidkv", "adakv")
#: The rules running `python -m analysis`.
ANALYSIS_RULES = {"collate_all", "collate_experiment", "experiment", "experiment_figure", "pareto_tables",
                  "perf_tables", "figure1_tables", "table9_tables", "recovery_curves_tables"}


def write(root: Path, files: dict[str, str]) -> None:
    """Write a tree of small files under ``root``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def rule_blocks(root: Path) -> list[tuple[str, str]]:
    """(rule name, its text) of every rule in the workflow's .smk files."""
    return [block for smk in sorted((root / "workflow/rules").glob("*.smk"))
            for block in re.findall(r"(?ms)^rule (\w+):\n(.*?)(?=^rule |\Z)", smk.read_text())]


def test_closure_follows_static_imports_without_executing(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "from pkg import heavy\n",
        "pkg/heavy.py": "raise RuntimeError('never executed')\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/a.py": "from . import b\nfrom .c import thing\nimport torch\n",
        "pkg/sub/b.py": "def f():\n    from pkg.sub import d  # function-level, submodule by from-import\n",
        "pkg/sub/c.py": "thing = 1\n",
        "pkg/sub/d.py": "from ..other import x\n",
        "pkg/other.py": "x = 1\n",
        "lone.py": "import pkg.sub.c\n",
    })
    graph = ImportGraph(tmp_path)
    assert graph.imports("pkg.sub.a") == {"pkg.sub.b", "pkg.sub.c"}
    files = CodeHashes(tmp_path).closure(["pkg.sub.a"])
    # parent packages are hashed, but pkg/__init__'s own import (heavy) is not followed
    assert files == {"pkg/__init__.py", "pkg/sub/__init__.py", "pkg/sub/a.py", "pkg/sub/b.py", "pkg/sub/c.py",
                     "pkg/sub/d.py", "pkg/other.py"}
    assert CodeHashes(tmp_path).closure(["lone"]) == {"lone.py", "pkg/__init__.py", "pkg/sub/__init__.py",
                                                      "pkg/sub/c.py"}
    # importing the package itself runs its __init__'s imports
    assert "pkg/heavy.py" in CodeHashes(tmp_path).closure(["pkg"])
    with pytest.raises(ValueError, match="not a module of the repository"):
        CodeHashes(tmp_path).closure(["nowhere"])


def test_command_covers_its_function_and_the_registry_cut(tmp_path):
    write(tmp_path, {
        "tool/__init__.py": "",
        "tool/__main__.py": "from tool.cli import main\nmain()\n",
        "tool/cli.py": (
            "def _shared():\n    from tool import common\n"
            "def cmd_one(args):\n    _shared()\n    from tool import one\n"
            "def cmd_two(args):\n    from tool import two\n"
            "def main():\n    add('one', cmd_one, 'help')\n    add('two', cmd_two, 'help')\n"
        ),
        "tool/common.py": "", "tool/one.py": "from harness.methods import get_method\n", "tool/two.py": "",
        "harness/__init__.py": "",
        "harness/methods/__init__.py": "from mixsga.impl import go\nfrom harness.methods import shared\n"
                                       "def get_method(name):\n    pass\n",
        "harness/methods/shared.py": "",
        "mixsga/__init__.py": "", "mixsga/impl.py": "",
    })
    hashes = CodeHashes(tmp_path)
    hashes_cut = hashes.command("tool one", cut=True)
    assert {"tool/cli.py", "tool/common.py", "tool/one.py", "harness/methods/__init__.py"} <= hashes_cut
    assert "tool/two.py" not in hashes_cut and "mixsga/impl.py" not in hashes_cut
    # harness.methods' other modules are method code too: a job gets them through its method's modules
    assert "harness/methods/shared.py" not in hashes_cut
    assert "mixsga/impl.py" in hashes.command("tool one")
    assert hashes.command("tool two") == {"tool/__init__.py", "tool/__main__.py", "tool/cli.py", "tool/two.py"}


def test_rules_hash_the_command_they_run():
    """Each rule's `code=command_code("...")` names the `python -m ...` its shell line runs."""
    checked = 0
    for name, body in rule_blocks(REPO_ROOT):
        command = re.search(r"python -m ([\w.]+)(?: ([a-z][\w-]*))?", body)
        if command is None:
            assert "code=" not in body, f"rule {name} hashes code but runs no `python -m`"
            continue
        code = re.search(r"code=(\w+)(?:\(\"([^\"]+)\"\))?", body)
        assert code is not None, f"rule {name} runs `python -m` without a code hash param"
        if code.group(1) in ("train_code", "run_code"):
            assert command.groups() == ("harness", name), name
        elif code.group(1) == "bench_code":  # the benchmark and every method it times
            assert command.groups() == ("harness.measurement.bench", None), name
        else:
            assert code.group(1) == "command_code", name
            assert code.group(2) == " ".join(g for g in command.groups() if g), name
        checked += 1
    assert checked >= 17


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """The repository's code in a scratch directory, every CI-config job recorded as done."""
    if SNAKEMAKE is None:
        pytest.skip("snakemake is not installed")
    root = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO_ROOT / name
        if name.split("/")[0] in ("work", "results") or not source.is_file():
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, root / name)
    summary = snakemake(root, "--summary")
    directories = {name for name, body in rule_blocks(root) if "directory(" in body}
    for line in summary.splitlines():
        fields = line.split("\t")
        if len(fields) < 6 or fields[0] == "output_file":
            continue
        path = root / fields[0]
        if fields[2] in directories:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    snakemake(root, "--touch", "--forceall")  # records every job's params, as a real run would
    return root


def snakemake(root: Path, *args: str) -> str:
    # the placeholder outputs are empty files, not records: skip the start-up record check
    proc = subprocess.run([SNAKEMAKE, "--cores", "1", "--configfile", CI_CONFIG, *args,
                           "--config", "check_records=False"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def planned_after_edit(root: Path, module: str) -> dict[tuple[str, str], str]:
    """Jobs a dry run plans after appending a comment to ``module``: (rule, output) -> reason."""
    path = root / module
    before = path.read_bytes()
    path.write_bytes(before + b"\n# edited by tests/test_codehash.py\n")
    try:
        out = snakemake(root, "-n")
    finally:
        path.write_bytes(before)
    jobs = {}
    for block in re.split(r"(?m)^rule ", out)[1:]:
        rule = block.split(":", 1)[0]
        output = re.search(r"^\s+output: (.*)$", block, re.M)
        reason = re.search(r"^\s+reason: (.*)$", block, re.M)
        if reason is None:  # the job statistics' rule column, not a job
            continue
        jobs[(rule, output.group(1).split(", ")[0] if output else "")] = reason.group(1)
    return jobs


@pytest.fixture(scope="module")
def grid() -> tuple[list[dict], dict[str, dict]]:
    """The CI config's runs and trainings (as the workflow expands them)."""
    cfg = load_config([REPO_ROOT / "config/config.yaml", REPO_ROOT / CI_CONFIG])
    rows = run_table(cfg)
    return rows, train_table(cfg, rows)


def runs_and_trains(jobs) -> tuple[set[str], set[str]]:
    """Run ids and train ids among planned jobs."""
    runs = {Path(out).stem for rule, out in jobs if rule == "run"}
    trains = {Path(out).name for rule, out in jobs if rule == "train"}
    return runs, trains


def bench_jobs(jobs, rows, method: str) -> bool:
    """Whether exactly the benchmark jobs of the models whose main grid has ``method`` are planned."""
    planned = {Path(out).stem for rule, out in jobs if rule == "perf_bench"}
    return planned == {r["model"] for r in rows if "main" in r["experiments"] and r["method"] == method}


def other_rules(jobs) -> set[str]:
    """Rules of the planned jobs besides runs, trainings and the analysis of their records."""
    return {rule for rule, _ in jobs} - {"run", "train", "all"} - ANALYSIS_RULES


def by_hash(jobs, rule: str) -> bool:
    """Whether the planned jobs of ``rule`` are planned because their params (the code hash) changed."""
    reasons = [reason for (r, _), reason in jobs.items() if r == rule]
    return bool(reasons) and all(reason.startswith("Params have changed") for reason in reasons)


@pytest.mark.slow
def test_method_edit_replans_only_that_methods_jobs(scratch, grid):
    rows, trains = grid
    jobs = planned_after_edit(scratch, "mixsga/routing.py")
    runs, trained = runs_and_trains(jobs)
    assert runs == {r["run_id"] for r in rows if "mixsga" in r["method"].split("+")}
    assert trained == {t for t, spec in trains.items() if spec["architecture"]["method"] == "mixsga"}
    assert by_hash(jobs, "train")
    # the overheads measure mixSGA and GQA through the registry, which imports every method; the cost
    # benchmark of each model whose main grid has a mixSGA run times it
    assert other_rules(jobs) == {"overheads", "perf_bench"} and by_hash(jobs, "overheads")
    # (Snakemake names only the retrained checkpoints as their reason; the eviction edit below shows the hash)
    assert bench_jobs(jobs, rows, "mixsga")

    jobs = planned_after_edit(scratch, "baselines/eviction.py")
    runs, trained = runs_and_trains(jobs)
    assert runs == {r["run_id"] for r in rows if r["method"].split("+")[0] in EVICTIONS}
    assert trained == set(), "evicting runs share their inner model's weights: nothing retrains"
    assert by_hash(jobs, "run")
    assert other_rules(jobs) == {"overheads", "perf_bench"} and by_hash(jobs, "overheads")
    assert bench_jobs(jobs, rows, "h2o") and by_hash(jobs, "perf_bench")



@pytest.mark.slow
def test_shared_harness_edit_replans_everything_that_runs_it(scratch, grid):
    rows, trains = grid
    jobs = planned_after_edit(scratch, "harness/evaluation/perplexity.py")
    assert runs_and_trains(jobs) == ({r["run_id"] for r in rows}, set(trains))
    assert by_hash(jobs, "unigram") and by_hash(jobs, "pretrain")
    assert not {"corpus", "instruct", "tokenizer"} & other_rules(jobs)


@pytest.mark.slow
def test_analysis_and_unrelated_edits(scratch):
    jobs = planned_after_edit(scratch, "analysis/pareto.py")
    assert {rule for rule, _ in jobs} == ANALYSIS_RULES | {"all"}
    # the analysis rules reading records or JSON (the others read their tables)
    assert all(by_hash(jobs, rule) for rule in ("collate_all", "collate_experiment", "figure1_tables", "table9_tables",
                                                "recovery_curves_tables"))
    # no rule runs the benchmarks
    assert planned_after_edit(scratch, "benchmarks/decode.py") == {}


def rule_commands() -> dict[str, str]:
    """rule -> the `python -m` command its code hash names (train and run: `harness train` / `harness run`)."""
    commands = {}
    for name, body in rule_blocks(REPO_ROOT):
        code = re.search(r'code=command_code\("([^"]+)"\)', body)
        if code:
            commands[name] = code.group(1)
        elif "code=train_code" in body or "code=run_code" in body:
            commands[name] = f"harness {name}"
        elif "code=bench_code" in body:
            commands[name] = "harness.measurement.bench"
    return commands


@pytest.mark.parametrize(("module", "changed"), [
    # the entry point of every harness command, and the config code: in no hand-kept list before
    ("harness/cli.py", {"corpus", "instruct", "tokenizer", "unigram", "pretrain", "train", "run"}),
    ("harness/orchestration/config.py", {"train", "run", "perf_bench"}),
])
def test_entry_points_are_covered(tmp_path, module, changed):
    """Which rules' hashes an edit changes, through the hashes the workflow computes."""
    for name in ("harness", "analysis", "mixsga", "baselines", "kvledger", "hfconvert"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    commands = rule_commands()

    def hashes() -> dict[str, tuple[str, ...]]:
        code = CodeHashes(tmp_path)
        return {rule: (code.command_hash(cmd),) + tuple(code.method_job_hash(cmd, m) for m in ("base", "gqa", "mixsga"))
                for rule, cmd in commands.items()}

    before = hashes()
    with open(tmp_path / module, "a") as fh:
        fh.write("\n# edited by tests/test_codehash.py\n")
    after = hashes()
    assert {rule for rule in commands if before[rule] != after[rule]} == changed

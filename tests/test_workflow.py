"""The Snakemake workflow: dry runs list the grid, bad configs stop it before any job, lint is clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

SNAKEMAKE = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or shutil.which("snakemake")
pytestmark = pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed")


def snakemake(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "--nolock", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    stats = output.split("Job stats:", 1)[1]
    counts = {}
    for line in stats.splitlines():
        match = re.match(r"^([A-Za-z_]\w*)\s+(\d+)$", line.strip())
        if match and match.group(1) != "total":
            counts[match.group(1)] = int(match.group(2))
        if line.startswith("total"):
            break
    return counts


def override(tmp_path: Path, **extra) -> Path:
    """A config file that sends every output under tmp_path (so existing outputs don't hide jobs)."""
    path = tmp_path / "override.yaml"
    cfg = {"paths": {"work": str(tmp_path / "work"), "results": str(tmp_path / "results")}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def all_rules() -> set[str]:
    proc = snakemake("--list-rules")
    assert proc.returncode == 0, proc.stderr
    return {line.strip() for line in proc.stdout.splitlines() if line.strip()}


TARGETS = (
    "figure1_token_importance", "table1_sft", "table2_cpt", "table3_eviction_stack", "table4_middle_ratio",
    "table5_expert_count", "table6_router", "table9_overheads", "table11_ratio_grid", "figure3_budget_sweep",
    "pareto", "perf", "recovery_curves", "paper_sft", "report",
)


def test_default_dry_run_lists_the_grid(tmp_path):
    proc = snakemake("-n", "--cores", "1", "--configfile", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = job_counts(proc.stdout)
    # one seed, the SFT tables left to their targets (config default_skip): 28 + 4 CPT checkpoints, no SFT
    assert counts["run"] == 88 and counts["train"] == 32 and counts["pretrain"] == 4
    assert counts["experiment"] == 4 and counts["collate_experiment"] == 4 and counts["experiment_figure"] == 1
    assert counts["perf_bench"] == 4  # one cost benchmark per family
    for family in ("llama3", "tinyllama", "opt", "gemma2"):
        assert f"records/{family}__cpt__base__kv100__s0.json" in proc.stdout
    assert "trained/tinyllama__cpt__mixsga__kv50__s0" in proc.stdout and "__sft__" not in proc.stdout
    assert not (tmp_path / "work").exists(), "a dry run must not write outputs"
    # the SFT tables stay targets; config/full.yaml puts everything back into `all`
    proc = snakemake("paper_sft", "-n", "--cores", "1", "--configfile", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = job_counts(proc.stdout)
    assert counts["train"] == 23 and counts["experiment"] == 5 and "perf_bench" not in counts
    proc = snakemake("-n", "--cores", "1", "--configfile", str(REPO_ROOT / "config" / "full.yaml"),
                     str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = job_counts(proc.stdout)
    assert counts["run"] == 278 and counts["train"] == 134 and counts["experiment"] == 9


def test_each_target_builds_only_what_it_needs(tmp_path):
    proc = snakemake("table6_router", "-n", "--cores", "1", "--configfile", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = job_counts(proc.stdout)
    # 4 router variants x 1 seed on gemma2 only: one base model pretrained, four SFT checkpoints
    assert counts["run"] == 4 and counts["train"] == 4 and counts["pretrain"] == 1
    assert "figure1" not in proc.stdout and "overheads" not in counts
    proc = snakemake("table9_overheads", "-n", "--cores", "1", "--configfile", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "run" not in job_counts(proc.stdout) and job_counts(proc.stdout)["overheads"] == 1


def test_the_cost_benchmark_claims_every_core_so_it_runs_alone(tmp_path):
    import re

    proc = snakemake("perf", "-n", "--cores", "3", "--configfile", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    blocks = [b for b in re.split(r"(?m)^(?:local)?rule ", proc.stdout) if b.startswith("perf_bench:")]
    assert len(blocks) == 4 and all(re.search(r"^\s+threads: 3$", b, re.M) for b in blocks)
    # it reads the trained checkpoints of the first seed only
    assert all("__s0" in b and "__s1" not in b.split("output:")[0] for b in blocks)


def test_every_named_target_exists(tmp_path):
    assert set(TARGETS) <= all_rules()
    proc = snakemake(*TARGETS, "-n", "--cores", "1", "--configfile", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_config_touches_every_rule(tmp_path):
    proc = snakemake(
        "all", *TARGETS, "-n", "--cores", "1", "--configfile", ".test/config/config.yaml", str(override(tmp_path))
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(job_counts(proc.stdout)) == all_rules()


def test_paper_profile_downloads_instead_of_pretraining(tmp_path):
    proc = snakemake("-n", "--cores", "1", "--configfile", "config/paper.yaml", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = job_counts(proc.stdout)
    assert counts["run"] == 105 and counts["train"] == 65
    assert "pretrain" not in counts and "corpus" not in counts and "tokenizer" not in counts


def printed_specs(output: str, command: str) -> list[dict]:
    """The --spec JSON of every `python -m harness {command}` shell command a `-n -p` run prints."""
    import json
    import shlex

    specs = []
    for line in output.splitlines():
        if f"python -m harness {command} --spec" in line:
            words = shlex.split(line)
            specs.append(json.loads(words[words.index("--spec") + 1]))
    return specs


@pytest.mark.parametrize("profile, recipes", [
    ("config/paper.yaml", {"cpt": ("cpt_paper", None), "sft": ("sft_paper_opt", None)}),
    ("config/gpu.yaml", {"cpt": ("cpt_offline", "gpu"), "sft": ("sft_offline", "gpu")}),
])
def test_profiles_train_with_their_own_recipes_in_the_workflow(tmp_path, profile, recipes):
    """What Snakemake itself resolves (not only load_config): a profile's overrides replace the default's."""
    proc = snakemake("-n", "-p", "--cores", "1", "--configfile", profile, str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    specs = printed_specs(proc.stdout, "train")
    assert specs and {s["kind"] for s in specs} == {"cpt", "sft"}
    own = yaml.safe_load((REPO_ROOT / profile).read_text())["training"]
    for spec in specs:
        name, overrides_from = recipes[spec["kind"]]
        assert spec["recipe"] == name, spec["train_id"]
        assert spec["overrides"] == (own[spec["kind"]]["overrides"] if overrides_from else {}), spec["train_id"]


def test_slurm_profile_dry_run(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="the SLURM executor plugin is not installed")
    proc = snakemake("-n", "--workflow-profile", "workflow/profiles/slurm", "--configfile", "config/paper.yaml",
                     str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert job_counts(proc.stdout)["run"] == 105


def test_slurm_profile_declares_gpu_resources():
    profile = yaml.safe_load((REPO_ROOT / "workflow" / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    for rule in ("pretrain", "train", "run"):
        assert profile["set-resources"][rule]["gpu"] == 1, rule


def test_bad_config_stops_before_any_job(tmp_path):
    bad = override(tmp_path, pretrain={"steps": 0}, experiments={"main": {"runs": [{"method": "nope"}]}})
    proc = snakemake("--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "config key 'pretrain.steps': 0 is less than the minimum of 1" in message
    assert "config key 'experiments.main.runs[0].method'" in message
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


def test_lint_is_clean():
    proc = snakemake("--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr

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


def test_default_dry_run_lists_the_grid(tmp_path):
    proc = snakemake("-n", "--cores", "1", "--configfile", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = job_counts(proc.stdout)
    assert counts == {
        "all": 1, "corpus": 1, "instruct": 1, "tokenizer": 1, "unigram": 1, "pretrain": 4,
        "run": 4, "grid": 1, "collate": 1, "figure_perplexity": 1,
    }
    for family in ("llama3", "tinyllama", "opt", "gemma2"):
        assert f"records/{family}__base__kv100__s0.json" in proc.stdout
    assert not (tmp_path / "work").exists(), "a dry run must not write outputs"


def test_more_seeds_mean_more_runs_not_more_models(tmp_path):
    proc = snakemake("-n", "--cores", "1", "--configfile", str(override(tmp_path, seeds=[0, 1, 2])))
    assert proc.returncode == 0, proc.stderr
    counts = job_counts(proc.stdout)
    assert counts["run"] == 12 and counts["pretrain"] == 4


def test_ci_config_touches_every_rule(tmp_path):
    proc = snakemake(
        "-n", "--cores", "1", "--configfile", ".test/config/config.yaml", str(override(tmp_path))
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(job_counts(proc.stdout)) == all_rules()


def test_paper_profile_downloads_instead_of_pretraining(tmp_path):
    proc = snakemake("-n", "--cores", "1", "--configfile", "config/paper.yaml", str(override(tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = job_counts(proc.stdout)
    assert counts["run"] == 7
    assert "pretrain" not in counts and "corpus" not in counts and "tokenizer" not in counts


def test_bad_config_stops_before_any_job(tmp_path):
    bad = override(tmp_path, pretrain={"steps": 0}, methods=["base", "nope"])
    proc = snakemake("--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "config key 'pretrain.steps': 0 is less than the minimum of 1" in message
    assert "config key 'methods[1]': 'nope' is not one of" in message
    assert not (tmp_path / "work").exists() and not (tmp_path / "results").exists()


def test_lint_is_clean():
    proc = snakemake("--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""environment.yml (conda) and pyproject.toml must pin the same packages at the same versions."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO_ROOT

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)$")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(requirements: list[str], where: str) -> dict[str, str]:
    pins = {}
    for req in requirements:
        match = PIN.match(req.strip())
        assert match, f"{where}: {req!r} is not pinned as name==version"
        pins[_canon(match.group(1))] = match.group(2)
    return pins


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _environment() -> dict:
    return yaml.safe_load((REPO_ROOT / "environment.yml").read_text())


def _conda_pip_requirements(env: dict) -> list[str]:
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    return pip_sections[0]


def test_environment_and_pyproject_pin_the_same_packages():
    project = _pyproject()["project"]
    wanted = _pins(project["dependencies"], "pyproject dependencies")
    wanted.update(_pins(project["optional-dependencies"]["dev"], "pyproject dev extra"))
    conda = _pins(_conda_pip_requirements(_environment()), "environment.yml pip")
    missing = sorted(set(wanted) - set(conda))
    extra = sorted(set(conda) - set(wanted))
    differ = {k: (wanted[k], conda[k]) for k in set(wanted) & set(conda) if wanted[k] != conda[k]}
    assert not missing, f"in pyproject.toml but not environment.yml: {missing}"
    assert not extra, f"in environment.yml but not pyproject.toml: {extra}"
    assert not differ, f"versions differ (pyproject, environment.yml): {differ}"


def test_python_version_agrees():
    env = _environment()
    conda_python = [d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert conda_python == ["python=3.11"], conda_python
    requires = _pyproject()["project"]["requires-python"]
    assert ">=3.11" in requires, requires


def test_required_packages_are_pinned():
    pins = _pins(_pyproject()["project"]["dependencies"], "pyproject")
    assert pins["torch"] == "2.13.0"
    assert pins["transformers"].startswith("5.")
    for name in ("datasets", "pandas", "matplotlib", "snakemake", "rouge-score", "nvidia-ml-py", "jsonschema"):
        assert name in pins, f"{name} missing from pyproject dependencies"
    assert "pytest" in _pins(_pyproject()["project"]["optional-dependencies"]["dev"], "dev")

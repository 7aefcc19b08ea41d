"""Provenance of a run: git state, package versions, interpreter, platform, device, time."""

from __future__ import annotations

import datetime as _dt
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from harness.allocator import allocator_settings

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Distributions whose versions can change a number in a record.
TRACKED_PACKAGES = (
    "mixsga-bench",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "datasets",
    "accelerate",
    "numpy",
    "pandas",
    "rouge-score",
    "nltk",
    "lm-eval",
    "snakemake",
)


def utc_now() -> str:
    """Current UTC time as an RFC 3339 string with a 'Z' suffix."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def git_state(repo: str | Path = REPO_ROOT) -> dict[str, Any]:
    """Commit hash and whether tracked files differ from it; nulls outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # untracked files (results, caches) do not change what the code computes
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    """What ran the job: device type and name, torch threads, CUDA / driver versions on GPU."""
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {
        "type": dev.type,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            total_memory_bytes=props.total_memory,
            capability=f"{props.major}.{props.minor}",
        )
    else:
        info["name"] = _cpu_name()
    return info


def resolve_device(requested: str) -> str:
    """Map the config's device ('cpu', 'cuda', 'auto') to a torch device string.

    'cuda' without a GPU is an error rather than a silent CPU run.
    """
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}; expected 'cpu', 'cuda' or 'auto'")
    return requested


def collect_provenance(
    *,
    seed: int,
    device: str,
    dataset_fingerprint: Mapping[str, Any] | None,
    started_at: str,
    finished_at: str | None = None,
) -> dict[str, Any]:
    """The provenance section of a record."""
    return {
        "git": git_state(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": device_info(device),
        "seed": int(seed),
        "allocator": allocator_settings(),
        "dataset_fingerprint": dict(dataset_fingerprint) if dataset_fingerprint is not None else None,
        "started_at": started_at,
        "finished_at": finished_at or utc_now(),
    }

"""Provenance: git state, package versions, device, and a provenance section that validates."""

from __future__ import annotations

import re

import pytest
import torch

from harness.orchestration.provenance import (
    collect_provenance,
    device_info,
    git_state,
    package_versions,
    resolve_device,
    utc_now,
)
from harness.orchestration.records import validate_record


def test_git_state_in_the_repository(repo_root):
    state = git_state(repo_root)
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"])
    assert isinstance(state["dirty"], bool)


def test_git_state_outside_a_repository(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_package_versions():
    versions = package_versions(("torch", "no-such-distribution-xyz"))
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["no-such-distribution-xyz"] is None


def test_device_info_cpu():
    info = device_info("cpu")
    assert info["type"] == "cpu" and info["name"] and info["torch_threads"] >= 1


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            resolve_device("cuda")


def test_collected_provenance_fits_the_record_schema(make_record):
    started = utc_now()
    prov = collect_provenance(seed=0, device="cpu", dataset_fingerprint={"sha256": "x"}, started_at=started)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["finished_at"])
    assert prov["packages"]["transformers"] and "mixsga-bench" in prov["packages"]
    record = make_record()
    record["provenance"] = prov
    validate_record(record)

"""harness.allocator: glibc keeps freed memory, so repeated large temporaries stop page-faulting.

Each case runs in a child process: malloc settings are per process and cannot be undone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc",
                           reason="mallopt settings are glibc's")

CHILD = r"""
import copy, json, resource
import torch
from transformers import AutoModelForCausalLM
from harness.allocator import allocator_settings, tune_allocator
from harness.measurement.overheads import VocabOnly
from harness.methods import get_method
from harness.models.zoo import build_config
applied = tune_allocator()
assert tune_allocator() == applied  # idempotent
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(build_config("llama3", "tiny", VocabOnly(512, bos_token_id=2, eos_token_id=1)),
                                         dtype=torch.float32).eval()
# an explicit-attention prefill: 64 MiB of probabilities a layer, [1, 4, 4, 1024, 1024] float32,
# above the 32 MiB up to which glibc's default would stop mmap-ing blocks once freed
method = get_method("h2o")
params = method.params_for_budget(copy.deepcopy(model.config), 0.25)
model = method.apply(model, params)
ids = torch.randint(3, 512, (1, 1024), generator=torch.Generator().manual_seed(0))
def prefill():
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=method.new_cache(model, params), use_cache=True, logits_to_keep=1).logits
first = prefill()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    assert torch.equal(prefill(), first)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
print(json.dumps({"applied": applied, "settings": allocator_settings(), "faults": faults,
                  "logits": first.flatten()[:8].tolist()}))
"""


def _child(setting: str) -> dict:
    env = {**os.environ, "MIXSGA_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_tuned_allocator_reuses_freed_memory_and_the_system_one_faults_it_afresh():
    tuned, system = _child("tuned"), _child("system")
    assert tuned["applied"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1, "M_TOP_PAD": 64 * 2**20}
    assert tuned["settings"]["malloc"] == "glibc mallopt"
    assert system["applied"] is None and system["settings"] == {"malloc": "system defaults",
                                                                "reason": "MIXSGA_MALLOC=system"}
    # glibc's defaults page-fault the prefill's large temporaries afresh on every call; kept memory does not
    assert system["faults"] > 5_000 and tuned["faults"] < system["faults"] / 5
    assert tuned["logits"] == system["logits"]  # the same arithmetic: identical values


def test_records_carry_the_allocator_in_their_provenance():
    from harness.orchestration.provenance import collect_provenance

    prov = collect_provenance(seed=0, device="cpu", dataset_fingerprint=None, started_at="2026-01-01T00:00:00Z")
    assert "malloc" in prov["allocator"]

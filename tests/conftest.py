"""Shared fixtures: one torch thread, repository paths, a tiny tokenizer factory, valid run records."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (mixsga.kernels) run under Triton's interpreter on CPU tensors. The variable
    # must be set before anything imports triton (transformers' model modules do, via torch).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine contention dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Callable[..., Any]:
    """``tiny_tokenizer(texts, vocab_size=300)``: a byte-level BPE trained on ``texts``."""
    from harness.data.tokenizer import train_tokenizer

    def make(texts: list[str], vocab_size: int = 300):
        corpus = tmp_path_factory.mktemp("corpus")
        (corpus / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=vocab_size)

    return make


@pytest.fixture
def repo_root() -> Path:
    """The repository root (where the Snakefile lives)."""
    return REPO_ROOT


def _record(
    *,
    model: str = "llama3",
    family: str = "llama3",
    method: str = "base",
    budget: float = 1.0,
    seed: int = 0,
    ppl_token: float = 50.0,
    ppl_unigram: float | None = 500.0,
) -> dict[str, Any]:
    import yaml

    from harness.orchestration.config import make_run_id, run_spec, validate_config
    from harness.orchestration.provenance import utc_now
    from harness.orchestration.records import new_record

    run = {"method": method} if method == "base" else {"method": method, "budgets": [budget]}
    raw = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    raw.update(models=[{"name": model, "family": family, "size": "tiny"}], seeds=[seed],
               experiments={"main": {"training": "none", "runs": [run]}}, default_skip=[])
    cfg = validate_config(raw)
    spec = run_spec(cfg, make_run_id(model, method, budget, seed))
    now = utc_now()
    provenance = {
        "git": {"commit": "0" * 40, "dirty": False},
        "packages": {"torch": "2.13.0", "transformers": "5.17.0"},
        "python": "3.11.7",
        "platform": "Linux-test",
        "hostname": "test-host",
        "device": {"type": "cpu", "name": "test cpu"},
        "seed": seed,
        "dataset_fingerprint": {"eval_texts_sha256": "ab" * 32, "eval_documents": 3},
        "started_at": now,
        "finished_at": now,
    }
    return new_record(
        spec=spec,
        provenance=provenance,
        budget={
            "nominal": budget,
            "realized": budget,
            "analytic_bytes_per_token": 1024.0 * budget,
            "base_bytes_per_token": 1024.0,
            "measured_bytes": 1024.0 * budget * 16,
            "base_measured_bytes": 1024.0 * 16,
            "measured_tokens": 16,
            "dtype": "float32",
            "params": None,
        },
        quality={
            "ppl_token": ppl_token,
            "ppl_word": ppl_token * 2,
            "ppl_unigram": ppl_unigram,
            "eval_set": "corpus:test",
            "eval_tokens": 1000,
            "eval_words": 400,
        },
        flags={"simulated": False, "query_aware": None},
        wall_time_s=1.5,
    )


@pytest.fixture
def make_record() -> Callable[..., dict[str, Any]]:
    """Factory of valid records (keyword arguments: model, family, method, budget, seed, ppl_token, ppl_unigram)."""
    return lambda **kw: copy.deepcopy(_record(**kw))

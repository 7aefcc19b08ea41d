"""lm-evaluation-harness integration on tiny models, fully offline: local held-out tasks whose
numbers are checked against an independent computation, and a mixSGA-converted model."""

from __future__ import annotations

import json
import math
import re
import socket

import pytest
import torch

from baselines.testing import tiny_model
from harness.evaluation.lm_eval_adapter import (
    LOCAL_MC_TASK,
    LOCAL_PPL_TASK,
    PAPER_TASKS,
    build_local_tasks,
    build_mc_items,
    evaluate_lm,
)
from mixsga import MixSGAConfig, convert_to_mixsga

TEXTS = [(f"def f{i}(x):\n    return x * {i} + {i * i}  # value number {i}\n") * 2 for i in range(10)]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r:.200}")

    # evaluate_lm sets these itself; setting them here first makes monkeypatch restore them afterwards.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return build_local_tasks(TEXTS, tmp_path_factory.mktemp("tasks"), context_chars=50, continuation_chars=16,
                             max_mc_items=6, max_ppl_docs=3)


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)


def _independent(model, tok, items, docs):
    """Accuracy (argmax of summed choice log-probabilities, <bos> + context) and word perplexity."""
    bos = tok.bos_token_id
    correct = 0
    for item in items:
        ctx = tok(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tok(item["context"] + choice, add_special_tokens=False)["input_ids"]
            ids = [bos, *whole]
            lp = _logprobs(model, ids)
            scores.append(sum(float(lp[i - 1, ids[i]]) for i in range(1 + len(ctx), len(ids))))
        correct += max(range(len(scores)), key=scores.__getitem__) == item["label"]
    ll, words = 0.0, 0
    for doc in docs:
        ids = [bos, *tok(doc, add_special_tokens=False)["input_ids"]]
        lp = _logprobs(model, ids)
        ll += sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
        words += len(re.split(r"\s+", doc))
    return correct / len(items), math.exp(-ll / words)


def test_local_tasks_match_an_independent_computation(tok, tasks):
    model = tiny_model("llama", vocab_size=len(tok))
    out = evaluate_lm(model, tok, tasks, batch_size=4)
    items = [json.loads(line) for line in open(tasks[0]["dataset_kwargs"]["data_files"]["test"])]
    docs = [json.loads(line)["text"] for line in open(tasks[1]["dataset_kwargs"]["data_files"]["test"])]
    acc, word_ppl = _independent(model, tok, items, docs)
    assert out["results"][LOCAL_MC_TASK]["acc"] == pytest.approx(acc)
    # <bos> once before each document: lm-eval's default would add a second, scored one.
    assert out["results"][LOCAL_PPL_TASK]["word_perplexity"] == pytest.approx(word_ppl, rel=1e-5)
    assert out["n_samples"][LOCAL_MC_TASK]["effective"] == len(items) == 6
    assert out["lm_eval_version"] and out["num_fewshot"] == 0


def test_mixsga_model_runs_through_lm_eval(tok, tasks):
    model = convert_to_mixsga(tiny_model("llama", vocab_size=len(tok)), MixSGAConfig(ratios=(3, 1, 6)))
    model.mixsga_runtime.reset_stats()
    out = evaluate_lm(model, tok, tasks, batch_size=2, limit=2)
    assert 0.0 <= out["results"][LOCAL_MC_TASK]["acc"] <= 1.0
    assert math.isfinite(out["results"][LOCAL_PPL_TASK]["word_perplexity"])
    assert model.mixsga_runtime.routing_stats()["prefill_tokens"] > 0  # the converted attention really ran


def test_mc_items_are_deterministic_and_well_formed():
    items = build_mc_items(TEXTS, context_chars=50, continuation_chars=16, num_choices=3, seed=1)
    assert items == build_mc_items(TEXTS, context_chars=50, continuation_chars=16, num_choices=3, seed=1)
    for item in items:
        doc = TEXTS[int(item["id"][3:])]
        assert len(item["choices"]) == 3 and len(set(item["choices"])) == 3
        assert doc.startswith(item["context"] + item["choices"][item["label"]])
    labels = {i["label"] for i in items}
    assert len(labels) > 1  # the gold position varies
    with pytest.raises(ValueError, match="documents are longer"):
        build_mc_items(["short text"], context_chars=50)
    with pytest.raises(ValueError, match="num_choices"):
        build_mc_items(TEXTS, num_choices=1)


def test_bad_task_specs_are_named(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        evaluate_lm(model, tok, [])
    with pytest.raises(ValueError, match="'task' key"):
        evaluate_lm(model, tok, [{"dataset_path": "json"}])
    assert set(PAPER_TASKS) == {"hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "wikitext"}


def test_a_builtin_task_reads_a_local_copy_in_the_hub_layout(tok, tmp_path):
    """arc_easy from ``ai2_arc/ARC-Easy/test-*.parquet`` (no hub): every item scored, accuracy a count / n."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from harness.evaluation.lm_eval_adapter import local_task_config

    (tmp_path / "ai2_arc" / "ARC-Easy").mkdir(parents=True)
    items = [{"id": f"q{i}", "question": f"what is {i}?", "choices": {"text": ["a", "b", "c"], "label": list("ABC")},
              "answerKey": "ABC"[i % 3]} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(items), tmp_path / "ai2_arc" / "ARC-Easy" / "test-00000-of-00001.parquet")
    cfg = local_task_config("arc_easy", tmp_path / "ai2_arc")
    assert cfg["dataset_path"] == "parquet" and cfg["dataset_name"] is None
    assert list(cfg["dataset_kwargs"]["data_files"]) == ["test"] and "training_split" not in cfg
    out = evaluate_lm(tiny_model("llama", vocab_size=len(tok)), tok, [cfg], batch_size=2)
    assert out["n_samples"]["arc_easy"]["effective"] == 5
    assert out["results"]["arc_easy"]["acc"] in {k / 5 for k in range(6)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="zero-shot task 'arc_easy': no 'test' split"):
        local_task_config("arc_easy", tmp_path / "empty")

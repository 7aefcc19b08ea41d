"""lm-evaluation-harness on our (converted) models, through its Python API.

* :func:`evaluate_lm` wraps an already-built ``transformers`` model (base, GQA / CLA / mixSGA
  converted) in lm-eval's ``HFLM`` (``pretrained=<model instance>``) and runs
  ``lm_eval.simple_evaluate`` zero-shot. Scoring is lm-eval's: a full forward per request, so
  it measures architecture-level methods (mixSGA routes every token at prefill, as in the
  paper). Token-eviction methods would be scored *without* eviction here; score those with
  :func:`harness.evaluation.evaluate.bounded_cache_perplexity` instead.
* :data:`PAPER_TASKS` are the paper's continued-pretraining tasks (HellaSwag, PIQA,
  Winogrande, ARC-Easy / Challenge, WikiText-2), which need their hub datasets (cached
  beforehand when running offline).
* :func:`build_local_tasks` makes two offline tasks from held-out text, so the integration
  runs without any hub access: ``heldout_mc``, multiple choice "which continuation really
  follows this passage" (the true continuation against continuations of other held-out
  documents; acc / acc_norm), and ``heldout_ppl``, rolling log-likelihood perplexity of the
  documents (word / byte perplexity, bits per byte), the WikiText-2 protocol.

* :func:`local_task_config` reads a built-in task (e.g. ``arc_easy``) from a local copy of its
  dataset in the hub repository's layout, through ``datasets``' packaged ``parquet`` / ``json``
  builders; :func:`task_datasets` names the hub dataset each task reads (to check the cache).

Nothing here touches the network: the local tasks load JSON files through ``datasets``'
packaged ``json`` builder and :func:`evaluate_lm` sets ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE`` unless the caller allows the hub.
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.atomic import write_jsonl_atomic

PAPER_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "wikitext")
ROLLING_TASKS = frozenset({"wikitext"})  # built-in tasks scored by rolling log-likelihood
LOCAL_MC_TASK = "heldout_mc"
LOCAL_PPL_TASK = "heldout_ppl"


def _cut_at_space(text: str, at: int) -> int | None:
    """The first whitespace position at or after ``at`` (a cut that keeps words whole), or None."""
    for i in range(max(at, 1), len(text)):
        if text[i].isspace():
            return i
    return None


def build_mc_items(
    texts: Sequence[str],
    *,
    context_chars: int = 256,
    continuation_chars: int = 64,
    num_choices: int = 4,
    max_items: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Multiple-choice items ``{"id", "context", "choices", "label"}`` from held-out documents.

    A document long enough is cut after about ``context_chars`` characters (at whitespace); the
    next ~``continuation_chars`` characters are the true continuation and the distractors are
    the continuations of other documents. Choices keep their leading whitespace (the task joins
    context and choice with no delimiter), the gold position is drawn from ``seed``.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be >= 2, got {num_choices!r}")
    if context_chars < 1 or continuation_chars < 1:
        raise ValueError(f"context_chars and continuation_chars must be >= 1, got {context_chars}, "
                         f"{continuation_chars}")
    pieces = []
    for doc_id, text in enumerate(texts):
        cut = _cut_at_space(text, context_chars)
        end = _cut_at_space(text, cut + continuation_chars) if cut is not None else None
        if cut is None or end is None:
            continue
        context, continuation = text[:cut], text[cut:end]
        if context.strip() and continuation.strip():
            pieces.append((doc_id, context, continuation))
    if len(pieces) < num_choices:
        raise ValueError(f"only {len(pieces)} documents are longer than {context_chars} + {continuation_chars} "
                         f"characters; {num_choices} are needed for {num_choices}-way items")
    rng = random.Random(seed)
    items = []
    for k, (doc_id, context, gold) in enumerate(pieces):
        others = {p[2] for j, p in enumerate(pieces) if j != k and p[2] != gold}
        if len(others) < num_choices - 1:
            continue
        choices = rng.sample(sorted(others), num_choices - 1)
        label = rng.randrange(num_choices)
        choices.insert(label, gold)
        items.append({"id": f"doc{doc_id}", "context": context, "choices": choices, "label": label})
        if max_items is not None and len(items) >= max_items:
            break
    return items


def build_local_tasks(
    texts: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    max_mc_items: int | None = 200,
    max_ppl_docs: int | None = 50,
    context_chars: int = 256,
    continuation_chars: int = 64,
    num_choices: int = 4,
) -> list[dict[str, Any]]:
    """Write the held-out JSONL files under ``out_dir``; return the two lm-eval task configs (dicts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = build_mc_items(texts, context_chars=context_chars, continuation_chars=continuation_chars,
                           num_choices=num_choices, max_items=max_mc_items, seed=seed)
    docs = [{"id": f"doc{i}", "text": t} for i, t in enumerate(texts) if t.strip()]
    if max_ppl_docs is not None:
        docs = docs[:max_ppl_docs]
    mc_path, ppl_path = out / f"{LOCAL_MC_TASK}.jsonl", out / f"{LOCAL_PPL_TASK}.jsonl"
    write_jsonl_atomic(mc_path, items)
    write_jsonl_atomic(ppl_path, docs)
    mc = {
        "task": LOCAL_MC_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(mc_path.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "num_choices": num_choices, "seed": seed},
    }
    ppl = {
        "task": LOCAL_PPL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(ppl_path.resolve())}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }
    return [mc, ppl]


@functools.lru_cache(maxsize=1)
def _builtin_tasks():
    """lm-eval's index of its built-in tasks, built once per process (it reads every task YAML)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _task_config(manager, task: str) -> dict[str, Any]:
    """The full YAML config of a registered lm-eval task (``include:`` resolved, functions loaded)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"lm-eval has no task {task!r} defined by a YAML config")
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


def task_datasets(tasks: Sequence[str]) -> dict[str, str | None]:
    """``{task: hub dataset it reads}`` from lm-eval's task registry (None: unknown task)."""
    manager = _builtin_tasks()
    found: dict[str, str | None] = {}
    for task in tasks:
        try:
            found[task] = _task_config(manager, task).get("dataset_path")
        except ValueError:
            found[task] = None
    return found


_DATA_EXTENSIONS = {"parquet": "parquet", "jsonl": "json", "json": "json"}


def local_task_config(task: str, path: str | os.PathLike, *, manager=None) -> dict[str, Any]:
    """lm-eval task ``task`` reading its splits from ``path`` instead of the hub.

    ``path``: a file (every split the task reads) or a directory in the hub repository's layout:
    ``path/<dataset_name>/`` when the task names a dataset config and that folder exists, else
    ``path``, holding ``{split}.{jsonl,json,parquet}``, ``{split}-*.{ext}`` or ``data/{split}-*.{ext}``.
    FileNotFoundError naming the task and the split when a split it reads is missing.
    """
    cfg = _task_config(manager or _builtin_tasks(), task)
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"zero-shot task {task!r}: local data not found: {str(root)!r}")
    if root.is_dir() and cfg.get("dataset_name") and (root / cfg["dataset_name"]).is_dir():
        root = root / cfg["dataset_name"]
    splits = [cfg[k] for k in ("training_split", "validation_split", "test_split", "fewshot_split") if cfg.get(k)]
    data_files: dict[str, list[str]] = {}
    for split in dict.fromkeys(splits):
        if root.is_file():
            files = [root]
        else:
            files = []
            for ext in _DATA_EXTENSIONS:
                files += sorted(root.glob(f"{split}.{ext}")) + sorted(root.glob(f"{split}-*.{ext}"))
                files += sorted(root.glob(f"data/{split}-*.{ext}"))
        if files:
            data_files[split] = [str(f.resolve()) for f in files]
    evaluated = cfg.get("test_split") or cfg.get("validation_split")
    if evaluated not in data_files:
        raise FileNotFoundError(f"zero-shot task {task!r}: no {evaluated!r} split in {str(root)!r} "
                                f"(expected {evaluated}.jsonl, {evaluated}-*.parquet or data/{evaluated}-*.parquet)")
    kinds = {_DATA_EXTENSIONS[Path(f).suffix.lstrip(".")] for files in data_files.values() for f in files}
    if len(kinds) != 1:
        raise ValueError(f"zero-shot task {task!r}: mixed file types in {str(root)!r}; use one of parquet or json")
    # splits the task names but the copy lacks (e.g. train for a zero-shot run) are dropped
    for key in ("training_split", "validation_split", "fewshot_split"):
        if cfg.get(key) and cfg[key] not in data_files:
            cfg.pop(key)
    cfg.update(dataset_path=kinds.pop(), dataset_name=None,
               dataset_kwargs={**(cfg.get("dataset_kwargs") or {}), "data_files": data_files})
    cfg.pop("tag", None)  # a local copy is not the registered task's group member
    return cfg


def _compact(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{"acc,none": x, "acc_stderr,none": "N/A"}`` -> ``{"acc": x, "acc_stderr": None}`` per task."""
    compact = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            name = key.split(",", 1)[0]
            if name.endswith("_stderr"):
                row[name] = float(value) if isinstance(value, (int, float)) else None  # "N/A" without bootstrap
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                row[name] = float(value)
        compact[task] = row
    return compact


def _is_rolling(task: str | Mapping[str, Any]) -> bool:
    if isinstance(task, str):
        return task in ROLLING_TASKS
    return task.get("output_type") == "loglikelihood_rolling"


def evaluate_lm(
    model,
    tokenizer,
    tasks: Sequence[str | Mapping[str, Any]],
    *,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    max_length: int | None = None,
    bos: bool = True,
    allow_hub: bool = False,
) -> dict[str, Any]:
    """Zero-shot lm-eval of ``model`` on ``tasks`` (names or task-config dicts).

    Returns ``{"results": {task: {metric: value}}, "n_samples", "versions", "lm_eval_version",
    "limit", "num_fewshot"}``. ``max_length`` defaults to the model's ``max_position_embeddings``;
    ``limit`` caps the documents per task (tests and smoke runs).

    ``bos=True`` puts ``<bos>`` exactly once before every scored sequence, as our models saw
    documents in training. lm-eval 0.4.13 cannot do that with one setting: rolling
    log-likelihood always prepends the BOS prefix token, so a tokenizer that adds ``<bos>``
    itself (``add_bos_token`` None or True) gets two and the second is scored as a target;
    with ``add_bos_token=False`` multiple-choice contexts get none. So rolling tasks run with
    ``add_bos_token=False`` and the others with ``add_bos_token=bos``.
    """
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    bad = [t for t in tasks if not isinstance(t, (str, Mapping)) or (isinstance(t, Mapping) and "task" not in t)]
    if bad:
        raise ValueError(f"tasks must be task names or task-config dicts with a 'task' key, got {bad!r:.200}")
    if not allow_hub:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    groups = [([t for t in tasks if _is_rolling(t)], False), ([t for t in tasks if not _is_rolling(t)], bos)]
    merged: dict[str, Any] = {"results": {}, "n-samples": {}, "versions": {}}
    was_training = model.training
    model.eval()
    try:
        for group, add_bos in groups:
            if not group:
                continue
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                      add_bos_token=add_bos)
            # Index lm-eval's built-in task registry only when a task is asked for by name.
            manager = TaskManager(include_defaults=any(isinstance(t, str) for t in group))
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=[t if isinstance(t, str) else dict(t) for t in group],
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                task_manager=manager,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            if out is None:  # not the main process under several processes
                return {}
            for key in merged:
                merged[key].update(out.get(key, {}))
    finally:
        model.train(was_training)
    return {
        "results": _compact(merged["results"]),
        "n_samples": merged["n-samples"],
        "versions": merged["versions"],
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "bos": bos,
    }

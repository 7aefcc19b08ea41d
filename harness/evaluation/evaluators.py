"""The run's evaluators, keyed by their config name (``ppl``, ``rouge``, ``zeroshot``).

Each evaluator has one contract: ``evaluator(model, ctx) -> dict`` takes the built model
and the run's :class:`EvalContext` and returns the quality fields it owns; the run merges
them into its record's ``quality``. A new evaluation is one function here plus one
``EVALUATORS`` line (and its name in the config schema).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from harness.data.sets import load_instruction_rows


def _stderr(message: str) -> None:
    print(f"[harness] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EvalContext:
    """What every evaluator may read besides the model: the spec's settings, data and places to write."""

    run_id: str
    eval_cfg: Mapping[str, Any]  # the spec's ``eval`` section
    tokenizer: Any
    texts: list[str]  # the held-out documents (perplexity, the local zero-shot task)
    device: str
    seed: int
    evicting: bool  # an eviction policy acts only through a bounded cache fed token by token
    cache_factory: Callable[[], Any] | None  # the method's own cache, or None for the model's default
    predictions_dir: Path  # where ROUGE-L generations are saved
    scratch_dir: Path  # per-run scratch (the zero-shot task files), removed after use
    instruct_dir: Path | None = None
    unigram_path: Path | None = None
    datasets: Mapping[str, Any] = field(default_factory=dict)  # the spec's ``datasets`` entries (local paths)
    log: Callable[[str], None] = _stderr


Evaluator = Callable[[Any, EvalContext], dict[str, Any]]


def evaluate_ppl(model, ctx: EvalContext) -> dict[str, Any]:
    """Held-out perplexity: a full forward, or token by token through the bounded cache when the method evicts."""
    from harness.evaluation.evaluate import as_quality, bounded_cache_perplexity
    from harness.evaluation.perplexity import perplexity

    cfg = ctx.eval_cfg
    ctx.log(f"{ctx.run_id}: perplexity ({'bounded cache' if ctx.evicting else 'full'})")
    # the long-range task is scored in the same pass (``eval.longrange``; absent or null: not scored)
    far = (cfg.get("longrange") or {}).get("min_distance")
    if ctx.evicting:
        ppl = bounded_cache_perplexity(model, ctx.tokenizer, ctx.texts, seq_len=cfg["seq_len"],
                                       cache_factory=ctx.cache_factory, batch_size=cfg["batch_size"],
                                       device=ctx.device, max_tokens=cfg["max_tokens"], min_distance=far,
                                       chunk=cfg.get("cache_chunk", 1))
    else:
        ppl = perplexity(model, ctx.tokenizer, ctx.texts, seq_len=cfg["seq_len"], batch_size=cfg["batch_size"],
                         device=ctx.device, max_tokens=cfg["max_tokens"], min_distance=far)
    fields = {**as_quality(ppl=ppl), "ppl_protocol": "bounded_cache" if ctx.evicting else "full"}
    if ctx.unigram_path:
        fields["ppl_unigram"] = json.loads(Path(ctx.unigram_path).read_text())["ppl_unigram"]
    return fields


def evaluate_rouge(model, ctx: EvalContext) -> dict[str, Any]:
    """ROUGE-L of greedy generations on each instruction set; the first set also fills the headline fields."""
    from harness.evaluation.evaluate import as_quality, evaluate_instructions

    ins = ctx.eval_cfg["instruct"]
    fields: dict[str, Any] = {}
    by_set = {}
    for name in ins["sets"]:
        rows = load_instruction_rows(name, ins["split"], instruct_dir=ctx.instruct_dir,
                                     source=ctx.datasets.get(name), max_rows=ins["max_rows"])
        ctx.log(f"{ctx.run_id}: ROUGE-L on {name} ({len(rows)} rows)")
        got = evaluate_instructions(model, ctx.tokenizer, rows, ctx.predictions_dir / f"{ctx.run_id}.{name}.jsonl",
                                    max_new_tokens=ins["max_new_tokens"], batch_size=ins["batch_size"],
                                    device=ctx.device, cache_factory=ctx.cache_factory)
        by_set[name] = {"rouge_l": float(got["rouge_l"]), "gen_length": float(got["gen_len"]), "rows": len(rows)}
        if len(by_set) == 1:
            fields.update(as_quality(rouge=got), instruct_set=f"{name}:{ins['split']}", instruct_rows=len(rows))
    fields["rouge_by_set"] = by_set
    return fields


def evaluate_zeroshot(model, ctx: EvalContext) -> dict[str, Any]:
    """``{"zeroshot": {task: accuracy, task_norm: ...}}`` through lm-eval; ``local`` = held-out multiple choice."""
    zs_cfg = ctx.eval_cfg["zeroshot"]
    if ctx.evicting:
        # one forward per choice, no cache between tokens: eviction would never act
        ctx.log(f"{ctx.run_id}: zero-shot skipped (eviction acts only through a bounded cache)")
        return {}
    ctx.log(f"{ctx.run_id}: zero-shot {zs_cfg['tasks']}")
    try:
        return {"zeroshot": zeroshot_scores(model, ctx.tokenizer, ctx.texts, zs_cfg, ctx.scratch_dir, ctx.seed)}
    finally:
        shutil.rmtree(ctx.scratch_dir, ignore_errors=True)


def zeroshot_scores(model, tokenizer, texts: list[str], zs_cfg: Mapping[str, Any], tasks_dir: Path,
                    seed: int) -> dict[str, float | None]:
    """``{task: accuracy}`` (and ``{task}_norm``) through lm-eval; ``local`` tasks are written to ``tasks_dir``."""
    from harness.evaluation.lm_eval_adapter import LOCAL_MC_TASK, build_local_tasks, evaluate_lm, local_task_config

    tasks: list[Any] = []
    for name in zs_cfg["tasks"]:
        if name == "local":
            configs = build_local_tasks(texts, tasks_dir, seed=0, max_mc_items=zs_cfg["limit"], max_ppl_docs=1)
            tasks += [c for c in configs if c["task"] == LOCAL_MC_TASK]
        elif name in zs_cfg.get("paths", {}):
            tasks.append(local_task_config(name, zs_cfg["paths"][name]))  # a local copy of its dataset
        else:
            tasks.append(name)  # the hub, or the datasets cache under HF_HUB_OFFLINE=1
    got = evaluate_lm(model, tokenizer, tasks, batch_size=zs_cfg["batch_size"], limit=zs_cfg["limit"], seed=seed,
                      allow_hub=any(isinstance(t, str) for t in tasks))
    scores: dict[str, float | None] = {}
    for task, metrics in got["results"].items():
        if "acc" in metrics:
            scores[task] = metrics["acc"]
        if "acc_norm" in metrics:
            scores[f"{task}_norm"] = metrics["acc_norm"]
    return scores


#: The config's evaluation names, in the order a run evaluates them.
EVALUATORS: dict[str, Evaluator] = {
    "ppl": evaluate_ppl,
    "rouge": evaluate_rouge,
    "zeroshot": evaluate_zeroshot,
}


def get_evaluators(names: list[str] | tuple[str, ...]) -> dict[str, Evaluator]:
    """``{name: evaluator}`` for ``names`` in registry order; ValueError naming every unknown one."""
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"unknown evaluator(s) {unknown}; known: {list(EVALUATORS)}")
    return {n: EVALUATORS[n] for n in EVALUATORS if n in names}


def evaluate(model, ctx: EvalContext, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The record's ``quality``: the eval set's label, then each named evaluator's fields."""
    quality: dict[str, Any] = {"eval_set": f"{ctx.eval_cfg['text_set']}:{ctx.eval_cfg['split']}"}
    for name, evaluator in get_evaluators(names).items():
        fields = evaluator(model, ctx)
        clash = sorted(set(fields) & set(quality))
        if clash:
            raise RuntimeError(f"evaluator {name!r} returned quality fields {clash} another evaluator already set")
        quality.update(fields)
    return quality

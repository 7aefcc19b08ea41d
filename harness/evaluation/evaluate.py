"""Evaluation: greedy generation + ROUGE-L (the MiniLLM convention), and perplexity under a bounded cache.

ROUGE-L follows MiniLLM's evaluator exactly: Google's ``rouge-score`` ``rougeL`` F-measure with
the Porter stemmer, the maximum over a row's references, the mean over rows, times 100. Mean
generation length is reported beside it. Only ``rougeL`` is computed (``rougeLsum`` would call
``nltk.sent_tokenize``, which needs a downloaded model); nothing here calls ``nltk.download``.

Generation is greedy (``do_sample=False``, one beam, the model's own generation defaults
ignored), batched with left padding, and stops at ``<eos>`` or at the first stop string; the
prediction is the decoded response up to (not including) the stop. ``gen_tokens`` counts the
generated tokens before ``<eos>``, or up to the token that completed the stop string.

Bounded-cache perplexity scores the same windows and targets as
:func:`harness.evaluation.perplexity.perplexity`, but feeds each window one token at a time through a
cache object made by the caller's ``cache_factory`` (one fresh cache per window batch), so an
eviction policy acts exactly as during decoding. With an unbounded cache it equals the
full-forward perplexity.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from harness.evaluation.perplexity import score_windows
from harness.atomic import write_jsonl_atomic

ROUGE_IMPL = "rouge-score rougeL, Porter stemmer, max over references, mean x100 (MiniLLM)"
_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER


# ---------------------------------------------------------------------------------------------
# ROUGE-L


def rouge_l_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-row ROUGE-L F x 100, the maximum over the row's references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    scorer = _scorer()
    scores = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"row {i}: references must be a non-empty list of strings, got {refs!r:.200}")
        scores.append(100.0 * max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs))
    return scores


def rouge_l(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    gen_tokens: Sequence[int] | None = None,
) -> dict[str, Any]:
    """``{"rouge_l", "gen_len", "n", "rouge_impl"}``: mean ROUGE-L x 100 and mean generated tokens."""
    if not predictions:
        raise ValueError("no predictions to score")
    scores = rouge_l_scores(predictions, references)
    if gen_tokens is not None and len(gen_tokens) != len(predictions):
        raise ValueError(f"{len(gen_tokens)} generation lengths for {len(predictions)} predictions")
    return {
        "rouge_l": sum(scores) / len(scores),
        "gen_len": sum(gen_tokens) / len(gen_tokens) if gen_tokens is not None else None,
        "n": len(scores),
        "rouge_impl": ROUGE_IMPL,
    }


# ---------------------------------------------------------------------------------------------
# Generation


class _StopOnStrings(StoppingCriteria):
    """Per-sequence stop once the generated text contains any stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def _cut(tokenizer, new_ids: list[int], stop: Sequence[str]) -> tuple[str, int, str]:
    """``(prediction, gen_tokens, reason)`` of one generated continuation."""
    eos = tokenizer.eos_token_id
    reason = "length"
    if eos is not None and eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
        reason = "eos"
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    hits = [(text.index(s), s) for s in stop if s in text]
    if hits:
        cut = min(hits)[0]
        text = text[:cut]
        # the first prefix of tokens whose text holds a stop string is where generation stopped
        for k in range(1, len(new_ids) + 1):
            if any(s in tokenizer.decode(new_ids[:k], skip_special_tokens=True) for s in stop):
                new_ids = new_ids[:k]
                break
        reason = "stop"
    return text, len(new_ids), reason


@torch.inference_mode()
def generate_responses(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, Any] | str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    device: str | torch.device | None = None,
    cache_factory: Callable[[], Any] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Greedy responses to ``rows`` (``{"prompt", ...}`` mappings or prompt strings), in input order.

    Each result is ``{"prediction", "gen_tokens", "stop_reason"}`` with ``stop_reason`` one of
    ``"eos"``, ``"stop"`` (a stop string) or ``"length"``. ``cache_factory`` makes a fresh
    ``past_key_values`` object per batch (eviction caches); None uses the model's default cache.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(stop, str):
        stop = (stop,)
    if any(not s for s in stop):
        raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
    prompts = [_prompt_of(r, i) for i, r in enumerate(rows)]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad prompts with")
    encoded = [tokenizer(p, verbose=False)["input_ids"] for p in prompts]
    limit = getattr(model.config, "max_position_embeddings", None)
    for i, ids in enumerate(encoded):
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ValueError(f"row {i}: prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} exceeds "
                             f"the model's max_position_embeddings {limit}")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    # Longest prompts first: batches of similar length need less padding.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[dict[str, Any] | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="generate", disable=not progress, dynamic_ncols=True):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(encoded[i])
                ids[row, width - n:] = torch.tensor(encoded[i])
                mask[row, width - n:] = 1
            kwargs: dict[str, Any] = {}
            if stop:
                kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, width)])
            if cache_factory is not None:
                kwargs["past_key_values"] = cache_factory()
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=config, **kwargs)
            for row, i in enumerate(batch):
                text, n_tokens, reason = _cut(tokenizer, out[row, width:].tolist(), stop)
                results[i] = {"prediction": text, "gen_tokens": n_tokens, "stop_reason": reason}
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _prompt_of(row: Mapping[str, Any] | str, index: int) -> str:
    if isinstance(row, str):
        return row
    if not isinstance(row, Mapping) or not isinstance(row.get("prompt"), str):
        raise ValueError(f"row {index} needs a 'prompt' string, got {row!r:.200}")
    return row["prompt"]


def evaluate_instructions(
    model,
    tokenizer,
    rows: Sequence[Mapping[str, Any]],
    predictions_path: str | os.PathLike,
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    stop: Sequence[str] = (),
    device: str | torch.device | None = None,
    cache_factory: Callable[[], Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate for ``{"id", "prompt", "references"}`` rows, save the predictions (JSONL), return ROUGE-L.

    The saved file is what :func:`score_predictions_file` rescoring reads, so every number can be
    recomputed from it.
    """
    for i, row in enumerate(rows):
        refs = row.get("references") if isinstance(row, Mapping) else None
        if isinstance(refs, str) or not refs:
            raise ValueError(f"row {i}: 'references' must be a non-empty list of strings, got {refs!r:.200}")
    generated = generate_responses(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   stop=stop, device=device, cache_factory=cache_factory, progress=progress)
    saved = [{"id": row.get("id", i), "prompt": row["prompt"], "references": list(row["references"]), **g}
             for i, (row, g) in enumerate(zip(rows, generated))]
    write_jsonl_atomic(predictions_path, saved)
    scores = rouge_l([s["prediction"] for s in saved], [s["references"] for s in saved],
                     [s["gen_tokens"] for s in saved])
    scores["stop_reasons"] = {r: sum(s["stop_reason"] == r for s in saved) for r in ("eos", "stop", "length")}
    scores["max_new_tokens"] = max_new_tokens
    return scores


def score_predictions_file(path: str | os.PathLike) -> dict[str, Any]:
    """ROUGE-L and mean generation length of a predictions file written by :func:`evaluate_instructions`."""
    rows = read_jsonl(path)
    return rouge_l([r["prediction"] for r in rows], [r["references"] for r in rows], [r["gen_tokens"] for r in rows])


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---------------------------------------------------------------------------------------------
# Perplexity under a bounded cache


@torch.inference_mode()
def bounded_cache_perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    cache_factory: Callable[[], Any],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    max_tokens: int | None = None,
    progress: bool = False,
    min_distance: int | None = None,
    chunk: int = 1,
) -> dict[str, Any]:
    """Per-token and per-word perplexity scoring token by token through ``cache_factory()`` caches.

    Windows, targets (``<bos>`` targets skipped) and word counts are those of
    :func:`harness.evaluation.perplexity.perplexity`; the windows of a batch decode in lockstep, one token
    of each per step, and the short last window joins the last batch right-padded (decoding is causal
    and per row, so its scores are those it would get alone: one sequential pass fewer). Positions are passed explicitly, so a cache that reports only its kept
    tokens as its length cannot shift them. ``min_distance``: the long-range task from the same pass
    (:func:`harness.evaluation.perplexity.score_windows`).

    ``chunk`` > 1 feeds that many tokens per forward pass instead of one (the cache evicts after each
    pass, so a token sees at most ``chunk - 1`` tokens of its own chunk beyond the budget): ``chunk``
    times fewer sequential steps, at that cost in strictness. 1 = token by token, as decoding.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")

    def token_by_token(inputs: torch.Tensor) -> torch.Tensor:
        cache = cache_factory()
        logits = []
        for t in range(0, inputs.shape[1], chunk):
            stop = min(t + chunk, inputs.shape[1])
            pos = torch.arange(t, stop, dtype=torch.long, device=inputs.device).expand(inputs.shape[0], -1)
            out = model(input_ids=inputs[:, t:stop], position_ids=pos, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
        return torch.cat(logits, dim=1)

    return score_windows(
        model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, device=device,
        max_tokens=max_tokens, window_logits=token_by_token, progress=progress, min_distance=min_distance,
        pad_short_window=True,  # decoding is causal and per row: the padded tail cannot reach scored logits
        protocol=("token-by-token" if chunk == 1 else f"{chunk}-token chunks") + " through a bounded cache; "
                 "non-overlapping windows over <bos> doc <eos> stream; <bos> targets not scored",
    )


def as_quality(*, rouge: Mapping[str, Any] | None = None, ppl: Mapping[str, Any] | None = None,
               eval_set: str | None = None) -> dict[str, Any]:
    """The record ``quality`` fields (``harness.orchestration.records``) filled from :func:`rouge_l` / perplexity results."""
    quality: dict[str, Any] = {}
    if rouge is not None:
        quality.update(rouge_l=rouge["rouge_l"], rouge_impl=rouge["rouge_impl"], gen_length=rouge["gen_len"])
    if ppl is not None:
        quality.update(ppl_token=ppl["ppl_token"], ppl_word=_finite_or_none(ppl["ppl_word"]),
                       eval_tokens=ppl["tokens"], eval_words=ppl["words"])
        if "window_nll" in ppl:  # per-window NLL sums and counts: the units of the paired bootstrap
            quality["ppl_windows"] = {"nll": list(ppl["window_nll"]), "tokens": list(ppl["window_tokens"])}
        far = ppl.get("longrange")
        if far is not None:  # the long-range task, from the same pass (None where no token qualifies)
            quality.update(ppl_longrange=_finite_or_none(far["ppl"]), longrange_tokens=far["tokens"],
                           longrange_min_distance=far["min_distance"],
                           longrange_windows={"nll": list(far["window_nll"]), "tokens": list(far["window_tokens"])})
    if eval_set is not None:
        quality["eval_set"] = eval_set
    return quality


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None

"""Evaluation: ROUGE-L against an independent computation, greedy generation and its stop rule,
bounded-cache perplexity against the full forward, and records built from the results."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from nltk.stem import porter
from transformers import DynamicCache

import harness.evaluation.evaluate as ev
from baselines.eviction import EvictionPolicy, eviction_cache_factory
from baselines.testing import tiny_model
from harness.evaluation.evaluate import (
    as_quality,
    bounded_cache_perplexity,
    evaluate_instructions,
    generate_responses,
    rouge_l,
    score_predictions_file,
)
from harness.evaluation.perplexity import perplexity, token_stream
from harness.orchestration.records import validate_record

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # value number {i}\n" for i in range(8)]
ROWS = [{"id": f"r{i}", "prompt": f"Summarise f{i}:\n" * (1 + i % 3), "references": ["returns x", "x times two"]}
        for i in range(5)]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TEXTS)


# --- an independent ROUGE-L: rouge-score's tokenisation rules written out, our own LCS -----------
_STEMMER = porter.PorterStemmer()


def _tokens(text: str) -> list[str]:
    words = "".join(c if c.isascii() and c.isalnum() else " " for c in text.lower()).split()
    return [_STEMMER.stem(w) if len(w) > 3 else w for w in words]


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def _independent_rouge_l(prediction: str, references: list[str]) -> float:
    best = 0.0
    for ref in references:
        p, r = _tokens(prediction), _tokens(ref)
        lcs = _lcs(r, p)
        if lcs:
            prec, rec = lcs / len(p), lcs / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return 100.0 * best


def test_rouge_l_known_values():
    assert rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]])["rouge_l"] == pytest.approx(500 / 6)
    assert rouge_l(["Running dogs!"], [["run dog"]])["rouge_l"] == pytest.approx(100.0)  # stemmer on
    both = rouge_l(["a b c d", "x"], [["zzz", "a b c d"], ["y"]], gen_tokens=[4, 2])
    assert both["rouge_l"] == pytest.approx(50.0) and both["gen_len"] == 3.0  # max over refs, then mean
    with pytest.raises(ValueError, match="reference lists"):
        rouge_l(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty list"):
        rouge_l(["a"], ["a"])


def test_rouge_l_never_downloads_nltk_data(monkeypatch):
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError("nltk.download called")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(ev, "_SCORER", None)
    assert rouge_l(["hello world"], [["hello there world"]])["rouge_l"] == pytest.approx(80.0)


def test_saved_predictions_rescore_to_the_same_rouge_l(tok, tmp_path):
    model = tiny_model("llama", vocab_size=len(tok))
    path = tmp_path / "predictions.jsonl"
    scores = evaluate_instructions(model, tok, ROWS, path, max_new_tokens=6, batch_size=2)
    saved = [json.loads(line) for line in path.read_text().splitlines()]
    assert [s["id"] for s in saved] == [r["id"] for r in ROWS]
    # Random-weight predictions share little with the references, so add rows with real overlap.
    saved += [{"prediction": "returns the value x times two", "references": ["x times two", "returns x"],
               "gen_tokens": 7},
              {"prediction": "Computes values quickly", "references": ["compute the value"], "gen_tokens": 4}]
    path.write_text("".join(json.dumps(s) + "\n" for s in saved))
    rescored = score_predictions_file(path)
    independent = [_independent_rouge_l(s["prediction"], s["references"]) for s in saved]
    assert rescored["rouge_l"] == pytest.approx(sum(independent) / len(independent), abs=1e-9)
    assert rescored["rouge_l"] > 0
    assert rescored["gen_len"] == pytest.approx(sum(s["gen_tokens"] for s in saved) / len(saved))
    assert scores["n"] == len(ROWS) and sum(scores["stop_reasons"].values()) == len(ROWS)


def test_batched_left_padded_generation_equals_one_by_one(tok):
    model = tiny_model("opt", vocab_size=len(tok))
    batched = generate_responses(model, tok, ROWS, max_new_tokens=6, batch_size=3)
    single = generate_responses(model, tok, [r["prompt"] for r in ROWS], max_new_tokens=6, batch_size=1)
    assert [b["prediction"] for b in batched] == [s["prediction"] for s in single]
    assert all(b["gen_tokens"] == 6 and b["stop_reason"] == "length" for b in batched)
    # Greedy: a second run is identical.
    assert generate_responses(model, tok, ROWS, max_new_tokens=6, batch_size=3) == batched


def test_generation_stops_at_eos_and_at_stop_strings(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    prompt = ROWS[0]["prompt"]
    enc = tok(prompt)["input_ids"]
    with torch.no_grad():
        full = model.generate(input_ids=torch.tensor([enc]), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=None)[0, len(enc):].tolist()
    # Make the 4th generated token the end-of-sequence token: generation must stop before it.
    eos_tok = copy.deepcopy(tok)
    eos_tok.eos_token = eos_tok.convert_ids_to_tokens(full[3])
    k = full.index(full[3])
    out = generate_responses(model, eos_tok, [prompt], max_new_tokens=8)[0]
    assert out["stop_reason"] == "eos" and out["gen_tokens"] == k
    assert out["prediction"] == tok.decode(full[:k], skip_special_tokens=True)

    text = tok.decode(full, skip_special_tokens=True)
    cut = next(i for i, c in enumerate(text) if i > 0 and c.isascii() and c.isprintable())
    stopped = generate_responses(model, tok, [prompt], max_new_tokens=8, stop=[text[cut]])[0]
    assert stopped["stop_reason"] == "stop" and stopped["prediction"] == text[: text.index(text[cut])]
    assert stopped["gen_tokens"] <= 8
    with pytest.raises(ValueError, match="non-empty"):
        generate_responses(model, tok, [prompt], max_new_tokens=4, stop=[""])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate_responses(model, tok, [prompt], max_new_tokens=1000)
    with pytest.raises(ValueError, match="'prompt'"):
        generate_responses(model, tok, [{"question": "x"}], max_new_tokens=4)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma2"])
def test_token_by_token_unbounded_cache_equals_full_forward(tok, family):
    model = tiny_model(family, vocab_size=len(tok))
    full = perplexity(model, tok, TEXTS, seq_len=24, batch_size=3)
    stepwise = bounded_cache_perplexity(model, tok, TEXTS, seq_len=24, batch_size=3,
                                        cache_factory=lambda: DynamicCache(config=model.config))
    assert stepwise["tokens"] == full["tokens"] and stepwise["words"] == full["words"]
    assert stepwise["ppl_token"] == pytest.approx(full["ppl_token"], rel=1e-5)
    assert stepwise["ppl_word"] == pytest.approx(full["ppl_word"], rel=1e-5)


def test_bounded_cache_perplexity_exercises_eviction(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    full = perplexity(model, tok, TEXTS, seq_len=24, batch_size=3)
    caches = []

    def factory_of(keep):
        make = eviction_cache_factory(model, EvictionPolicy("streamingllm", keep=keep, sink_tokens=2))
        return lambda: caches.append(make()) or caches[-1]

    keep_all = bounded_cache_perplexity(model, tok, TEXTS, seq_len=24, batch_size=3, cache_factory=factory_of(1.0))
    assert keep_all["ppl_token"] == pytest.approx(full["ppl_token"], rel=1e-4)
    caches.clear()
    evicted = bounded_cache_perplexity(model, tok, TEXTS, seq_len=24, batch_size=3, cache_factory=factory_of(0.25))
    assert abs(evicted["ppl_token"] - full["ppl_token"]) > 1e-3 * full["ppl_token"]
    # One fresh cache per window batch (the short last window joins the last batch where it has room, padded
    # at its end); a full window's cache keeps a quarter of the 24 tokens it saw.
    n_pred = len(token_stream(tok, TEXTS)[0]) - 1
    full_windows, rest = divmod(n_pred, 24)
    assert len(caches) == -(-full_windows // 3) + (rest > 0 and full_windows % 3 == 0)
    assert int(caches[0].layers[0].kept_tokens().max()) == 6


def test_results_fill_a_valid_record(tok, make_record, tmp_path):
    model = tiny_model("llama", vocab_size=len(tok))
    rouge = evaluate_instructions(model, tok, ROWS[:2], tmp_path / "p.jsonl", max_new_tokens=3)
    ppl = bounded_cache_perplexity(model, tok, TEXTS[:2], seq_len=16,
                                   cache_factory=lambda: DynamicCache(config=model.config))
    record = make_record()
    record["quality"].update(as_quality(rouge=rouge, ppl=ppl, eval_set="instruct:test"))
    validate_record(record)
    assert record["quality"]["rouge_l"] == rouge["rouge_l"] and record["quality"]["eval_tokens"] == ppl["tokens"]
    windows = record["quality"]["ppl_windows"]  # the paired bootstrap's units, adding up to the totals
    assert windows == {"nll": ppl["window_nll"], "tokens": ppl["window_tokens"]} and sum(windows["tokens"]) == ppl["tokens"]


# --- the run's evaluator registry --------------------------------------------------------------


def _context(tok, tmp_path, **changes):
    from harness.evaluation.evaluators import EvalContext

    fields = dict(run_id="r", eval_cfg={"text_set": "corpus", "split": "test", "seq_len": 24, "batch_size": 3,
                                        "max_tokens": None, "zeroshot": {"tasks": ["local"]}},
                  tokenizer=tok, texts=TEXTS, device="cpu", seed=0, evicting=False, cache_factory=None,
                  predictions_dir=tmp_path / "predictions", scratch_dir=tmp_path / "scratch", log=lambda m: None)
    fields.update(changes)
    return EvalContext(**fields)


def test_evaluators_are_keyed_by_the_config_evaluation_names():
    from harness.evaluation.evaluators import EVALUATORS
    from harness.orchestration.config import EVALUATIONS

    assert tuple(EVALUATORS) == EVALUATIONS


def test_unknown_evaluator_is_refused_naming_the_known_ones():
    from harness.evaluation.evaluators import get_evaluators

    with pytest.raises(ValueError, match=r"unknown evaluator\(s\) \['bleu'\]; known: \['ppl', 'rouge', 'zeroshot'\]"):
        get_evaluators(["ppl", "bleu"])
    assert list(get_evaluators(["zeroshot", "ppl"])) == ["ppl", "zeroshot"]  # registry order, not the caller's


def test_ppl_evaluator_returns_the_perplexity_quality_fields(tok, tmp_path):
    from harness.evaluation.evaluators import evaluate

    model = tiny_model("llama", vocab_size=len(tok))
    quality = evaluate(model, _context(tok, tmp_path), ["ppl"])
    full = perplexity(model, tok, TEXTS, seq_len=24, batch_size=3)
    assert quality == {"eval_set": "corpus:test", **as_quality(ppl=full), "ppl_protocol": "full"}
    bounded = evaluate(model, _context(tok, tmp_path, evicting=True,
                                       cache_factory=lambda: DynamicCache(config=model.config)), ["ppl"])
    assert bounded["ppl_protocol"] == "bounded_cache"
    assert bounded["ppl_token"] == pytest.approx(full["ppl_token"], rel=1e-5)


def test_zeroshot_evaluator_adds_nothing_when_the_method_evicts(tok, tmp_path):
    from harness.evaluation.evaluators import evaluate_zeroshot

    assert evaluate_zeroshot(tiny_model("llama", vocab_size=len(tok)), _context(tok, tmp_path, evicting=True)) == {}


def test_evaluators_may_not_overwrite_each_others_fields(tok, tmp_path, monkeypatch):
    import harness.evaluation.evaluators as evaluators

    monkeypatch.setitem(evaluators.EVALUATORS, "rouge", lambda model, ctx: {"ppl_protocol": "mine"})
    model = tiny_model("llama", vocab_size=len(tok))
    with pytest.raises(RuntimeError, match=r"evaluator 'rouge' returned quality fields \['ppl_protocol'\]"):
        evaluators.evaluate(model, _context(tok, tmp_path), ["ppl", "rouge"])

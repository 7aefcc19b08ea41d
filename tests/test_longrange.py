"""The long-range task (harness.evaluation.longrange): the mask on hand-made streams, the same numbers from a
full forward and from the bounded cache, per-window sums, records, and the main table / Pareto figure."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import DynamicCache

from baselines.eviction import EvictionPolicy, eviction_cache_factory
from baselines.testing import tiny_model
from harness.evaluation.evaluate import as_quality, bounded_cache_perplexity
from harness.evaluation.longrange import identifier_occurrences, longrange_mask, occurrence_tokens
from harness.evaluation.perplexity import document_stream, longrange_targets, perplexity, token_stream
from harness.orchestration.records import validate_record

# Modules whose names recur far apart: each helper is defined, then many lines later used again.
FILLER = "".join(f"    v{i} = {i} * 2 + {i}\n" for i in range(4))
TEXTS = [f"import alpha_{k}\n\ndef helper_{k}(x, scale):\n{FILLER}    return x * scale\n\n"
         f"value_{k} = helper_{k}(alpha_{k}.size, 2)  # helper_{k} in a comment does not count\n"
         f"total_{k} = value_{k} + helper_{k}(value_{k}, 3)\n" for k in range(8)]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TEXTS)


# --- the definitions on hand-made input -----------------------------------------------------------------

def test_identifiers_are_python_names_not_keywords_strings_or_comments():
    text = 'def f(self, x):\n    """uses y"""\n    return self.x + y  # z\nmatch = "s"\n'
    names = [(n, text[a:b]) for n, a, b in identifier_occurrences(text)]
    assert [n for n, _ in names] == ["f", "self", "x", "self", "x", "y", "match"]
    assert all(n == s for n, s in names)  # character spans point at the names
    # a module cut mid-string keeps the names before the cut
    assert [n for n, *_ in identifier_occurrences('a = b\nc = """never closed\n d e f')] == ["a", "b", "c"]


def test_sub_word_tokens_overlapping_an_identifier_belong_to_it():
    text = "x = self._long_name(y)"
    # hand-made token spans: 'x', ' =', ' self', '._', 'long', '_name', '(', 'y', ')'
    spans = [(0, 1), (1, 3), (3, 8), (8, 10), (10, 14), (14, 19), (19, 20), (20, 21), (21, 22)]
    got = occurrence_tokens(spans, identifier_occurrences(text))
    assert got == [("x", [0]), ("self", [2]), ("_long_name", [3, 4, 5]), ("y", [7])]
    assert occurrence_tokens(spans[:4], identifier_occurrences(text))[-1] == ("_long_name", [3])  # cut stream


def test_mask_by_distance_most_recent_occurrence_window_and_document():
    # one document at stream position 1: 'a' at 0, 'b' at 2, 'a' again at 12 (10 back), 'b' at 13 (11 back),
    # 'b' at 15 (2 back: the most recent occurrence decides), 'a' (two tokens) at 30: 18 back but 'a' at 12
    # lies in window 0 while position 31 is in window 1 (seq_len 24) -> not long-range
    doc = [("a", [0]), ("b", [2]), ("a", [12]), ("b", [13]), ("b", [15]), ("a", [30, 31])]
    mask = longrange_mask([(1, doc)], 40, seq_len=24, min_distance=10)
    assert mask.nonzero().flatten().tolist() == [13, 14]
    # longer windows: the last 'a' (18 back, both its tokens) counts too
    assert longrange_mask([(1, doc)], 40, seq_len=64, min_distance=10).nonzero().flatten().tolist() == [13, 14, 31, 32]
    # a name's occurrence in another document never links
    two = [(1, [("a", [0])]), (20, [("a", [0])])]
    assert not longrange_mask(two, 30, seq_len=64, min_distance=5).any()
    # positions past the stream (cut by max_tokens) are ignored; bad arguments refused
    assert longrange_mask([(1, doc)], 14, seq_len=64, min_distance=10).nonzero().flatten().tolist() == [13]
    with pytest.raises(ValueError, match="min_distance"):
        longrange_mask([], 4, seq_len=8, min_distance=0)


def test_mask_on_a_real_stream_marks_only_far_identifier_tokens(tok):
    ids, words, mask = longrange_targets(tok, TEXTS, seq_len=128, min_distance=20)
    assert (ids, words) == token_stream(tok, TEXTS)
    assert mask.shape == (len(ids),) and 0 < int(mask.sum()) < len(ids) // 4
    assert not mask[0] and all(ids[p] not in (tok.bos_token_id, tok.eos_token_id) for p in mask.nonzero().flatten())
    marked = "".join(tok.decode([ids[p]]) for p in mask.nonzero().flatten())
    assert "helper" in marked and "alpha" in marked and "comment" not in marked
    # a larger distance never marks more; past the window nothing qualifies
    far = longrange_targets(tok, TEXTS, seq_len=128, min_distance=60)[2]
    assert bool((far & ~mask).sum() == 0) and 0 < int(far.sum()) < int(mask.sum())
    assert not longrange_targets(tok, TEXTS, seq_len=16, min_distance=20)[2].any()
    _, _, docs = document_stream(tok, TEXTS, max_tokens=50, offsets=True)
    assert len(docs) == 1 and len(docs[0][2]) == 49  # the cut document's spans stop with the stream


# --- one pass, both paths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_full_forward_and_unbounded_cache_give_the_same_long_range_perplexity(tok, family):
    model = tiny_model(family, vocab_size=len(tok))
    full = perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, min_distance=20)
    step = bounded_cache_perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, min_distance=20,
                                    cache_factory=lambda: DynamicCache(config=model.config))
    far, far_step = full["longrange"], step["longrange"]
    assert far["tokens"] == far_step["tokens"] > 0 and far["window_tokens"] == far_step["window_tokens"]
    assert far_step["ppl"] == pytest.approx(far["ppl"], rel=1e-5)
    # per-window sums add up, one entry per scored window, and the overall numbers are unchanged by the task
    assert len(far["window_nll"]) == len(full["window_nll"]) and sum(far["window_tokens"]) == far["tokens"]
    assert math.fsum(far["window_nll"]) == pytest.approx(far["nll_sum"]) and far["ppl"] == pytest.approx(
        math.exp(far["nll_sum"] / far["tokens"]))
    assert full["ppl_token"] == perplexity(model, tok, TEXTS, seq_len=96, batch_size=3)["ppl_token"]
    # the long-range NLL is the NLL of exactly the masked targets of a plain forward
    ids, _, mask = longrange_targets(tok, TEXTS, seq_len=96, min_distance=20)
    stream = torch.tensor(ids)
    manual = 0.0
    with torch.inference_mode():
        for s in range(0, len(ids) - 1, 96):
            inp, tgt = stream[s : s + 96], stream[s + 1 : s + 97]
            nll = torch.nn.functional.cross_entropy(model(input_ids=inp[None]).logits[0, : len(tgt)].float(), tgt,
                                                    reduction="none")
            manual += float(nll[mask[s + 1 : s + 1 + len(tgt)]].sum())
    assert far["nll_sum"] == pytest.approx(manual, rel=1e-5)


def test_eviction_changes_the_long_range_perplexity_through_the_same_pass(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    full = perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, min_distance=20)["longrange"]
    make = eviction_cache_factory(model, EvictionPolicy("streamingllm", keep=0.25, sink_tokens=2))
    evicted = bounded_cache_perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, min_distance=20,
                                       cache_factory=make)["longrange"]
    assert evicted["tokens"] == full["tokens"] and abs(evicted["ppl"] - full["ppl"]) > 1e-4 * full["ppl"]


def test_chunked_bounded_cache_is_exact_unbounded_and_differs_only_by_its_chunks_under_eviction(tok):
    model = tiny_model("llama", vocab_size=len(tok))
    full = perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, min_distance=20)
    chunked = bounded_cache_perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, min_distance=20, chunk=8,
                                       cache_factory=lambda: DynamicCache(config=model.config))
    assert chunked["ppl_token"] == pytest.approx(full["ppl_token"], rel=1e-5)
    assert chunked["longrange"]["ppl"] == pytest.approx(full["longrange"]["ppl"], rel=1e-5)
    assert "8-token chunks" in chunked["protocol"]
    make = eviction_cache_factory(model, EvictionPolicy("h2o", keep=0.25))
    one = bounded_cache_perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, cache_factory=make)
    eight = bounded_cache_perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, cache_factory=make, chunk=8)
    assert one["tokens"] == eight["tokens"] and one["ppl_token"] != eight["ppl_token"]
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        bounded_cache_perplexity(model, tok, TEXTS, seq_len=96, cache_factory=make, chunk=0)


def test_record_fields_and_their_consistency_check(tok, make_record):
    model = tiny_model("llama", vocab_size=len(tok))
    ppl = perplexity(model, tok, TEXTS, seq_len=96, batch_size=3, min_distance=20)
    record = make_record()
    record["quality"].update(as_quality(ppl=ppl))
    validate_record(record)
    q = record["quality"]
    assert (q["ppl_longrange"], q["longrange_tokens"], q["longrange_min_distance"]) == (
        ppl["longrange"]["ppl"], ppl["longrange"]["tokens"], 20)
    assert sum(q["longrange_windows"]["tokens"]) == q["longrange_tokens"]
    bad = json.loads(json.dumps(record))
    bad["quality"]["longrange_windows"]["tokens"][0] += 1
    with pytest.raises(ValueError, match="longrange_windows.*longrange_tokens"):
        validate_record(bad)
    bad["quality"]["longrange_windows"] = {"nll": [1.0], "tokens": [1]}
    with pytest.raises(ValueError, match="one NLL sum and token count per scored window"):
        validate_record(bad)
    # no qualifying token: the perplexity is null, not NaN
    none = as_quality(ppl=perplexity(model, tok, TEXTS, seq_len=16, batch_size=3, min_distance=15))
    assert none["ppl_longrange"] is None and none["longrange_tokens"] == 0


def test_ppl_evaluator_reads_the_config_distance(tok, tmp_path):
    from harness.evaluation.evaluators import EvalContext, evaluate

    model = tiny_model("llama", vocab_size=len(tok))
    cfg = {"text_set": "corpus", "split": "test", "seq_len": 96, "batch_size": 3, "max_tokens": None,
           "longrange": {"min_distance": 20}}
    ctx = dict(run_id="r", eval_cfg=cfg, tokenizer=tok, texts=TEXTS, device="cpu", seed=0,
               predictions_dir=tmp_path, scratch_dir=tmp_path, log=lambda m: None)
    full = evaluate(model, EvalContext(evicting=False, cache_factory=None, **ctx), ["ppl"])
    bounded = evaluate(model, EvalContext(evicting=True, cache_factory=lambda: DynamicCache(config=model.config),
                                          **ctx), ["ppl"])
    assert full["longrange_tokens"] == bounded["longrange_tokens"] > 0
    assert bounded["ppl_longrange"] == pytest.approx(full["ppl_longrange"], rel=1e-5)
    off = evaluate(model, EvalContext(evicting=False, cache_factory=None, **{**ctx, "eval_cfg": {
        **cfg, "longrange": {"min_distance": None}}}), ["ppl"])
    assert "ppl_longrange" not in off and off["ppl_token"] == full["ppl_token"]


# --- analysis ------------------------------------------------------------------------------------------

def _grid_with_longrange():
    from analysis.collate import records_table
    from test_analysis import make_run, mixsga_params

    recs = []
    for seed in (0, 1):
        for method, budget, far in (("base", 1.0, 9.0), ("gqa", 0.5, 11.0), ("mixsga", 0.5, 10.5),
                                    ("h2o", 0.5, 30.0)):
            rec = make_run(method=method, budget=budget, seed=seed, ppl=50.0 + budget + seed,
                           params=mixsga_params((3, 1, 6)) if method == "mixsga" else
                           {"keep": 0.5} if method == "h2o" else {})
            rec["quality"].update(ppl_longrange=far + 0.3 * seed, longrange_tokens=40, longrange_min_distance=256,
                                  longrange_windows={"nll": [40.0, 50.0], "tokens": [15, 25]})
            validate_record(rec)
            recs.append(rec)
    return records_table(recs)


def test_main_table_shows_long_range_perplexity_and_its_paired_difference():
    from analysis.tables import experiment_table

    table = _grid_with_longrange()
    assert {"ppl_longrange", "longrange_tokens", "longrange_window_nll"} <= set(table.columns)
    main, md = experiment_table(table, "main")
    h2o = main[main["method"] == "h2o"].iloc[0]
    assert h2o["ppl_longrange"] == pytest.approx(30.15) and h2o["ppl_longrange_delta"] == pytest.approx(21.0)
    assert h2o["ppl_longrange_delta_ref"] == "base" and h2o["ppl_longrange_delta_source"] == "seeds"
    assert "long-range ppl" in md and "Δ long-range ppl vs ref" in md and "+21.00 ± 0.00" in md


def test_pareto_writes_the_long_range_figure(tmp_path):
    from analysis.pareto import write_pareto

    table = _grid_with_longrange()
    out = tmp_path / "pareto_longrange.png"
    write_pareto(table, csv=tmp_path / "p.csv", md=tmp_path / "p.md", kv_figure=tmp_path / "kv.png",
                 longrange_figure=out, experiment="main")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    text = (tmp_path / "p.md").read_text()
    assert "## Long-range perplexity vs realized KV bytes" in text and "h2o" not in text.split("## Long-range")[1]

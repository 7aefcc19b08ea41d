"""Perplexity protocol: exact token accounting, batching invariance, unigram baseline."""

import math
import shutil
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutput

from harness.data.corpus import build_corpus, read_split, stdlib_dir
from harness.evaluation.perplexity import perplexity, token_stream, unigram_counts, unigram_perplexity
from harness.data.tokenizer import train_tokenizer
from harness.models.zoo import build_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    (root / "src").mkdir()
    for name in ("colorsys", "bisect", "heapq", "shlex", "string", "copy", "stat", "abc"):
        shutil.copy(stdlib_dir() / f"{name}.py", root / "src" / f"{name}.py")
    build_corpus(root / "corpus", source_dir=root / "src", val_fraction=0.25, test_fraction=0.2)
    tok = train_tokenizer(root / "corpus", root / "tok", vocab_size=300)
    return tok, read_split(root / "corpus", "train"), read_split(root / "corpus", "validation")


class Uniform(torch.nn.Module):
    """Predicts every token with probability 1 / vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        return CausalLMOutput(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_token_stream_format_and_truncation(setup):
    tok, _, val = setup
    ids, words = token_stream(tok, val[:2])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids.count(tok.bos_token_id) == 2 == ids.count(tok.eos_token_id)
    assert words == sum(len(t.split()) for t in val[:2])
    cut, cut_words = token_stream(tok, val, max_tokens=50)
    assert cut == ids[:50] and 0 < cut_words < words
    with pytest.raises(ValueError, match="max_tokens"):
        token_stream(tok, val, max_tokens=1)


def test_uniform_model_scores_every_token_once(setup):
    tok, _, val = setup
    texts = ["alpha beta gamma", "def f(x):\n    return x\n", "one more document here"]
    ids, words = token_stream(tok, texts)
    n_bos_targets = ids[1:].count(tok.bos_token_id)
    model = Uniform(len(tok))
    result = perplexity(model, tok, texts, seq_len=7, batch_size=2)
    assert result["tokens"] == len(ids) - 1 - n_bos_targets
    assert result["words"] == words == 11
    assert result["ppl_token"] == pytest.approx(len(tok), rel=1e-6)  # float32 log-softmax
    assert result["ppl_word"] == pytest.approx(math.exp(result["nll_sum"] / words))
    # full windows are batched (<= 2 each); the short remainder runs alone
    full, rest = divmod(len(ids) - 1, 7)
    assert sum(shape[0] for shape in model.calls) == full + (1 if rest else 0)
    assert all(shape[1] == 7 for shape in model.calls[:-1]) and model.calls[-1][1] == (rest or 7)
    # one NLL sum and one scored-target count per window, in stream order, adding up to the totals
    assert len(result["window_nll"]) == len(result["window_tokens"]) == full + (1 if rest else 0)
    targets = ids[1:]
    assert result["window_tokens"] == [sum(t != tok.bos_token_id for t in targets[s : s + 7])
                                       for s in range(0, len(targets), 7)]
    assert sum(result["window_tokens"]) == result["tokens"]
    assert math.fsum(result["window_nll"]) == pytest.approx(result["nll_sum"], rel=1e-12)
    assert result["window_nll"] == pytest.approx([n * math.log(len(tok)) for n in result["window_tokens"]], rel=1e-6)


def test_real_model_matches_manual_loss_and_is_batch_invariant(setup):
    tok, _, val = setup
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config("llama3", "tiny", tok, num_hidden_layers=2)).eval()
    one = perplexity(model, tok, val, seq_len=32, batch_size=1, max_tokens=200)
    many = perplexity(model, tok, val, seq_len=32, batch_size=4, max_tokens=200)
    assert one["tokens"] == many["tokens"] and one["nll_sum"] == pytest.approx(many["nll_sum"], rel=1e-5)
    # manual check on the first window
    ids, _ = token_stream(tok, val, max_tokens=33)
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="none")
    mask = x[0, 1:] != tok.bos_token_id
    first = perplexity(model, tok, val, seq_len=32, max_tokens=33)
    assert first["nll_sum"] == pytest.approx(float(nll[mask].sum()), rel=1e-5)
    assert model.training is False


def test_unigram_baseline(setup):
    tok, train, val = setup
    counts = unigram_counts(tok, train)
    assert tok.bos_token_id not in counts and counts[tok.eos_token_id] == len(train)
    # with no training counts the add-one model is uniform over the vocabulary
    assert unigram_perplexity(tok, [], val, train_counts=Counter()) == pytest.approx(len(tok))
    ppl = unigram_perplexity(tok, train, val)
    assert 1 < ppl < len(tok)
    assert unigram_perplexity(tok, train, val, train_counts=counts) == pytest.approx(ppl)
    # by hand on a tiny case
    ids, _ = token_stream(tok, ["ab"])
    total = sum(counts.values()) + len(tok)
    manual = math.exp(-sum(math.log((counts[t] + 1) / total) for t in ids[1:]) / (len(ids) - 1))
    assert unigram_perplexity(tok, train, ["ab"], train_counts=counts) == pytest.approx(manual)


def test_bad_arguments(setup):
    tok, _, val = setup
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(Uniform(len(tok)), tok, val, seq_len=0)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(Uniform(len(tok)), tok, val, seq_len=8, batch_size=0)
    with pytest.raises(ValueError, match="nothing to score"):
        perplexity(Uniform(len(tok)), tok, [], seq_len=8)

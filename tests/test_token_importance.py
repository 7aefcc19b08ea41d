"""Figure 1 token importance: the per-token K/V head-averaging is exact, batched right, deterministic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from harness.evaluation.token_importance import mean_heads_at, pick_sequence, summarise_deltas, token_importance
from harness.models.zoo import build_config

FAMILIES = ("llama3", "opt", "gemma2")


class Vocab:
    """What ``build_config`` reads off a tokenizer (size and special ids), plus a character tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 64

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) % 61 for c in text]}


def tiny_model(family: str, layers: int, seed: int = 0):
    overrides = {"num_hidden_layers": layers, "hidden_size": 64, "max_position_embeddings": 128}
    if family == "opt":
        overrides.update(ffn_dim=128, word_embed_proj_dim=64)
    else:
        overrides.update(intermediate_size=128)
    if family == "gemma2":
        overrides.update(sliding_window=8)  # shorter than the test sequences: local layers really are local
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(family, "tiny", Vocab(), **overrides)).eval()
    # Random init is near-uniform; sharper weights make every perturbation visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


def sequence(length: int, seed: int = 1) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 64, (length - 1,), generator=gen).tolist()


def kv_heads(model) -> int:
    cfg = model.config
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def attention_modules(model):
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


def reference_ppl(model, ids: list[int], position: int) -> float:
    """Sequence ppl with token ``position``'s K/V projections averaged over heads, by forward hooks, unbatched.

    Averaging before RoPE equals averaging after it (RoPE is linear and the same for
    every head at one position), so this is an independent path to the same number.
    """
    heads = kv_heads(model)

    def hook(_module, _inputs, out):
        out = out.clone()
        b, length, width = out.shape
        view = out.view(b, length, heads, width // heads)
        view[:, position] = view[:, position].mean(dim=1, keepdim=True)
        return out

    handles = [proj.register_forward_hook(hook) for m in attention_modules(model) for proj in (m.k_proj, m.v_proj)]
    try:
        with torch.no_grad():
            x = torch.tensor([ids])
            logits = model(input_ids=x, use_cache=False).logits[0, :-1]
            nll = F.cross_entropy(logits, x[0, 1:], reduction="sum")
    finally:
        for h in handles:
            h.remove()
    return math.exp(float(nll) / (len(ids) - 1))


def test_mean_heads_at_touches_only_the_named_token():
    states = torch.randn(3, 4, 5, 2)
    out = mean_heads_at(states, torch.tensor([2, -1, 0]))
    assert torch.equal(out[1], states[1])  # -1: row untouched
    assert torch.allclose(out[0, :, 2], states[0, :, 2].mean(0).expand(4, 2))
    assert torch.allclose(out[2, :, 0], states[2, :, 0].mean(0).expand(4, 2))
    keep = torch.ones(5, dtype=torch.bool)
    keep[2] = False
    assert torch.equal(out[0][:, keep], states[0][:, keep])
    assert torch.equal(states, states.clone())  # the input is not modified in place


@pytest.mark.parametrize("family", FAMILIES)
def test_one_layer_matches_independent_recomputation(family):
    model = tiny_model(family, layers=1)
    ids = sequence(12)
    got = token_importance(model, ids, batch_size=4)
    assert got["positions"] == list(range(11))
    x = torch.tensor([ids])
    with torch.no_grad():
        nll = F.cross_entropy(model(input_ids=x, use_cache=False).logits[0, :-1], x[0, 1:], reduction="sum")
    assert got["base_ppl"] == pytest.approx(math.exp(float(nll) / 11), rel=1e-6)
    for pos in (0, 3, 10):
        assert got["ppl"][pos] == pytest.approx(reference_ppl(model, ids, pos), rel=1e-5)
    assert max(abs(d) for d in got["delta_pct"]) > 1e-2  # the perturbation is visible on this model


@pytest.mark.parametrize("family", FAMILIES)
def test_two_layers_match_reference_and_identical_heads_change_nothing(family):
    model = tiny_model(family, layers=2)
    ids = sequence(16, seed=3)
    got = token_importance(model, ids, batch_size=5, positions=[0, 7, 14])
    for pos, ppl in zip(got["positions"], got["ppl"]):
        assert ppl == pytest.approx(reference_ppl(model, ids, pos), rel=1e-5)
    assert max(abs(d) for d in got["delta_pct"]) > 1e-2

    # Every K/V head identical: the head mean is the head itself, so nothing changes.
    heads = kv_heads(model)
    with torch.no_grad():
        for m in attention_modules(model):
            for proj in (m.k_proj, m.v_proj):
                dim = proj.out_features // heads
                proj.weight.copy_(proj.weight[:dim].repeat(heads, 1))
                if proj.bias is not None:
                    proj.bias.copy_(proj.bias[:dim].repeat(heads))
    same = token_importance(model, ids, batch_size=5)
    assert max(abs(d) for d in same["delta_pct"]) < 1e-4


def test_deterministic_batch_independent_and_restores_the_model():
    model = tiny_model("llama3", layers=2)
    impl = model.config._attn_implementation
    ids = sequence(20, seed=5)
    x = torch.tensor([ids])
    with torch.no_grad():
        before = model(input_ids=x).logits
    a = token_importance(model, ids, batch_size=8)
    b = token_importance(model, ids, batch_size=8)
    c = token_importance(model, ids, batch_size=1)
    assert a == b
    assert c["delta_pct"] == pytest.approx(a["delta_pct"], abs=1e-4)
    assert model.config._attn_implementation == impl and not hasattr(model.config, "token_mqa_base")
    assert not any(hasattr(m, "token_mqa") for m in attention_modules(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


def test_bad_input_is_named():
    model = tiny_model("opt", layers=1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_importance(model, [1])
    with pytest.raises(ValueError, match="outside the sequence"):
        token_importance(model, [1, 5, 6], positions=[3])
    with pytest.raises(ValueError, match="batch_size"):
        token_importance(model, [1, 5, 6], batch_size=0)
    from mixsga import MixSGAConfig, convert_to_mixsga

    convert_to_mixsga(model, MixSGAConfig(ratios=(3, 1, 6)))
    with pytest.raises(ValueError, match="unconverted model"):
        token_importance(model, [1, 5, 6])


def test_summary_and_sequence_choice():
    s = summarise_deltas([-1.0, 0.0, 0.05, 0.5, 2.0, 10.0])
    assert s["min"] == -1.0 and s["max"] == 10.0 and s["median"] == pytest.approx(0.275)
    assert s["fraction_negative"] == pytest.approx(1 / 6)
    assert s["fraction_above"]["0.1"] == pytest.approx(3 / 6) and s["fraction_above"]["5"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="no deltas"):
        summarise_deltas([])

    vocab = Vocab()
    ids, doc = pick_sequence(vocab, ["short", "long enough text"], seq_tokens=8)
    assert doc == 1 and len(ids) == 8 and ids[0] == vocab.bos_token_id
    assert ids[1:] == vocab("long enough text")["input_ids"][:7]
    with pytest.raises(ValueError, match="no document"):
        pick_sequence(vocab, ["short"], seq_tokens=50)
    with pytest.raises(ValueError, match="doc_index"):
        pick_sequence(vocab, ["short"], doc_index=3)


def test_figure1_end_to_end_on_a_saved_checkpoint(tmp_path):
    import json
    import shutil

    from harness.data.corpus import build_corpus, stdlib_dir
    from harness.evaluation.token_importance import figure1
    from harness.data.tokenizer import train_tokenizer

    (tmp_path / "src").mkdir()
    for name in ("colorsys", "bisect", "heapq", "shlex", "string", "copy"):
        shutil.copy(stdlib_dir() / f"{name}.py", tmp_path / "src" / f"{name}.py")
    build_corpus(tmp_path / "corpus", source_dir=tmp_path / "src", val_fraction=0.25, test_fraction=0.2)
    tok = train_tokenizer(tmp_path / "corpus", tmp_path / "tok", vocab_size=300)
    config = build_config("llama3", "tiny", tok, num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = figure1(str(tmp_path / "model"), text_set="stdlib", text_path=str(tmp_path / "corpus"), seq_tokens=24,
                  batch_size=8)
    json.dumps(out, allow_nan=False)
    assert out["family"] == "llama3" and out["sequence_tokens"] == 24
    assert len(out["delta_pct"]) == len(out["tokens"]) == len(out["token_ids"]) == 23
    assert out["summary"]["n"] == 23 and out["base_ppl"] > 1

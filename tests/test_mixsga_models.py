"""mixSGA on every family: equivalences, incremental decoding, generate(), live bytes.

Tiny random-weight fp32 configs with >= 4 KV heads: Llama (2 query heads per KV
head), TinyLlama-shaped (8 per KV head), OPT (MHA, biases, learned positions,
pre-scaled queries) and Gemma 2 (soft-capping, sliding window 4, query scalar).
The helpers here are imported by the other mixSGA test files.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from mixsga import (
    MixSGACache,
    MixSGAConfig,
    convert_to_mixsga,
    mixsga_kv_bytes_for_counts,
    mixsga_kv_bytes_per_token,
)
from kvledger import layer_windows, stored_share
from mixsga.cache import MixSGALayer

FAMILIES = ("llama", "tinyllama", "opt", "gemma2")
VOCAB = 97
ATOL = 2e-5


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=128,
            pad_token_id=0, eos_token_id=1, bos_token_id=2,
        )
    if family == "tinyllama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=4, head_dim=8, max_position_embeddings=128,
            pad_token_id=0, eos_token_id=1, bos_token_id=2,
        )
    if family == "opt":
        return OPTConfig(
            vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=8,
            max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=0, eos_token_id=1,
            bos_token_id=2, dropout=0.0, attention_dropout=0.0,
        )
    if family == "gemma2":
        return Gemma2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=4, head_dim=8, sliding_window=4,
            query_pre_attn_scalar=16, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
            bos_token_id=2, attn_implementation="eager",
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cls = {"llama": LlamaForCausalLM, "tinyllama": LlamaForCausalLM, "opt": OPTForCausalLM,
           "gemma2": Gemma2ForCausalLM}[family]
    model = cls(tiny_config(family)).eval()
    # Random init leaves RMSNorm scales at their neutral value; perturb every weight a
    # little so that pooling, biases and norms all matter in the comparisons.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def converted(family: str, ratios=(3, 1, 6), seed: int = 0, **kw):
    base = tiny_model(family, seed)
    return base, convert_to_mixsga(copy.deepcopy(base), MixSGAConfig(ratios=ratios, **kw))


def kv_pairs_pooled(model):
    """A copy of ``model`` whose K/V projections are mean-pooled over pairs of KV heads."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if not name.endswith("self_attn"):
            continue
        d = mod.head_dim
        for proj in (mod.k_proj, mod.v_proj):
            with torch.no_grad():
                w = proj.weight.view(-1, 2, d, proj.weight.shape[1]).mean(1, keepdim=True)
                proj.weight.copy_(w.expand(-1, 2, -1, -1).reshape(proj.weight.shape))
                if proj.bias is not None:
                    b = proj.bias.view(-1, 2, d).mean(1, keepdim=True)
                    proj.bias.copy_(b.expand(-1, 2, -1).reshape(proj.bias.shape))
    return ref


def left_padded(batch=2, length=9, pad=(3, 0), seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, p in enumerate(pad):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_full_expert_reproduces_base_model(family):
    base, model = converted(family, ratios=(1, 0, 0))
    ids, mask = left_padded()
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            want = base(input_ids=ids, **kw).logits
            got = model(input_ids=ids, **kw).logits
            real = mask.bool() if kw else torch.ones_like(mask, dtype=torch.bool)
            torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pair_expert_reproduces_pair_pooled_model(family):
    base, model = converted(family, ratios=(0, 1, 0))
    ref = kv_pairs_pooled(base)
    ids, mask = left_padded()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=ATOL, rtol=1e-5)
        # prefill + decode through the compact cache agree with the pooled model too
        gen_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gen_ref)


def _stepwise(model, ids, prompt_len, chunk=1, mask=None):
    """Prefill ``prompt_len`` tokens, then feed the rest ``chunk`` at a time; logits of every position."""
    cache = MixSGACache(model.config)
    outs = []
    with torch.no_grad():
        pos = 0
        for stop in [prompt_len] + list(range(prompt_len + chunk, ids.shape[1] + chunk, chunk)):
            stop = min(stop, ids.shape[1])
            if stop <= pos:
                continue
            kw = {} if mask is None else {"attention_mask": mask[:, :stop]}
            if mask is not None:
                pos_ids = (mask[:, :stop].cumsum(1) - 1).clamp_min(0)[:, pos:stop]
                kw["position_ids"] = pos_ids
            out = model(input_ids=ids[:, pos:stop], past_key_values=cache, use_cache=True, **kw)
            outs.append(out.logits)
            pos = stop
    return torch.cat(outs, dim=1), cache


@pytest.fixture(autouse=True)
def record_routes(monkeypatch):
    """Log every routing decision a ``MixSGALayer`` stores (``layer.routes``), for :func:`_routing_of`.

    The cache itself cannot say: a sliding-window layer keeps only its window's tokens.
    Importing this fixture into another test module turns it on there too.
    """
    original = MixSGALayer.update

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending is not None:
            self.__dict__.setdefault("routes", []).append(self.pending.expert.detach().clone())
        return original(self, key_states, value_states, *args, **kwargs)

    monkeypatch.setattr(MixSGALayer, "update", update)


def _routing_of(cache, model, batch_real):
    """``[layers, B, T]`` expert ids realised by the cache (padding positions get expert 0)."""
    layers = []
    for layer in cache.layers[: model.config.num_hidden_layers]:
        expert = torch.cat(layer.routes, dim=1).long()
        real = torch.stack(list(batch_real))
        assert expert.shape == real.shape, "the routing log does not cover the given positions"
        layers.append(torch.where(real, expert, 0))
    return torch.stack(layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_decoding_matches_full_forward(family, chunk):
    _, model = converted(family, ratios=(3, 1, 6))
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(5))
    step_logits, cache = _stepwise(model, ids, prompt_len=6, chunk=chunk)
    routing = _routing_of(cache, model, [torch.ones(14, dtype=torch.bool)])
    # decode used argmax, so routing differs from what expert-choice would give the full sequence
    with torch.no_grad(), model.mixsga_runtime.force_routing(routing):
        full = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(step_logits, full, atol=ATOL, rtol=1e-5)
    assert cache.get_seq_length() == 14


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_incremental_decoding_with_left_padding(family):
    _, model = converted(family, ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=13, pad=(4, 0), seed=3)
    step_logits, cache = _stepwise(model, ids, prompt_len=7, chunk=1, mask=mask)
    routing = _routing_of(cache, model, list(mask.bool()))
    pos_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), model.mixsga_runtime.force_routing(routing):
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(step_logits[real], full[real], atol=ATOL, rtol=1e-5)
    for layer, keep in zip(cache.layers, layer_windows(model.config)):  # a sliding layer keeps window - 1
        want = [n if keep is None else min(n, keep) for n in (int(mask[0].sum()), 13)]
        assert [layer.num_tokens(0), layer.num_tokens(1)] == want
    assert (layer_windows(model.config)[0] is not None) == (family == "gemma2")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batch_with_padding_matches_single_samples(family):
    _, model = converted(family, ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=8, pad=(3, 0), seed=7)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
        for b in range(2):
            real = mask[b].bool()
            single = model.generate(ids[b : b + 1, real], max_new_tokens=7, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[b, -7:], single[0, -7:]), f"sample {b}"


@pytest.mark.parametrize("family", FAMILIES)
def test_live_cache_bytes_equal_analytic_bytes(family):
    _, model = converted(family, ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=10, pad=(2, 0), seed=11)
    cache = MixSGACache(model.config)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=5, past_key_values=cache,
            pad_token_id=0, generator=None,
        )
    assert out.shape == (2, 15)
    counts = cache.expert_counts()
    seen = mask.sum(-1) + 5 - 1  # the last new token is never fed back
    for row, keep in zip(counts, layer_windows(model.config)):  # a sliding layer keeps its window - 1
        assert sum(row) == int(seen.sum() if keep is None else seen.clamp_max(keep).sum())
    group_sizes = model.mixsga_runtime.config.group_sizes
    assert cache.kv_bytes() == mixsga_kv_bytes_for_counts(model.config, counts, group_sizes, torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_live_bytes_at_fixed_ratios_equal_ledger_per_token(family):
    # With one active expert the routing is fixed, so the per-token ledger is exact.
    for ratios in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        _, model = converted(family, ratios=ratios)
        ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
        cache = MixSGACache(model.config)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache, pad_token_id=0)
        tokens = 9 + 4 - 1  # beyond Gemma 2's window: its sliding layers store window - 1 = 3
        per_token = mixsga_kv_bytes_per_token(model.config, ratios, (1, 2, 4), torch.float32)
        assert cache.kv_bytes() == per_token * tokens * stored_share(model.config, tokens)
        assert (stored_share(model.config, tokens) < 1) == (family == "gemma2")


def test_generate_creates_the_mixsga_cache_itself():
    _, model = converted("llama")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.past_key_values, MixSGACache)
    assert out.past_key_values.num_tokens() == 9
    stats = model.mixsga_runtime.routing_stats()
    assert stats["decode_tokens"] == 3 * model.config.num_hidden_layers
    assert stats["prefill_tokens"] == 6 * model.config.num_hidden_layers


def test_keep_tokens_drops_from_every_expert_store():
    _, model = converted("llama", ratios=(3, 1, 6))
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = MixSGACache(model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    before = cache.expert_index(0).clone()
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[0, 3, 4, 10, 11]] = True
    cache.keep_tokens(keep)
    assert torch.equal(cache.expert_index(0), before[keep])
    assert cache.num_tokens() == 5 and cache.get_seq_length() == 12
    counts = cache.expert_counts()
    assert cache.kv_bytes() == mixsga_kv_bytes_for_counts(model.config, counts, (1, 2, 4))
    cache.keep_tokens(torch.tensor([1, 4]), layer_idx=1)
    assert cache.layers[1].num_tokens() == 2 and cache.layers[0].num_tokens() == 5
    with pytest.raises(ValueError, match="keep mask must have shape"):
        cache.keep_tokens(torch.ones(3, dtype=torch.bool))
    with torch.no_grad():  # decoding continues on the evicted cache
        out = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_observer_sees_token_order_probabilities_at_prefill_and_decode(family):
    # With only the full expert, mixSGA attention equals the base model's eager attention.
    base, model = converted(family, ratios=(1, 0, 0))
    base.set_attn_implementation("eager")
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = base(input_ids=ids, output_attentions=True).attentions
    seen = {}
    cache = MixSGACache(model.config)
    cache.set_observer(lambda layer, b, probs: seen.setdefault(layer.layer_idx, []).append(probs))
    with torch.no_grad():
        model(input_ids=ids[:, :6], past_key_values=cache, use_cache=True)
        for t in range(6, 9):
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    windows = layer_windows(model.config)
    for layer, chunks in seen.items():
        # a sliding layer (window 4) stores 3 tokens between passes; a decode query sees them and itself
        width = [t + 1 if windows[layer] is None else min(t + 1, windows[layer] + 1) for t in range(6, 9)]
        assert [c.shape[1:] for c in chunks] == [(6, 6)] + [(1, w) for w in width]
        torch.testing.assert_close(chunks[0], want[layer][0, :, :6, :6], atol=1e-5, rtol=1e-4)
        for t, w, chunk in zip(range(6, 9), width, chunks[1:]):
            torch.testing.assert_close(chunk[:, 0], want[layer][0, :, t, t + 1 - w : t + 1], atol=1e-5, rtol=1e-4)
            if w < t + 1:  # the tokens left out are exactly those the base model masks
                assert float(want[layer][0, :, t, : t + 1 - w].abs().max()) == 0.0

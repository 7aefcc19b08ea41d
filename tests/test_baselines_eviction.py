"""Token eviction caches: exactness at 100 %, hand-computed selections, budgets, batches, RoPE positions."""

from __future__ import annotations

import pytest
import torch

from baselines.eviction import (
    EvictionCache,
    EvictionLayer,
    EvictionPolicy,
    eviction_cache_factory,
    forward_in_chunks,
)
from baselines.gqa import convert_to_gqa
from baselines.testing import tiny_model
from kvledger import full_kv_bytes_per_token

FAMILIES = ("llama", "tinyllama", "opt", "gemma2")
METHODS = ("h2o", "streamingllm", "snapkv", "tova")


def _batch(seed: int = 0, batch: int = 2, length: int = 12):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : 2 * b + 1] = 0  # left padding of different lengths
    return ids, mask


def _eager(family: str, **kw):
    model = tiny_model(family, **kw)
    model.set_attn_implementation("eager")  # Gemma 2's soft-capping is only exact in eager
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_reproduces_base(family):
    model = _eager(family)
    ids, mask = _batch()
    ref_logits = model(ids, attention_mask=mask).logits
    ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for method in METHODS:
        factory = eviction_cache_factory(model, EvictionPolicy(method, 1.0, window=4))
        logits = model(ids, attention_mask=mask, past_key_values=factory(), use_cache=True).logits
        diff = ((logits - ref_logits) * mask[..., None]).abs().max().item()
        assert diff < 1e-5, (method, diff)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                past_key_values=factory())
        assert torch.equal(tokens, ref_tokens), method
        model.set_attn_implementation("eager")


def _layer_with(method: str, probs_rows: list[list[float]], **policy) -> EvictionLayer:
    """A one-sample, one-head layer that saw a 6-token prompt with the given attention rows."""
    layer = EvictionLayer(EvictionPolicy(method, **policy), layer_idx=0)
    n = len(probs_rows)
    keys = torch.arange(n * 2, dtype=torch.float32).view(1, 1, n, 2)
    layer.update(keys, keys.clone())
    probs = torch.tensor(probs_rows, dtype=torch.float32).view(1, 1, 1, n, n)
    layer.observe(probs, torch.ones(1, n, dtype=torch.bool), None)
    return layer


def _kept(layer: EvictionLayer) -> list[int]:
    return layer.slots[0, 0][layer.valid[0, 0]].tolist()


ROWS = [
    [1.0, 0, 0, 0, 0, 0],
    [0.5, 0.5, 0, 0, 0, 0],
    [0.2, 0.6, 0.2, 0, 0, 0],
    [0.1, 0.1, 0.7, 0.1, 0, 0],
    [0.1, 0.1, 0.1, 0.6, 0.1, 0],
    [0.25, 0.05, 0.30, 0.05, 0.15, 0.20],
]
# Column sums (H2O scores): 2.15, 1.35, 1.30, 0.75, 0.25, 0.20.


def test_h2o_hand_example_prefill_and_decode():
    layer = _layer_with("h2o", ROWS, keep=0.5, recent_fraction=1 / 3)
    # budget floor(0.5 * 6) = 3: one recent token (slot 5) + the two heaviest (slots 0, 1)
    assert _kept(layer) == [0, 1, 5]
    assert layer.keys.shape[-2] == 3  # the stored tensor really shrank
    assert torch.equal(layer.keys[0, 0, :, 0], torch.tensor([0.0, 2.0, 10.0]))  # K of slots 0, 1, 5
    # decode one token: budget floor(0.5 * 7) = 3; scores 2.25, 1.45, 0.90, 0.10 -> keep 0, 1 + recent 6
    new = torch.full((1, 1, 1, 2), 99.0)
    layer.update(new, new.clone())
    layer.observe(torch.tensor([0.1, 0.1, 0.7, 0.1]).view(1, 1, 1, 1, 4), torch.ones(1, 1, dtype=torch.bool), None)
    assert _kept(layer) == [0, 1, 6]
    assert torch.allclose(layer.score[0, 0], torch.tensor([2.25, 1.45, 0.1]))
    heavy_only = _layer_with("h2o", ROWS, keep=0.5, recent_fraction=0.0)
    assert _kept(heavy_only) == [0, 1, 2]


def test_tova_hand_example():
    # last row 0.25, 0.05, 0.30, 0.05, 0.15, 0.20 -> keep the top 3: slots 2, 0, 5
    assert _kept(_layer_with("tova", ROWS, keep=0.5)) == [0, 2, 5]


def test_streamingllm_hand_example():
    assert _kept(_layer_with("streamingllm", ROWS, keep=0.5, sink_tokens=1)) == [0, 4, 5]
    assert _kept(_layer_with("streamingllm", ROWS, keep=0.5, sink_tokens=2)) == [0, 1, 5]


def test_snapkv_hand_example_with_pooling():
    rows = [r[:] for r in ROWS]
    rows[4] = [0.25, 0.0, 0.05, 0.2, 0.5, 0.0]
    rows[5] = [0.25, 0.0, 0.05, 0.25, 0.2, 0.25]
    # window = the last 2 queries; their summed attention: 0.5, 0, 0.1, 0.45, (0.7, 0.25 protected)
    assert _kept(_layer_with("snapkv", rows, keep=0.5, window=2, kernel=1)) == [0, 4, 5]
    # average pooling over 3 neighbours: 0.25, 0.2, 0.183, 0.417 -> slot 3 wins
    assert _kept(_layer_with("snapkv", rows, keep=0.5, window=2, kernel=3)) == [3, 4, 5]


def test_question_protection_and_its_budget_error():
    layer = _layer_with("h2o", ROWS, keep=0.5, recent_fraction=0.0, compress_question=False, question_tokens=2)
    assert _kept(layer) == [0, 4, 5]  # the 2 question tokens stay, the heaviest other token fills the budget
    with pytest.raises(ValueError, match="question"):
        _layer_with("h2o", ROWS, keep=0.5, compress_question=False, question_tokens=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_sample_compressed_and_budget_never_exceeded(family):
    model = _eager(family)
    ids, mask = _batch(seed=1, batch=3, length=14)
    keep = 0.4
    full = full_kv_bytes_per_token(model.config, torch.float32)
    for method in METHODS:
        factory = eviction_cache_factory(model, EvictionPolicy(method, keep, window=4, sink_tokens=2))
        cache = factory()
        with torch.no_grad():
            for stop in range(1, ids.shape[1] + 1):
                model(ids[:, stop - 1 : stop], attention_mask=mask[:, :stop], past_key_values=cache, use_cache=True)
                assert cache.kv_bytes() <= keep * full * ids.shape[0] * stop + 1e-9, (method, stop)
        real = mask.sum(-1)
        for layer in cache.layers:
            kept = layer.kept_tokens()  # [B, kv_heads]
            expected = torch.floor(keep * real.double()).long()
            if layer.sliding_window is None:
                assert torch.equal(kept, expected[:, None].expand_as(kept)), (method, kept, expected)
            assert bool((kept < real[:, None]).all()), method  # every sample lost tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_compresses_every_sample(family):
    model = _eager(family)
    ids, mask = _batch(seed=2, batch=2, length=12)
    policy = EvictionPolicy("h2o", 0.5)
    cache = eviction_cache_factory(model, policy)()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 17)
    seen = mask.sum(-1) + 4  # the last generated token is never fed back
    layer = cache.layers[1 if family == "gemma2" else 0]  # a global-attention layer
    assert torch.equal(layer.kept_tokens()[:, 0], torch.floor(0.5 * seen.double()).long())
    # a new cache per call: state never leaks between generate calls
    fresh = eviction_cache_factory(model, policy)()
    again = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, past_key_values=fresh)
    assert torch.equal(out, again)


def test_h2o_keeps_different_tokens_per_kv_head():
    model = _eager("tinyllama")
    ids, _ = _batch(seed=3, batch=1, length=16)
    cache = eviction_cache_factory(model, EvictionPolicy("h2o", 0.5, recent_fraction=0.0))()
    model(ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape[1] == model.config.num_key_value_heads  # K/V-head storage, never per query head
    sets = {tuple(layer.slots[0, h][layer.valid[0, h]].tolist()) for h in range(layer.keys.shape[1])}
    assert len(sets) > 1


@pytest.mark.parametrize("family", ("llama", "gemma2"))
def test_streamingllm_positions_match_a_fresh_model_on_the_kept_tokens(family):
    extra = {"layer_types": ["full_attention"]} if family == "gemma2" else {}
    model = _eager(family, num_hidden_layers=1, **extra)
    ids, _ = _batch(seed=4, batch=1, length=20)
    cache = eviction_cache_factory(model, EvictionPolicy("streamingllm", 0.5, sink_tokens=2))()
    assert cache.repositions
    model(ids, past_key_values=cache, use_cache=True)
    kept = _kept(cache.layers[0])
    assert kept == [0, 1] + list(range(12, 20))
    nxt = torch.tensor([[5]])
    logits = model(nxt, past_key_values=cache, use_cache=True).logits[0, -1]
    # one layer: the kept keys at consecutive positions == a fresh model fed only the kept tokens
    fresh = model(torch.cat([ids[:, kept], nxt], dim=1)).logits[0, -1]
    assert torch.allclose(logits, fresh, atol=1e-5)
    unshifted = model(torch.cat([ids, nxt], dim=1)).logits[0, -1]
    assert not torch.allclose(logits, unshifted, atol=1e-3)


def test_opt_streamingllm_keeps_original_positions():
    model = _eager("opt")
    cache = eviction_cache_factory(model, EvictionPolicy("streamingllm", 0.5))()
    assert not cache.repositions


def test_chunked_scoring_at_full_budget_matches_one_pass():
    model = _eager("llama")
    ids, _ = _batch(seed=5, batch=2, length=10)
    cache = eviction_cache_factory(model, EvictionPolicy("tova", 1.0))()
    assert torch.allclose(forward_in_chunks(model, ids, cache, chunk_size=3), model(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        forward_in_chunks(model, ids, cache, chunk_size=0)


def test_eviction_on_gqa_model_stores_grouped_heads():
    model = _eager("llama")
    convert_to_gqa(model, 2)
    ids, _ = _batch(seed=6, batch=1, length=12)
    cache = eviction_cache_factory(model, EvictionPolicy("h2o", 0.5))()
    model(ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape == (1, 2, 6, 8)
    full = full_kv_bytes_per_token(model.config, torch.float32)  # config now has 2 K/V heads
    assert cache.kv_bytes() == 0.5 * full * 12


def test_bad_parameters_raise_clear_errors():
    with pytest.raises(ValueError, match="keep fraction"):
        EvictionPolicy("h2o", 1.5)
    with pytest.raises(ValueError, match="keep fraction"):
        EvictionPolicy("h2o", 0.0)
    with pytest.raises(ValueError, match="unknown eviction method"):
        EvictionPolicy("lru", 0.5)
    with pytest.raises(ValueError, match="kernel"):
        EvictionPolicy("snapkv", 0.5, kernel=4)
    model = _eager("llama")
    ids, _ = _batch(batch=1, length=6)
    cache = eviction_cache_factory(model, EvictionPolicy("snapkv", 0.5, window=8))()
    with pytest.raises(ValueError, match="longer than the prompt"):
        model(ids, past_key_values=cache, use_cache=True)


def test_cache_without_eviction_attention_fails_loudly():
    model = tiny_model("llama")  # default sdpa attention: the cache would never see scores
    ids, _ = _batch(batch=1, length=6)
    cache = EvictionCache(model.config, EvictionPolicy("h2o", 0.5))
    with pytest.raises(RuntimeError, match="kv_eviction"):
        model(ids, past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("family", ("llama", "opt", "gemma2"))
@pytest.mark.parametrize("method", ("streamingllm", "snapkv", "tova", "h2o"))
def test_probabilities_of_the_rows_a_policy_reads_give_what_every_row_gives(family, method, monkeypatch):
    # An unpadded chunk computes its output through SDPA (Gemma 2: the fused soft-capped attention) and
    # explicit probabilities only for the rows the policy reads (EvictionPolicy.score_rows); forcing
    # every row must change nothing. Gemma 2's tiny window (8) is shorter than the prompt.
    from baselines.policies import POLICIES

    model = tiny_model(family, **({"sliding_window": 8} if family == "gemma2" else {}))
    if family == "gemma2":
        assert model.config.attn_logit_softcapping and "sliding_attention" in model.config.layer_types
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    policy = EvictionPolicy(method, 0.4, window=6)
    assert policy.score_rows(40) == {"streamingllm": 0, "snapkv": 6, "tova": 1, "h2o": 40}[method]

    def run():
        cache = eviction_cache_factory(model, policy)()
        out = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache,
                             output_scores=True, return_dict_in_generate=True)
        return out, cache

    fast, fast_cache = run()
    monkeypatch.setattr(POLICIES[method], "score_rows", lambda self, length: length)
    full, full_cache = run()
    assert torch.equal(fast.sequences, full.sequences)
    for a, b in zip(fast.scores, full.scores):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(fast_cache.layers, full_cache.layers):
        assert torch.equal(a.slots, b.slots) and torch.equal(a.valid, b.valid)
        assert torch.allclose(a.score, b.score, atol=1e-6) and torch.allclose(a.keys, b.keys, atol=1e-5)


def test_rotate_keys_gives_the_same_values_with_few_distinct_shifts():
    from baselines.eviction import rotate_keys

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 50, 8, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))

    def direct(delta):  # the rotation written out, every slot's angles computed
        angles = delta.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
        angles = torch.cat((angles, angles), dim=-1)
        k = keys.to(torch.float64)
        rotated = torch.cat((-k[..., 4:], k[..., :4]), dim=-1)
        return (k * angles.cos() + rotated * angles.sin()).to(keys.dtype)

    few = torch.where(torch.arange(50) < 4, 0, -1).expand(2, 3, 50)  # StreamingLLM's steady state
    many = torch.randint(-400, 400, (2, 3, 50), generator=gen)
    for delta in (few, many, torch.full((2, 3, 50), 7)):
        assert torch.equal(rotate_keys(keys, delta, inv_freq), direct(delta))

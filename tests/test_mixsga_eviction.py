"""Token eviction stacked on mixSGA (``mixsga.eviction`` via ``harness.methods``).

Hand-checked selections, the byte budget (per sample, against the ledger's bytes
of the realised routing), keep = 1 reproducing plain mixSGA, and agreement with
the baseline eviction caches on a model where mixSGA is the identity.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from baselines.eviction import forward_in_chunks
from baselines.testing import tiny_model
from harness.methods import get_method
from mixsga import MixSGACache, mixsga_kv_bytes_for_counts
from mixsga.eviction import MixSGAEvictionCache, keep_within_bytes

POLICIES = ("h2o", "streamingllm", "snapkv", "tova")
EXTRA = {"snapkv": {"window": 4, "kernel": 3}, "streamingllm": {"sink_tokens": 2}}


def _ids(batch: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _stacked(policy: str, budget: float, family: str = "llama", inner_budget: float = 0.5, inner=None, **model_kw):
    model = tiny_model(family, **model_kw)
    config = copy.deepcopy(model.config)
    method = get_method(f"{policy}+mixsga")
    params = method.params_for_budget(config, budget, inner_budget=inner_budget, inner=inner, **EXTRA.get(policy, {}))
    return method, method.apply(model, params), params, config


def _plain_bytes(model, dtype=torch.float32) -> int:
    """Bytes plain mixSGA holds for every token the model routed (from the router's own statistics)."""
    stats = model.mixsga_runtime.stats
    counts = [[p + d for p, d in zip(pre, dec)] for pre, dec in zip(stats.prefill, stats.decode)]
    return mixsga_kv_bytes_for_counts(model.config, counts, model.mixsga_runtime.config.group_sizes, dtype)


def test_keep_within_bytes_takes_the_longest_fitting_prefix():
    rank = torch.tensor([2, 0, 4, 1, 3])  # preference order: tokens 1, 3, 0, 4, 2
    cost = torch.tensor([10, 40, 10, 20, 10])
    valid = torch.ones(5, dtype=torch.bool)
    # 40 + 20 = 60 fits 75, + 10 = 70 fits, + 10 = 80 does not: tokens 1, 3, 0
    assert keep_within_bytes(rank, valid, cost, 75).tolist() == [True, True, False, True, False]
    # an invalid token is never kept and uses no budget: 40 + 10 + 10 + 10 = 70 fits
    valid[3] = False
    assert keep_within_bytes(rank, valid, cost, 75).tolist() == [True, True, True, False, True]
    assert not keep_within_bytes(rank, valid, cost, 39).any()


def test_h2o_hand_example_on_the_expert_stores():
    # one expert (the full one) so every token costs the same and the byte budget is floor(keep * n) tokens
    method, model, params, _ = _stacked("h2o", 0.5, inner_budget=1.0)
    assert params["inner"]["ratios"] == [1, 0, 0] and params["eviction"]["keep"] == 0.5
    assert params["eviction"]["recent_fraction"] == 0.5
    cache = method.new_cache(model, params)
    observer = cache.layers[0].observer
    for layer in cache.layers:  # fill the stores without scoring, then score by hand
        layer.observer = None
    with torch.no_grad():
        model(input_ids=_ids(1, 6), past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    before = layer.stores[0][0].clone()
    heads = model.config.num_attention_heads
    probs = torch.full((heads, 6, 6), 0.01)
    probs[:, :, 1] = 0.5  # heavy hitters: token 1 gets the most attention, then token 3
    probs[:, :, 3] = 0.3
    probs[:, :, 5] = 0.0  # the newest token is kept as the recent window even without attention
    observer(layer, 0, probs)
    # cap floor(0.5 * 6) = 3 tokens: recent floor(3 * 0.5) = 1 (token 5) + the two heaviest (1, 3)
    assert layer.num_tokens(0) == 3
    assert torch.equal(layer.stores[0][0], before[:, :, [1, 3, 5]])
    state = cache.states[0][0]
    assert state.slots.tolist() == [1, 3, 5]
    torch.testing.assert_close(state.score, torch.tensor([0.5, 0.3, 0.0]) * 6 * heads)
    assert cache.layers[1].num_tokens(0) == 6  # layer 1 was not scored


@pytest.mark.parametrize("policy", POLICIES)
def test_keep_one_reproduces_plain_mixsga(policy):
    method, model, params, _ = _stacked(policy, 0.5, inner_budget=0.5)  # keep = 1.0
    assert params["eviction"]["keep"] == 1.0
    ids = _ids(2, 14, seed=3)
    plain, evicting = MixSGACache(model.config), method.new_cache(model, params)
    with torch.no_grad():
        want = forward_in_chunks(model, ids, plain, chunk_size=1)
        got = forward_in_chunks(model, ids, evicting, chunk_size=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert method.live_bytes(evicting) == plain.kv_bytes()
    assert evicting.kept_tokens() == [[14, 14]] * model.config.num_hidden_layers


@pytest.mark.parametrize("policy", POLICIES)
def test_every_sample_compressed_within_keep_times_mixsga_bytes(policy):
    method, model, params, config = _stacked(policy, 0.25)  # keep 0.5 of a 3:1:6 model
    keep = params["eviction"]["keep"]
    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # left padding: sample 0 has 16 real prompt tokens
    prefilled = method.new_cache(model, params)
    with torch.no_grad():
        # prefill: expert-choice routing realises the ratios exactly (16 and 20 tokens), so the
        # bound is keep x the ledger's analytic bytes (plus the index bytes)
        model(input_ids=ids, attention_mask=mask, past_key_values=prefilled, use_cache=True)
    analytic = method.analytic_bytes_per_token(config, params) * int(mask.sum())
    assert 0 < method.live_bytes(prefilled) <= analytic + keep * int(mask.sum()) * config.num_hidden_layers
    cache = method.new_cache(model, params)
    model.mixsga_runtime.reset_stats()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (2, 26)
    # decode routes by argmax: the bound is keep x what plain mixSGA would store under that routing
    assert 0 < method.live_bytes(cache) <= keep * _plain_bytes(model)
    assert cache.uncompressed_bytes() == _plain_bytes(model)
    real = [16 + 5, 20 + 5]
    for layer in cache.kept_tokens():
        for b, kept in enumerate(layer):
            assert 0 < kept < real[b], f"sample {b} not compressed"
    assert cache.get_seq_length() == 25
    assert cache.metadata_bytes() > 0


def test_single_expert_keeps_floor_keep_n_tokens_per_sample():
    method, model, params, config = _stacked("h2o", 0.2, inner_budget=0.25)  # 0:0:1, keep 0.8
    ids = _ids(2, 11, seed=4)
    cache = method.new_cache(model, params)
    with torch.no_grad():
        forward_in_chunks(model, ids, cache, chunk_size=3)
    assert cache.kept_tokens() == [[math.floor(0.8 * 11)] * 2] * config.num_hidden_layers
    assert method.live_bytes(cache) <= method.analytic_bytes_per_token(config, params) * ids.numel()


@pytest.mark.parametrize("policy", POLICIES)
def test_identity_mixsga_evicts_like_the_baseline_cache(policy):
    # One K/V head and one full-size expert: mixSGA is the base model, its per-token selection
    # equals the baseline's per-K/V-head selection, and the budgets coincide; so must the logits.
    model = tiny_model("llama", num_key_value_heads=1)
    config = copy.deepcopy(model.config)
    ids = _ids(1, 16, seed=6)
    extra = EXTRA.get(policy, {})
    base = get_method(policy)
    base_params = base.params_for_budget(config, 0.5, **extra)
    base_model = base.apply(copy.deepcopy(model), base_params)
    stacked = get_method(f"{policy}+mixsga")
    params = stacked.params_for_budget(config, 0.5, inner_budget=1.0, inner={"ratios": [1], "group_sizes": [1]},
                                       **extra)
    mix_model = stacked.apply(copy.deepcopy(model), params)
    base_cache, mix_cache = base.new_cache(base_model, base_params), stacked.new_cache(mix_model, params)
    with torch.no_grad():
        want = [base_model(input_ids=ids[:, :8], past_key_values=base_cache, use_cache=True).logits]
        got = [mix_model(input_ids=ids[:, :8], past_key_values=mix_cache, use_cache=True).logits]
        for t in range(8, 16):
            want.append(base_model(input_ids=ids[:, t : t + 1], past_key_values=base_cache, use_cache=True).logits)
            got.append(mix_model(input_ids=ids[:, t : t + 1], past_key_values=mix_cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=2e-5, rtol=1e-4)
    kept = base_cache.layers[0].kept_tokens()[0, 0].item()
    assert mix_cache.kept_tokens()[0] == [kept] == [8]
    # the same K/V bytes (the mixSGA cache adds one index byte per stored token)
    assert mix_cache.kv_bytes() == base_cache.kv_bytes() + 8 * config.num_hidden_layers


def test_errors_name_the_problem():
    method, model, params, _ = _stacked("h2o", 0.25)
    cache = method.new_cache(model, params)
    with pytest.raises(ValueError, match="observes attention itself"):
        cache.set_observer(lambda *a: None)
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(3)
    method, model, params, _ = _stacked("snapkv", 0.25)
    cache = method.new_cache(model, params)
    with pytest.raises(ValueError, match="longer than the prompt"):
        with torch.no_grad():
            model(input_ids=_ids(1, 3), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="keep fraction must be in"):
        MixSGAEvictionCache(model.config, SimpleNamespace(keep=0.0))


def _per_sample(cache: MixSGAEvictionCache) -> MixSGAEvictionCache:
    """The same cache scoring decode steps one sample at a time (the observer without the batched hook)."""
    for layer in cache.layers:
        layer.batch_observer = None
    return cache


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("policy", POLICIES)
def test_batched_decode_step_evicts_exactly_as_per_sample(policy, family):
    # A prefill of three samples (one left-padded), then token-by-token decode: the batched step
    # (one policy call and one compaction for the batch) must select, store and score exactly as
    # the per-sample path (logits and stores bit for bit); Gemma 2 adds sliding layers, StreamingLLM
    # re-rotates keys.
    extra = {"sliding_window": 6} if family == "gemma2" else {}
    method, model, params, _ = _stacked(policy, 0.25, family=family, **extra)  # keep 0.5 of 3:1:6
    ids = _ids(3, 22, seed=7)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    caches = [method.new_cache(model, params), _per_sample(method.new_cache(model, params))]
    logits = []
    for cache in caches:
        steps = []
        with torch.no_grad():
            steps.append(model(input_ids=ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache,
                               use_cache=True).logits)
            for t in range(8, ids.shape[1]):
                steps.append(model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                                   past_key_values=cache, use_cache=True).logits)
        logits.append(torch.cat(steps, 1))
    batched, single = caches
    assert torch.equal(logits[0], logits[1])
    assert batched.kept_tokens() == single.kept_tokens()
    assert any(kept < 22 - 3 * (b == 1) for row in batched.kept_tokens() for b, kept in enumerate(row))
    for a, b in zip(batched.layers, single.layers):
        assert torch.equal(a.counts, b.counts)
        for sa, sb in zip(a.stores, b.stores):
            assert all(torch.equal(x, y) for x, y in zip(sa, sb))
    for row_a, row_b in zip(batched.states, single.states):
        for sa, sb in zip(row_a, row_b):
            # scores may differ in the last bit: a reduction over heads rounds a column by whether it falls
            # in the vectorised part of its row, and the batched rows are padded to the longest sample's
            torch.testing.assert_close(sa.score, sb.score, rtol=1e-6, atol=0)
            assert torch.equal(sa.slots, sb.slots)
            assert torch.equal(sa.rope_pos, sb.rope_pos)
            assert (sa.seen, sa.seen_bytes, sa.prompt_end) == (sb.seen, sb.seen_bytes, sb.prompt_end)
            assert (sa.recent is None and sb.recent is None) or torch.equal(sa.recent, sb.recent)
    assert batched.metadata_bytes() == single.metadata_bytes() > 0
    assert batched.uncompressed_bytes() == single.uncompressed_bytes() > 0

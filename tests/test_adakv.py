"""AdaKV: head-wise eviction budgets, the uniform total per layer redistributed across K/V heads by score."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

from baselines.eviction import EvictionPolicy, PackedEvictionLayer
from baselines.policies import EqualHeads
from baselines.testing import tiny_model
from harness.methods import get_method
from harness.methods.adakv import AdaptiveHeads
from harness.orchestration.config import ConfigError, run_table, validate_config
from kvledger import full_kv_bytes_per_token


def _hand_layer(alpha: float) -> PackedEvictionLayer:
    """Two K/V heads that saw 6 tokens under H2O (no recent window), keep 0.5: 2 x 3 tokens in all.

    Head 0 is peaked (every query attends only to token 0); head 1 spreads each query's
    attention evenly over the tokens it sees.
    """
    policy = EvictionPolicy("h2o", 0.5, recent_fraction=0.0)
    layer = PackedEvictionLayer(policy, layer_idx=0, heads=AdaptiveHeads(alpha))
    keys = torch.arange(2 * 6 * 2, dtype=torch.float32).view(1, 2, 6, 2)
    layer.update(keys, keys + 100)
    peaked = torch.zeros(6, 6)
    peaked[:, 0] = 1.0
    spread = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7, dtype=torch.float32)[:, None]
    probs = torch.stack([peaked, spread])[None, :, None]  # [B=1, K=2, R=1, T, S]
    layer.observe(probs, torch.ones(1, 6, dtype=torch.bool), None)
    return layer


def test_hand_example_gives_the_spread_head_the_budget_at_the_same_total():
    layer = _hand_layer(alpha=0.2)  # floor(0.2 x 3) = 0: no safeguard
    # H2O scores: head 0 [6, 0, 0, 0, 0, 0]; head 1 [2.45, 1.45, 0.95, 0.62, 0.37, 0.17].
    # The best 6 of all 12: head 0's token 0 and head 1's tokens 0..4.
    (slots,) = layer.per_head("slots")
    assert [s.tolist() for s in slots] == [[0], [0, 1, 2, 3, 4]]
    assert layer.kept_tokens().tolist() == [[1, 5]] and int(layer.kept_tokens().sum()) == 2 * 3
    # the store is packed: 6 rows of head_dim, K and V of exactly the kept (head, token) pairs
    assert layer.keys.shape == (6, 2) and layer.values.shape == (6, 2)
    assert layer.keys[:, 0].tolist() == [0.0, 12.0, 14.0, 16.0, 18.0, 20.0]
    assert torch.equal(layer.values, layer.keys + 100)
    assert layer.kv_bytes() == 6 * 2 * 4 * 2
    # the safeguard: alpha 0.5 guarantees each head its best floor(1.5) = 1 token (already so here) ...
    assert [s.tolist() for s in _hand_layer(alpha=0.5).per_head("slots")[0]] == [[0], [0, 1, 2, 3, 4]]
    # ... and alpha 1 is uniform eviction: each head its own best 3
    uniform = _hand_layer(alpha=1.0)
    assert [s.tolist() for s in uniform.per_head("slots")[0]] == [[0, 1, 2], [0, 1, 2]]


def test_selection_keeps_the_layer_total_and_each_heads_floor():
    gen = torch.Generator().manual_seed(0)
    policy = EvictionPolicy("snapkv", 0.3, window=2)
    bsz, heads, width = 3, 4, 20
    # heads with very different score scales, so the flattened top-k moves budget between them
    score = torch.rand(bsz, heads, width, generator=gen) * torch.tensor([10.0, 1.0, 0.1, 0.01])[:, None]
    valid = torch.ones(bsz, heads, width, dtype=torch.bool)
    valid[1, :, :3] = False  # a sample with fewer real tokens
    slots = torch.arange(width).expand(bsz, heads, width)
    cap = torch.tensor([6, 5, 6])[:, None, None]
    for alpha in (0.0, 0.2, 0.5, 1.0):
        keep = AdaptiveHeads(alpha).select(policy, score, valid, slots, cap, None)
        per_head = keep.sum(-1)
        assert torch.equal(per_head.sum(-1), heads * cap.flatten())  # the uniform total, redistributed
        assert bool((per_head >= torch.floor(alpha * cap[:, :, 0] + 1e-9)).all())
        assert not bool((keep & ~valid).any())
        # SnapKV's window (the last 2 real slots) is kept in every head
        assert bool(keep[:, :, -2:].all())
        if alpha == 1.0:
            assert torch.equal(keep, EqualHeads().select(policy, score, valid, slots, cap, None))
        else:  # the high-scoring head takes budget from the low-scoring ones
            assert bool((per_head[:, 0] > per_head[:, 3]).all())


def _adakv(family: str, keep: float, **explicit):
    model = tiny_model(family)
    config = copy.deepcopy(model.config)
    method = get_method("adakv")
    params = method.params_for_budget(config, keep, **explicit)
    return method.apply(model, params).eval(), config, method, params


@pytest.mark.parametrize("family", ("llama", "tinyllama"))
def test_prefill_and_decode_keep_the_uniform_total_in_ragged_heads_and_count_exact_bytes(family):
    model, config, method, params = _adakv(family, 0.25, window=4)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = method.new_cache(model, params)
    kv_heads, dim = config.num_key_value_heads, config.head_dim
    ragged = False
    with torch.no_grad():
        model(ids[:, :32], past_key_values=cache, use_cache=True)
        for t in range(32, 40):  # decode: each step appends a token and evicts back to the budget
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            for layer in cache.layers:
                kept = layer.kept_tokens()
                assert torch.equal(kept.sum(-1), torch.full((2,), kv_heads * int(0.25 * (t + 1))))
                assert layer.keys.shape == (int(kept.sum()), dim)  # packed: nothing padded
                ragged |= bool((kept.max(-1).values > kept.min(-1).values).any())
    assert ragged  # heads really kept different counts
    live = method.live_bytes(cache)
    assert live == sum(int(layer.kept_tokens().sum()) for layer in cache.layers) * dim * 4 * 2
    assert live == method.analytic_bytes_per_token(config, params) * ids.numel()  # 25 % of 40 tokens is whole
    # the same bytes as uniform SnapKV at this budget
    uniform = get_method("snapkv")
    uparams = uniform.params_for_budget(config, 0.25, window=4)
    ucache = uniform.new_cache(model, uparams)
    with torch.no_grad():
        model(ids, past_key_values=ucache, use_cache=True)
    assert uniform.live_bytes(ucache) == live


def test_padded_batch_stores_no_filler():
    model, config, method, params = _adakv("llama", 0.5, window=4)
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    cache = method.new_cache(model, params)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    full = full_kv_bytes_per_token(config, torch.float32)
    # 0.5 x (24 + 18) real tokens, whole: the padded sample's rows hold no filler slots
    assert method.live_bytes(cache) == 0.5 * full * int(mask.sum())


_ALLOWED: dict[int, torch.Tensor] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                         **kwargs):
    """Plain attention over the full cache, each K/V head masked to ``_ALLOWED[layer]`` ``[B, Hkv, T, S]``."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    allowed = _ALLOWED[module.layer_idx].repeat_interleave(group, dim=1)
    logits = torch.matmul(query, key.transpose(-1, -2)) * (scaling if scaling is not None else module.head_dim**-0.5)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


@pytest.mark.parametrize("family", ("llama", "tinyllama"))
def test_decode_matches_masked_attention_over_each_heads_kept_tokens(family):
    model, config, method, params = _adakv(family, 0.4, policy="h2o")
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    prompt = 12
    reference = copy.deepcopy(model)
    AttentionInterface.register("adakv_reference", _reference_attention)
    reference.set_attn_implementation("adakv_reference")
    cache, full = method.new_cache(model, params), DynamicCache(config=config)
    layers = range(config.num_hidden_layers)
    with torch.no_grad():
        for i in layers:  # the prefill sees its own chunk in full, causally
            causal = torch.ones(prompt, prompt, dtype=torch.bool).tril()
            _ALLOWED[i] = causal.expand(2, config.num_key_value_heads, -1, -1)
        got = model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits
        want = reference(ids[:, :prompt], past_key_values=full, use_cache=True).logits
        assert torch.allclose(got, want, atol=1e-5)
        differ = False
        for t in range(prompt, ids.shape[1]):
            for i in layers:  # the new token sees what each head kept after the last pass, and itself
                allowed = torch.zeros(2, config.num_key_value_heads, 1, t + 1, dtype=torch.bool)
                for b, heads in enumerate(cache.layers[i].per_head("slots")):
                    for h, slots in enumerate(heads):
                        allowed[b, h, 0, slots] = True
                        differ |= len(slots) != len(heads[0]) or not torch.equal(slots, heads[0])
                allowed[..., t] = True
                _ALLOWED[i] = allowed
            got = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            want = reference(ids[:, t : t + 1], past_key_values=full, use_cache=True).logits
            assert torch.allclose(got, want, atol=1e-5), (t, (got - want).abs().max())
        assert differ  # heads attended over different token sets


def test_full_budget_and_alpha_one_reproduce_uniform_eviction():
    model, config, method, params = _adakv("llama", 1.0)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = tiny_model("llama")(ids).logits
        assert torch.allclose(model(ids, past_key_values=method.new_cache(model, params), use_cache=True).logits,
                              base, atol=1e-5)
    model, config, method, params = _adakv("llama", 0.5, alpha=1.0, window=4)
    uniform = get_method("snapkv")
    uparams = uniform.params_for_budget(config, 0.5, window=4)
    cache, ucache = method.new_cache(model, params), uniform.new_cache(model, uparams)
    with torch.no_grad():
        for t in range(ids.shape[1]):  # token by token, as bounded-cache perplexity scores
            got = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
            want = model(ids[:, t : t + 1], past_key_values=ucache, use_cache=True).logits
            assert torch.equal(got, want)
    for layer, ulayer in zip(cache.layers, ucache.layers):
        for b, heads in enumerate(layer.per_head("slots")):
            for h, slots in enumerate(heads):
                assert torch.equal(slots, ulayer.slots[b, h][ulayer.valid[b, h]])


def test_batch_reorder_keeps_each_heads_tokens():
    model, config, method, params = _adakv("llama", 0.25, window=4)
    ids = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    cache = method.new_cache(model, params)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    before = layer.per_head("keys")
    cache.reorder_cache(torch.tensor([1, 0]))
    after = layer.per_head("keys")
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[1]))
    assert all(torch.equal(a, b) for a, b in zip(after[1], before[0]))
    assert layer.packed and layer.valid is None


def test_bad_params_are_refused_at_config_time_and_run_time():
    config = tiny_model("llama").config
    method = get_method("adakv")
    with pytest.raises(ValueError, match="policy must be one of \\['snapkv', 'h2o'\\]"):
        method.params_for_budget(config, 0.25, policy="tova")
    with pytest.raises(ValueError, match="alpha must be a number in \\[0, 1\\]"):
        method.params_for_budget(config, 0.25, alpha=1.5)
    with pytest.raises(ValueError, match="not shorter than the context"):
        method.params_for_budget(config, 0.25, context_len=16)
    with pytest.raises(ConfigError, match="policy must be one of"):
        validate_config({"experiments": {"m": {"runs": [
            {"method": "adakv", "budgets": [0.25], "params": {"policy": "streamingllm"}}]}}})
    with pytest.raises(ValueError, match="alpha must be in"):
        AdaptiveHeads(-0.1)


def test_config_expands_adakv_on_the_base_weights():
    cfg = validate_config({"experiments": {"m": {"training": "cpt", "runs": [
        {"method": "adakv", "budgets": [0.25]}, {"method": "adakv", "budgets": [0.5], "params": {"alpha": 0.5}}]}}})
    rows = run_table(cfg)
    assert [r["run_id"] for r in rows] == ["llama3__cpt__adakv__kv25__s0", "llama3__cpt__adakv-alpha0.5__kv50__s0"]
    assert {r["train_id"] for r in rows} == {"llama3__cpt__base__kv100__s0"}


@pytest.mark.parametrize("family", ("opt", "gemma2"))
def test_other_families_keep_the_budget_token_by_token(family):
    """OPT (learned positions, MHA) and Gemma 2 (sliding-window layers: a window can hold fewer than the cap)."""
    model, config, method, params = _adakv(family, 0.4, window=4)
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(6))
    cache = method.new_cache(model, params)
    heads = config.num_key_value_heads if family == "gemma2" else config.num_attention_heads
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            for layer in cache.layers:
                total = layer.kept_tokens().sum(-1)
                cap = heads * int(0.4 * (t + 1) + 1e-9)
                assert bool((total <= cap).all()) and (layer.sliding_window is not None or bool((total == cap).all()))
    full = full_kv_bytes_per_token(config, torch.float32)
    assert method.live_bytes(cache) <= 0.4 * full * ids.numel()
    assert any(layer.sliding_window is not None for layer in cache.layers) == (family == "gemma2")

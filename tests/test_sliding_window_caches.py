"""Gemma 2's sliding-window layers store only the window, in every cache (as ``DynamicSlidingWindowLayer``).

Contexts several times the tiny models' windows, batches with left padding: mixSGA's
windowed expert stores decode exactly as a full forward under the same routing (torch
and Triton paths), the eviction caches budget against what the base stores there, and
eviction stacked on mixSGA at keep 1 is plain windowed mixSGA. Bytes follow the ledger
(``kvledger.layer_windows`` / ``stored_tokens`` / ``base_kv_bytes``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from baselines.eviction import EvictionPolicy, eviction_cache_factory, forward_in_chunks
from baselines.testing import tiny_model as baseline_tiny_model
from harness.methods import get_method, realized_budget
from kvledger import base_kv_bytes, layer_windows, stored_share, stored_tokens
from mixsga import MixSGACache, mixsga_kv_bytes_for_counts
from mixsga.cache import PAGE
from tests.test_mixsga_decode import needs_backend, needs_triton
from tests.test_mixsga_models import _routing_of, _stepwise, converted, left_padded, record_routes  # noqa: F401

WINDOW = 4  # tests.test_mixsga_models' Gemma 2: sliding, full; a sliding layer keeps 3 tokens


def test_ledger_windows_follow_the_base_models_cache():
    model = baseline_tiny_model("gemma2", sliding_window=6)  # sliding, full, sliding, full
    config = model.config
    assert layer_windows(config) == [5, None, 5, None]
    assert stored_tokens(config, 3) == [3, 3, 3, 3] and stored_tokens(config, 20) == [5, 20, 5, 20]
    assert stored_share(config, 20) == (5 + 20) / 40 and stored_share(baseline_tiny_model("llama").config, 20) == 1
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    for n in (3, 5, 6, 20):
        with torch.no_grad():
            cache = model(ids[:, :n], use_cache=True, past_key_values=DynamicCache(config=config)).past_key_values
        stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        assert stored == base_kv_bytes(config, n, torch.float32), n
    with pytest.raises(ValueError, match="tokens must be positive"):
        stored_share(config, 0)
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        bad = copy.deepcopy(config)
        bad.sliding_window = 0
        layer_windows(bad)


@pytest.mark.parametrize("chunk", [1, 3])
def test_mixsga_windowed_stores_decode_exactly_with_left_padding(chunk):
    """Batch of 3 (two left-padded), prompts shorter and longer than the window, decoded past a page."""
    _, model = converted("gemma2", ratios=(3, 1, 6))
    length = 10 + PAGE + 7
    ids, mask = left_padded(batch=3, length=length, pad=(8, 0, 3), seed=17)  # sample 0's prompt: 2 tokens
    step_logits, cache = _stepwise(model, ids, prompt_len=10, chunk=chunk, mask=mask)
    routing = _routing_of(cache, model, list(mask.bool()))
    pos_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), model.mixsga_runtime.force_routing(routing):
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(step_logits[real], full[real], atol=2e-5, rtol=1e-5)
    seen = mask.sum(-1).tolist()
    windows = layer_windows(model.config)
    assert windows == [WINDOW - 1, None]
    for layer, keep in zip(cache.layers, windows):
        assert [layer.num_tokens(b) for b in range(3)] == [n if keep is None else min(n, keep) for n in seen]
        if keep is not None:  # stores never grow past one page: the window is all they hold
            assert all(buf.shape[3] <= PAGE for buf in layer.buffers)
    counts = cache.expert_counts()
    assert cache.kv_bytes() == mixsga_kv_bytes_for_counts(model.config, counts, (1, 2, 4), torch.float32)
    with pytest.raises(RuntimeError, match="cannot be cropped once tokens left its window"):
        cache.crop(-1)


def test_mixsga_generate_beyond_the_window_and_bytes_near_nominal():
    _, model = converted("gemma2", ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=12, pad=(5, 0), seed=5)
    cache = MixSGACache(model.config)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                             pad_token_id=0, past_key_values=cache)
    assert out.shape == (2, 32)
    seen = (mask.sum(-1) + 19).tolist()
    assert [cache.layers[0].num_tokens(b) for b in range(2)] == [WINDOW - 1] * 2
    assert [cache.layers[1].num_tokens(b) for b in range(2)] == seen
    # a full forward under the cache's routing gives the tokens generate chose
    full_mask = torch.cat([mask, torch.ones(2, 19, dtype=mask.dtype)], dim=1)
    routing = _routing_of(cache, model, list(full_mask.bool()))
    with torch.no_grad(), model.mixsga_runtime.force_routing(routing):
        full = model(input_ids=out[:, :-1], attention_mask=full_mask,
                     position_ids=(full_mask.cumsum(1) - 1).clamp_min(0), use_cache=False).logits
    assert torch.equal(full[:, 11:].argmax(-1), out[:, 12:])


@needs_triton
@needs_backend
def test_triton_backend_on_windowed_stores_equals_torch():
    _, model = converted("gemma2", ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=9, pad=(3, 0), seed=4)
    outs = {}
    for backend in ("torch", "triton"):
        with torch.no_grad():
            outs[backend] = model.generate(
                ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                past_key_values=MixSGACache(model.config, decode_backend=backend), return_dict_in_generate=True,
                output_logits=True,
            )
        assert outs[backend].past_key_values.layers[0].num_tokens(1) == WINDOW - 1
    assert torch.equal(outs["torch"].sequences, outs["triton"].sequences)
    torch.testing.assert_close(torch.stack(outs["triton"].logits), torch.stack(outs["torch"].logits),
                               atol=1e-5, rtol=1e-5)


def _eager_gemma(window: int = 6):
    model = baseline_tiny_model("gemma2", sliding_window=window)
    model.set_attn_implementation("eager")  # soft-capping is exact in eager only
    return model


def _padded(batch=2, length=20, seed=0):
    ids = torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("method", ["h2o", "streamingllm", "snapkv", "tova"])
def test_eviction_keep_one_decodes_like_the_base_and_stores_the_window(method):
    model = _eager_gemma()
    ids, mask = _padded()
    want = model(ids, attention_mask=mask).logits
    cache = eviction_cache_factory(model, EvictionPolicy(method, 1.0, window=2, sink_tokens=1))()
    with torch.no_grad():
        got = forward_in_chunks(model, ids, cache, chunk_size=1, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    seen = mask.sum(-1)
    for layer, keep in zip(cache.layers, layer_windows(model.config)):
        expect = seen if keep is None else seen.clamp_max(keep)
        assert torch.equal(layer.kept_tokens()[:, 0], expect), method


@pytest.mark.parametrize("name", ["h2o", "snapkv", "pyramidkv", "adakv", "h2o+gqa"])
def test_eviction_budget_is_half_of_what_the_base_stores_on_every_layer(name):
    model = _eager_gemma(7)  # sliding layers store 6 tokens, full ones 20: half of each is whole
    config = copy.deepcopy(model.config)
    method = get_method(name)
    extra = {"window": 2} if name in ("snapkv", "pyramidkv", "adakv") else {}
    params = method.params_for_budget(config, 0.5, **extra) if name != "h2o+gqa" else \
        method.params_for_budget(config, 0.25)
    model = method.apply(model, params)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(2))
    cache = method.new_cache(model, params)
    with torch.no_grad():
        forward_in_chunks(model, ids, cache, chunk_size=4)
    budget = 0.25 if name == "h2o+gqa" else 0.5
    assert realized_budget(method, config, cache, 20) == budget
    assert method.live_bytes(cache) == method.analytic_bytes(config, params, 20, torch.float32)
    if name in ("h2o", "snapkv"):
        kept = [int(layer.kept_tokens()[0, 0]) for layer in cache.layers]
        assert kept == [math.floor(0.5 * n) for n in stored_tokens(config, 20)] == [3, 10, 3, 10]


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_eviction_on_mixsga_keep_one_is_windowed_mixsga(policy):
    model = baseline_tiny_model("gemma2", sliding_window=6)
    config = copy.deepcopy(model.config)
    method = get_method(f"{policy}+mixsga")
    params = method.params_for_budget(config, 0.5, inner_budget=0.5)  # keep 1.0
    model = method.apply(model, params)
    ids, mask = _padded(seed=3)
    plain, evicting = MixSGACache(model.config), method.new_cache(model, params)
    want, got = _prefill_then_steps(model, ids, mask, plain), _prefill_then_steps(model, ids, mask, evicting)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=1e-6)
    assert method.live_bytes(evicting) == plain.kv_bytes()
    seen = mask.sum(-1).tolist()
    assert evicting.kept_tokens() == [[n if keep is None else min(n, keep) for n in seen]
                                      for keep in layer_windows(config)]


def _prefill_then_steps(model, ids, mask, cache, prompt: int = 8) -> torch.Tensor:
    """Logits of a left-padded batch: a ``prompt``-token prefill, then one token per step."""
    with torch.no_grad():
        logits = [model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], past_key_values=cache,
                        use_cache=True).logits]
        for t in range(prompt, ids.shape[1]):
            logits.append(model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                                past_key_values=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def test_eviction_on_mixsga_halves_what_plain_mixsga_stores_per_layer():
    model = baseline_tiny_model("gemma2", sliding_window=6)
    config = copy.deepcopy(model.config)
    method = get_method("h2o+mixsga")
    params = method.params_for_budget(config, 0.25, inner_budget=0.5)  # keep 0.5 of 3:1:6
    model = method.apply(model, params)
    ids = torch.randint(3, 97, (1, 24), generator=torch.Generator().manual_seed(4))
    evicting = method.new_cache(model, params)
    with torch.no_grad():
        forward_in_chunks(model, ids, evicting, chunk_size=1)
    windows = layer_windows(config)
    for layer, keep in zip(evicting.layers, windows):
        assert 0 < layer.num_tokens(0) <= math.floor(0.5 * (24 if keep is None else keep))
    # within keep x what plain mixSGA stores under the same routing on every layer: the window's tokens
    # on a sliding layer (decode routing follows the evicted hidden states, so compare with its own)
    for i, (layer, keep) in enumerate(zip(evicting.layers, windows)):
        state = evicting.states[i][0]
        assert 0 < layer.live_bytes() <= 0.5 * state.seen_bytes
        assert (state.recent is None) == (keep is None) and (keep is None or state.recent.numel() == keep)
        if keep is not None:
            assert state.seen_bytes == int(state.recent.sum())

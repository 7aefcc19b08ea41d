"""The benchmark's strongest GQA reference (``benchmarks.fast_gqa.StaticViewCache``) decodes exactly like a DynamicCache."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.testing import tiny_model
from benchmarks.fast_gqa import StaticViewCache
from harness.methods import get_method


def test_static_view_cache_generates_the_dynamic_cache_logits():
    method = get_method("gqa")
    base = tiny_model("llama")
    params = method.params_for_budget(base.config, 0.5)
    model = method.apply(copy.deepcopy(base), params).eval()
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        cache = StaticViewCache(model.config, max_len=16)
        got = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(ref.sequences, got.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), atol=1e-5, rtol=1e-5)
    # live = the filled K/V (what the DynamicCache held), reserved = the whole preallocation
    assert cache.kv_bytes() == sum(layer.keys.nbytes + layer.values.nbytes for layer in ref.past_key_values.layers)
    assert cache.reserved_bytes() > cache.kv_bytes()


def test_static_view_cache_refuses_to_overflow():
    method = get_method("gqa")
    base = tiny_model("llama")
    model = method.apply(copy.deepcopy(base), method.params_for_budget(base.config, 0.5)).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="holds 4 positions"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), past_key_values=StaticViewCache(model.config, 4))

"""PyramidKV: layer-wise eviction budgets, same total as uniform eviction, pyramid-shaped across layers."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.testing import tiny_model
from harness.methods import get_method
from harness.methods.pyramidkv import pyramid_allocation
from harness.orchestration.config import run_table, validate_config


@pytest.mark.parametrize("seen,keep,beta,layers", [(40, 0.25, 20.0, 4), (35, 0.5, 20.0, 26), (12, 0.9, 2.0, 4),
                                                    (7, 0.3, 1.0, 3), (10, 0.5, 20.0, 1)])
def test_allocation_keeps_the_total_in_a_pyramid(seen, keep, beta, layers):
    counts = pyramid_allocation(seen, keep, beta, layers)
    assert sum(counts) == int(keep * seen * layers + 1e-9)  # the uniform total, redistributed
    assert all(0 <= c <= seen for c in counts)
    assert list(counts) == sorted(counts, reverse=True)  # lower layers keep more
    if beta == 1.0:  # beta 1 is the flat (uniform) split
        assert max(counts) - min(counts) <= 1


def test_top_layer_keeps_keep_over_beta():
    counts = pyramid_allocation(400, 0.25, 20.0, 8)
    assert counts[-1] == pytest.approx(0.25 * 400 / 20, abs=1) and counts[0] == pytest.approx(2 * 100 - 5, abs=1)


def test_cache_keeps_each_layers_budget_and_the_analytic_bytes():
    model = tiny_model("llama", num_hidden_layers=4)
    config = copy.deepcopy(model.config)
    method = get_method("pyramidkv")
    params = method.params_for_budget(config, 0.25, policy="h2o", beta=4)
    assert params["beta"] == 4.0 and params["eviction"]["method"] == "h2o"
    model = method.apply(model, params)
    cache = method.new_cache(model, params)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    kept = [int(layer.kept_tokens().max()) for layer in cache.layers]
    assert kept == list(pyramid_allocation(40, 0.25, 4.0, 4)) and kept[0] > kept[-1]
    assert method.live_bytes(cache) == method.analytic_bytes_per_token(config, params) * ids.numel()
    assert method.query_aware_for(params) is True
    streaming = method.params_for_budget(config, 0.25, policy="streamingllm")
    assert method.query_aware_for(streaming) is False


def test_bad_params_are_refused():
    method = get_method("pyramidkv")
    config = tiny_model("llama").config
    with pytest.raises(ValueError, match="beta must be a number >= 1"):
        method.params_for_budget(config, 0.25, beta=0.5)
    with pytest.raises(ValueError, match="policy must be one of"):
        method.params_for_budget(config, 0.25, policy="lru")
    with pytest.raises(ValueError, match="not shorter than the context"):
        method.params_for_budget(config, 0.25, context_len=16)


def test_config_expands_pyramidkv_on_the_base_weights():
    cfg = validate_config({"experiments": {"m": {"training": "cpt", "runs": [
        {"method": "pyramidkv", "budgets": [0.25], "params": {"beta": 10}}]}}})
    (row,) = run_table(cfg)
    assert row["run_id"] == "llama3__cpt__pyramidkv-beta10__kv25__s0"
    assert row["train_id"] == "llama3__cpt__base__kv100__s0"

"""The method registry: names, flags, budgets -> parameters, analytic vs live bytes, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.eviction import forward_in_chunks
from baselines.testing import tiny_config, tiny_model
from harness.methods import METHODS, get_method, realized_budget
from kvledger import full_kv_bytes_per_token

REQUIRED = ("base", "gqa", "mqa", "cla", "mixsga", "h2o", "streamingllm", "snapkv", "tova", "h2o+gqa", "h2o+mixsga")


def _ids(length: int = 20, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(0))


def test_registry_names_and_flags():
    for name in REQUIRED:
        assert get_method(name).name == name
    assert not any(m.simulated for m in METHODS.values())
    assert {n for n, m in METHODS.items() if m.needs_training} >= {"gqa", "mqa", "cla", "mixsga", "h2o+gqa"}
    assert not get_method("h2o").needs_training and not get_method("base").needs_training
    assert get_method("snapkv").query_aware and not get_method("streamingllm").query_aware
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        get_method("foo")


def test_params_for_budget_and_infeasible_budgets():
    cfg = tiny_config("llama")  # 4 K/V heads, 2 layers
    assert get_method("gqa").params_for_budget(cfg, 0.5) == {"num_key_value_heads": 2}
    assert get_method("mqa").params_for_budget(cfg, 0.25) == {"num_key_value_heads": 1}
    with pytest.raises(ValueError, match="GQA cannot store 35.00% .* 4 K/V heads"):
        get_method("gqa").params_for_budget(cfg, 0.35)
    with pytest.raises(ValueError, match="MQA keeps 1 of the model's 4"):
        get_method("mqa").params_for_budget(cfg, 0.5)
    with pytest.raises(ValueError, match="budget must be in"):
        get_method("h2o").params_for_budget(cfg, 1.2)  # a keep fraction above 1
    with pytest.raises(ValueError, match="budget must be 1.0"):
        get_method("base").params_for_budget(cfg, 0.5)
    with pytest.raises(ValueError, match="not shorter than the context"):
        get_method("snapkv").params_for_budget(cfg, 0.5, context_len=16, window=32)
    with pytest.raises(ValueError, match="no room for a recent window"):
        get_method("streamingllm").params_for_budget(cfg, 0.25, context_len=16, sink_tokens=4)
    with pytest.raises(ValueError, match="takes no parameters"):
        get_method("h2o").params_for_budget(cfg, 0.5, bogus=1)
    assert get_method("cla").params_for_budget(cfg, 0.5) == {"kv_sources": [0, 0], "num_key_value_heads": 4}
    with pytest.raises(ValueError, match="no CLA configuration"):
        get_method("cla").params_for_budget(cfg, 0.35)


def test_mixsga_ratios_per_budget():
    cfg = tiny_config("llama")
    mix = get_method("mixsga")
    expected = {0.25: [0, 0, 1], 0.35: [1, 1, 8], 0.5: [3, 1, 6], 0.75: [1, 1, 0]}
    for budget, ratios in expected.items():
        assert mix.params_for_budget(cfg, budget)["ratios"] == ratios
    assert mix.params_for_budget(cfg, 0.5, ratios=[1, 1, 2])["ratios"] == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="not the budget"):
        mix.params_for_budget(cfg, 0.5, ratios=[1, 1, 0])
    with pytest.raises(ValueError, match="no default mixSGA ratio"):
        mix.params_for_budget(cfg, 0.4)
    # 4 K/V heads cannot be pooled in groups of 8
    with pytest.raises(ValueError, match="do not divide"):
        mix.params_for_budget(cfg, 0.5, ratios=[3, 0, 4], group_sizes=[1, 2, 8])


def test_stacked_budget_is_the_total():
    cfg = tiny_config("llama")
    stacked = get_method("h2o+gqa")
    params = stacked.params_for_budget(cfg, 0.2)  # keep 40 % on a 50 % GQA model (Table 3)
    assert params["eviction"]["keep"] == pytest.approx(0.4)
    assert params["inner"] == {"num_key_value_heads": 2}
    full = full_kv_bytes_per_token(cfg)
    assert stacked.analytic_bytes_per_token(cfg, params) == pytest.approx(0.2 * full)
    with pytest.raises(ValueError, match="exceeds the inner gqa budget"):
        stacked.params_for_budget(cfg, 0.6)


@pytest.mark.parametrize("family", ("llama", "tinyllama", "opt", "gemma2"))
@pytest.mark.parametrize("name,budget", [("base", 1.0), ("gqa", 0.5), ("mqa", 0.25), ("cla", 0.5), ("mixsga", 0.5)])
def test_architectural_live_bytes_equal_analytic(family, name, budget):
    overrides = {"sliding_window": 64} if family == "gemma2" else {}
    if name == "mqa" and family == "opt":
        budget = 0.25  # the tiny OPT has 4 heads as well
    model = tiny_model(family, **overrides)
    config = copy.deepcopy(model.config)
    method = get_method(name)
    params = method.params_for_budget(config, budget)
    model = method.apply(model, params)
    ids = _ids()
    with torch.no_grad():
        out = model(ids, use_cache=True, past_key_values=method.new_cache(model, params))
    analytic = method.analytic_bytes_per_token(config, params, torch.float32)
    assert method.live_bytes(out.past_key_values) == analytic * ids.numel()
    if name != "mixsga":  # mixSGA adds its per-token expert index on top of the K/V
        assert realized_budget(method, config, out.past_key_values, ids.shape[1],
                               samples=ids.shape[0]) == pytest.approx(budget)


@pytest.mark.parametrize("name", ("gqa", "cla", "mixsga", "h2o", "streamingllm", "snapkv", "tova"))
def test_full_budget_reproduces_base(name):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids = _ids(length=12)
    ref = model(ids).logits
    method = get_method(name)
    params = method.params_for_budget(model.config, 1.0, **({"window": 4} if name == "snapkv" else {}))
    model = method.apply(model, params)
    cache = method.new_cache(model, params)
    assert torch.allclose(model(ids, past_key_values=cache, use_cache=True).logits, ref, atol=1e-5)


@pytest.mark.parametrize("name", ("h2o", "tova", "h2o+gqa"))
def test_eviction_live_bytes_within_analytic_budget(name):
    model = tiny_model("llama")
    config = copy.deepcopy(model.config)
    method = get_method(name)
    params = method.params_for_budget(config, 0.25)
    model = method.apply(model, params)
    ids = _ids(length=16)
    cache = method.new_cache(model, params)
    with torch.no_grad():
        forward_in_chunks(model, ids, cache, chunk_size=4)
    analytic = method.analytic_bytes_per_token(config, params) * ids.numel()
    assert 0 < method.live_bytes(cache) <= analytic
    assert method.live_bytes(cache) == analytic  # 0.25 * 16 tokens is whole, so the bound is met exactly


def test_eviction_on_mixsga_makes_an_evicting_mixsga_cache():
    from mixsga.eviction import MixSGAEvictionCache

    method = get_method("h2o+mixsga")
    model = tiny_model("llama")
    config = copy.deepcopy(model.config)
    params = method.params_for_budget(config, 0.25)
    assert params["inner"]["ratios"] == [3, 1, 6] and params["eviction"]["keep"] == pytest.approx(0.5)
    assert method.analytic_bytes_per_token(config, params) == pytest.approx(
        0.5 * get_method("mixsga").analytic_bytes_per_token(config, params["inner"]))
    model = method.apply(model, params)
    cache = method.new_cache(model, params)
    assert isinstance(cache, MixSGAEvictionCache) and cache.rotate is None
    ids = _ids(length=20)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert 0 < method.live_bytes(cache) <= method.analytic_bytes_per_token(config, params) * ids.numel() + ids.numel()
    streaming = get_method("streamingllm+mixsga")
    sparams = streaming.params_for_budget(config, 0.25)
    assert streaming.new_cache(model, sparams).rotate is not None  # RoPE: kept keys are repositioned


def test_mixsga_ablation_knobs_pass_through_params():
    cfg = tiny_config("llama")
    mix = get_method("mixsga")
    default = mix.params_for_budget(cfg, 0.5)
    assert default == {"ratios": [3, 1, 6], "group_sizes": [1, 2, 4], "aux_loss_weight": 0.1,
                       "aux_loss": "sigmoid", "router": "learned", "router_grad": "none", "seed": 0}
    assert mix.spec.fields(default)["variant"] == "learned router"
    lm_trained = mix.params_for_budget(cfg, 0.5, ratios=[3, 1, 6], router_grad="straight_through")
    assert lm_trained["router_grad"] == "straight_through"
    assert mix.spec.fields(lm_trained)["variant"] == "LM-trained router"
    assert mix.apply(tiny_model("llama"), lm_trained).mixsga_runtime.config.router_grad == "straight_through"
    with pytest.raises(ValueError, match="router_grad must be one of"):
        mix.params_for_budget(cfg, 0.5, router_grad="gumbel")
    params = mix.params_for_budget(cfg, 0.5, router="random", aux_loss_weight=0.0, aux_loss="softmax", seed=3)
    model = mix.apply(tiny_model("llama"), params)
    runtime = model.mixsga_runtime.config
    assert (runtime.router, runtime.aux_loss_weight, runtime.aux_loss, runtime.seed) == ("random", 0.0, "softmax", 3)
    # params written before the knobs existed still apply, with the defaults
    legacy = mix.apply(tiny_model("llama"), {"ratios": [3, 1, 6], "group_sizes": [1, 2, 4]})
    assert legacy.mixsga_runtime.config.router == "learned"
    with pytest.raises(ValueError, match="router must be one of"):
        mix.params_for_budget(cfg, 0.5, router="oracle")
    stacked = get_method("h2o+mixsga").params_for_budget(cfg, 0.25, inner={"aux_loss_weight": 0.0})
    assert stacked["inner"]["aux_loss_weight"] == 0.0

"""MixSGAConfig validation, conversion errors, routing rules and the budget ledger."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Gemma2Config, GPT2Config, GPT2LMHeadModel, LlamaConfig, OPTConfig

from mixsga import (
    MixSGACache,
    MixSGAConfig,
    convert_to_mixsga,
    full_kv_bytes_per_token,
    grouped_kv_bytes_per_token,
    kv_budget,
    mixsga_kv_bytes_for_counts,
    mixsga_kv_bytes_per_token,
)
from mixsga.budget import kv_shape
from mixsga.routing import argmax_route, expert_choice
from test_mixsga_models import VOCAB, tiny_model


def test_ratios_are_normalised_and_budget_follows():
    cfg = MixSGAConfig(ratios=(3, 1, 6), group_sizes=(1, 2, 4))
    assert cfg.ratios == pytest.approx((0.3, 0.1, 0.6))
    assert cfg.budget == 0.5 and kv_budget((3, 1, 6), (1, 2, 4)) == 0.5
    assert kv_budget((1, 1, 8)) == pytest.approx(0.35) and kv_budget((1, 1, 0)) == 0.75
    assert MixSGAConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.active == (True, True, True) and MixSGAConfig((0, 1, 0)).active == (False, True, False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratios": (1, 1)}, "one ratio per group size"),
        ({"ratios": (1, -1, 2)}, "non-negative"),
        ({"ratios": (0, 0, 0)}, "must not all be zero"),
        ({"ratios": (1, float("nan"), 1)}, "finite"),
        ({"group_sizes": (1, 4, 2)}, "strictly increasing"),
        ({"group_sizes": (0, 2, 4)}, "positive integers"),
        ({"group_sizes": (1, 2.5, 4)}, "positive integers"),
        ({"aux_loss": "mse"}, "aux_loss must be one of"),
        ({"router": "hash"}, "router must be one of"),
        ({"router_grad": "soft"}, "router_grad must be one of"),
        ({"router": "random", "router_grad": "straight_through"}, "has none"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixSGAConfig(**{"ratios": (3, 1, 6), **kwargs})


def test_group_sizes_must_divide_the_models_kv_heads():
    model = tiny_model("llama")  # 4 KV heads
    with pytest.raises(ValueError, match=r"do not divide the model's 4 KV heads"):
        convert_to_mixsga(model, MixSGAConfig((1, 1, 1), group_sizes=(1, 2, 8)))
    with pytest.raises(ValueError, match=r"do not divide the model's 4 KV heads"):
        convert_to_mixsga(model, MixSGAConfig((1, 1), group_sizes=(1, 3)))


def test_conversion_errors():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=50))
    with pytest.raises(ValueError, match="supports model types"):
        convert_to_mixsga(gpt2, MixSGAConfig())
    model = convert_to_mixsga(tiny_model("llama"), MixSGAConfig())
    with pytest.raises(ValueError, match="already converted"):
        convert_to_mixsga(model, MixSGAConfig())
    ids = torch.randint(3, VOCAB, (1, 5))
    full = DynamicCache()
    full.update(torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), 0)
    with pytest.raises(ValueError, match="non-empty DynamicCache"):
        model(input_ids=ids, past_key_values=full)
    with pytest.raises(ValueError, match="force_routing|expert_ids"):
        with model.mixsga_runtime.force_routing(torch.zeros(1, 1, 5, dtype=torch.long)):
            pass


def test_conversion_keeps_every_pretrained_weight_and_adds_he_routers():
    base = tiny_model("gemma2")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = convert_to_mixsga(base, MixSGAConfig(seed=1))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    routers = {k: v for k, v in after.items() if "mixsga_router" in k}
    assert len(routers) == 2 * model.config.num_hidden_layers
    for k, v in routers.items():
        if k.endswith("bias"):
            assert torch.equal(v, torch.zeros_like(v))
        else:
            assert v.shape == (3, model.config.hidden_size)
            assert v.std().item() == pytest.approx((2 / model.config.hidden_size) ** 0.5, rel=0.35)
    assert model.config._attn_implementation == "mixsga"
    assert model.config.mixsga["base_attn_implementation"] == "eager"  # soft-capping needs eager


def test_expert_choice_is_progressive_per_sequence_and_skips_padding():
    scores = torch.tensor(
        [[[0.9, 0.1, 0.0], [0.8, 0.9, 0.0], [0.1, 0.8, 0.0], [0.2, 0.7, 0.0], [0.3, 0.2, 0.0]]]
    ).repeat(2, 1, 1)
    real = torch.tensor([[True] * 5, [False, False, True, True, True]])
    got = expert_choice(scores, real, (0.4, 0.2, 0.4))
    # sample 0: n=5, expert 0 takes ceil(2)=2 -> tokens 0, 1; expert 1 takes ceil(1)=1 of the rest -> 2
    assert got[0].tolist() == [0, 0, 1, 2, 2]
    # sample 1: n=3 real tokens; expert 0 takes ceil(1.2)=2 -> 4, 3; expert 1 takes 1 -> 2
    assert got[1, 2:].tolist() == [1, 0, 0]
    # switched-off experts take nothing and are never an argmax choice
    assert set(expert_choice(scores, real, (0.0, 1.0, 0.0))[real].tolist()) == {1}
    assert argmax_route(torch.tensor([[[5.0, 1.0, 0.0]]]), (False, True, True)).item() == 1


def test_explicit_cache_instance_and_empty_dynamic_cache_are_accepted():
    model = convert_to_mixsga(tiny_model("opt"), MixSGAConfig())
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        assert isinstance(out.past_key_values, MixSGACache)
        cache = MixSGACache(model.config)
        model.generate(ids, max_new_tokens=3, past_key_values=cache, do_sample=False, pad_token_id=0)
    assert cache.num_tokens() == 7


# ---------------------------------------------------------------- the budget ledger (paper Table 9)
PAPER_CONFIGS = {
    "opt-125m": OPTConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, ffn_dim=3072),
    "llama3.2-1b": LlamaConfig(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=16, head_dim=64,
        intermediate_size=8192,
    ),
    "gemma2-2b": Gemma2Config(
        hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=26, head_dim=256,
        intermediate_size=9216,
    ),
}
TABLE9_GQA = {"opt-125m": 36_864, "llama3.2-1b": 32_768, "gemma2-2b": 106_496}
TABLE9_MIXSGA = {"opt-125m": 36_867, "llama3.2-1b": 32_772, "gemma2-2b": 106_502}


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_ledger_reproduces_table9_kv_sizes(name):
    config = PAPER_CONFIGS[name]
    full = full_kv_bytes_per_token(config, torch.float32)
    gqa = grouped_kv_bytes_per_token(config, kv_shape(config).num_kv_heads // 2)
    assert gqa == TABLE9_GQA[name] == full // 2
    assert mixsga_kv_bytes_per_token(config, (0, 1, 0), dtype="float32", index_bits=0) == TABLE9_GQA[name]
    packed = mixsga_kv_bytes_per_token(config, (3, 1, 6), dtype=torch.float32, index_bits=None)
    # a packed 2-bit index per layer: +3, +4, +6.5 bytes (the paper prints 6 for Gemma's 26 layers)
    assert packed == TABLE9_GQA[name] + config.num_hidden_layers * 2 / 8
    assert int(packed) == TABLE9_MIXSGA[name]
    cached = mixsga_kv_bytes_per_token(config, (3, 1, 6), dtype=torch.float32)
    assert cached == TABLE9_GQA[name] + config.num_hidden_layers  # our cache: one uint8 per token per layer


def test_ledger_for_counts_matches_per_token_figure_and_validates():
    config = PAPER_CONFIGS["llama3.2-1b"]
    counts = [[3, 1, 6]] * config.num_hidden_layers  # 10 tokens per layer at exactly 3:1:6
    assert mixsga_kv_bytes_for_counts(config, counts, (1, 2, 4), "bfloat16") == pytest.approx(
        10 * mixsga_kv_bytes_per_token(config, (3, 1, 6), (1, 2, 4), torch.bfloat16)
    )
    with pytest.raises(ValueError, match="need counts for 16 layers"):
        mixsga_kv_bytes_for_counts(config, counts[:3])
    with pytest.raises(ValueError, match="do not divide the model's 8 KV heads"):
        mixsga_kv_bytes_for_counts(config, counts, (1, 3, 4))

"""GQA / MQA by mean-pooling and CLA: exactness, bytes, reload, budget planning, errors."""

from __future__ import annotations

import pytest
import torch

from baselines import convert_to_gqa
from baselines.cla import CLAPlan, cla_kv_bytes_per_token, convert_to_cla, plan_cla
from baselines.checkpoint import load_converted
from baselines.gqa import regroup_heads
from baselines.testing import tiny_config, tiny_model
from kvledger import grouped_kv_bytes_per_token

FAMILIES = ("llama", "tinyllama", "opt", "gemma2")


def _ids(length: int = 10, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _kv_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def test_regroup_heads_mean_pools_contiguous_heads():
    weight = torch.arange(8.0).view(4, 2, 1)  # 4 heads of dim 2, one input feature
    pooled = regroup_heads(weight.view(8, 1), old=4, new=2, head_dim=2).view(2, 2)
    assert torch.equal(pooled, torch.tensor([[1.0, 2.0], [5.0, 6.0]]))  # mean of heads (0,1) and (2,3)
    assert torch.equal(regroup_heads(pooled.view(4, 1), 2, 4, 2).view(4, 2)[1], pooled[0])  # repeat


@pytest.mark.parametrize("family", FAMILIES)
def test_gqa_identity_expand_pool_back_and_budget(family, tmp_path):
    # Gemma 2's sliding layers store only window - 1 tokens; a wide window keeps byte counts simple.
    model = tiny_model(family, **({"sliding_window": 32} if family == "gemma2" else {}))
    model.set_attn_implementation("eager")
    ids = _ids()
    ref = model(ids).logits
    kv = model.config.num_attention_heads if family == "opt" else model.config.num_key_value_heads
    convert_to_gqa(model, kv)  # one head per group: the identity
    assert torch.equal(model(ids).logits, ref)
    convert_to_gqa(model, model.config.num_attention_heads)  # GQA -> MHA by repeating heads: same function
    assert torch.allclose(model(ids).logits, ref, atol=1e-5)
    convert_to_gqa(model, kv)  # and back by mean-pooling: lossless
    assert torch.allclose(model(ids).logits, ref, atol=1e-5)

    convert_to_gqa(model, 2)
    out = model(ids, use_cache=True)
    assert not torch.allclose(out.logits, ref, atol=1e-3)  # pooling really changed the K/V
    assert model.config.num_key_value_heads == 2
    base_cfg = tiny_config(family)  # the unconverted config
    # live bytes equal the analytic bytes of the base config at 2 K/V heads
    assert _kv_bytes(out.past_key_values) == grouped_kv_bytes_per_token(base_cfg, 2) * ids.numel()
    tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, 13)

    model.save_pretrained(tmp_path)
    reloaded = load_converted(tmp_path)
    reloaded.set_attn_implementation("eager")
    assert torch.allclose(reloaded(ids).logits, out.logits, atol=1e-6)


def test_mqa_on_tinyllama_shape():
    model = tiny_model("tinyllama")  # 32 query heads, 4 K/V heads
    convert_to_gqa(model, 1)
    out = model(_ids(), use_cache=True)
    assert out.past_key_values.layers[0].keys.shape[1] == 1
    assert model.model.layers[0].self_attn.num_key_value_groups == 32


def test_gqa_bad_head_counts_raise():
    model = tiny_model("llama")
    for bad in (0, 3, 2.5, -2):
        with pytest.raises(ValueError, match="num_key_value_heads"):
            convert_to_gqa(model, bad)
    with pytest.raises(ValueError, match="unsupported model_type"):
        from transformers import GPT2Config, GPT2LMHeadModel

        convert_to_gqa(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), 1)


def test_cla_plans():
    llama = tiny_config("llama", num_hidden_layers=4)
    assert plan_cla(llama, 0.5) == CLAPlan((0, 0, 2, 2), 4)  # the paper's pairs
    assert plan_cla(llama, 0.75) == CLAPlan((0, 0, 2, 3), 4)  # partial sharing
    assert plan_cla(llama, 0.25) == CLAPlan((0, 0, 2, 2), 2)  # pairs + halved K/V heads
    gemma = tiny_config("gemma2")  # sliding, global, sliding, global
    assert plan_cla(gemma, 0.5).kv_sources == (0, 1, 0, 1)  # same-type neighbours share
    with pytest.raises(ValueError, match=r"nearest feasible budgets: 25.00%, 37.50%"):
        plan_cla(llama, 0.35)
    with pytest.raises(ValueError, match="budget"):
        plan_cla(llama, 1.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cla_bytes_decode_consistency_and_reload(family, tmp_path):
    overrides = {"sliding_window": 32} if family == "gemma2" else {"num_hidden_layers": 4}
    model = tiny_model(family, **overrides)
    model.set_attn_implementation("eager")
    ids = _ids(length=9, batch=1)
    ref = model(ids).logits
    plan = plan_cla(model.config, 0.5)
    convert_to_cla(model, plan)
    full = model(ids, use_cache=True)
    assert not torch.allclose(full.logits, ref, atol=1e-3)
    assert _kv_bytes(full.past_key_values) == cla_kv_bytes_per_token(model.config, plan) * ids.numel()
    assert cla_kv_bytes_per_token(model.config, plan) * 2 == grouped_kv_bytes_per_token(
        model.config, plan.num_key_value_heads) * 1
    # prefill 6 tokens then decode 3 one by one through the cache == one full pass
    out = model(ids[:, :6], use_cache=True)
    steps = [out.logits]
    for t in range(6, 9):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full.logits, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = load_converted(tmp_path)
    reloaded.set_attn_implementation("eager")
    assert torch.allclose(reloaded(ids).logits, full.logits, atol=1e-6)


def test_cla_identity_sources_are_exact_and_bad_sources_raise():
    model = tiny_model("llama")
    ids = _ids()
    ref = model(ids).logits
    convert_to_cla(model, [0, 1])
    assert torch.equal(model(ids).logits, ref)
    fresh = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="earlier layers"):
        convert_to_cla(fresh, [0, 2, 2])
    with pytest.raises(ValueError, match="itself a consumer"):
        convert_to_cla(fresh, [0, 0, 1])
    with pytest.raises(ValueError, match="one entry per layer"):
        convert_to_cla(fresh, [0, 0])
    with pytest.raises(ValueError, match="cannot share"):
        convert_to_cla(tiny_model("gemma2"), [0, 0, 2, 3])

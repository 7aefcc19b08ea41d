"""KV-cache quantization (``kvquant``, ``kvquant+gqa``): accuracy, the bytes formula, and what it refuses.

The registry contract (``test_method_contract.py``) already runs both names; these tests pin
what is particular to quantization.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from baselines.quantized_cache import QuantizedKVCache, QuantizedKVLayer, quantized_kv_bytes
from baselines.testing import tiny_config, tiny_model
from harness.measurement.generation import generate_exactly
from harness.methods import get_method, get_spec
from harness.orchestration.config import ConfigError, validate_config
from test_cli import tiny_setup  # noqa: F401  (the fixture: a corpus, a tokenizer, random tiny models)


def _attention(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, dim=-1) @ v


def _attention_error(bits: int) -> float:
    """Relative error of attention over a 4-bit / 2-bit cache of 64 past tokens (random K/V, one query)."""
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 4, 64, 32, generator=gen), torch.randn(2, 4, 64, 32, generator=gen)
    q, k_new, v_new = (torch.randn(2, 4, 1, 32, generator=gen) for _ in range(3))
    layer = QuantizedKVLayer(bits, group_size=8, residual=0)
    layer.update(k, v)
    got_k, got_v = layer.update(k_new, v_new)  # the past comes back dequantized
    exact = _attention(q, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2))
    return float((_attention(q, got_k, got_v) - exact).norm() / exact.norm())


def test_dequantized_attention_is_close_to_full_precision_at_4_bits():
    four, two = _attention_error(4), _attention_error(2)
    assert 0 < four < 0.1  # quantization acts, and 4 bits keep attention close (6 % here)
    assert two > 3 * four  # fewer bits, larger error (42 % here)


def _decode_error(family: str, bits: int) -> float:
    """Logit error of 4 decode steps after a 20-token prefill through the quantized cache, relative to the
    full-precision cache's (centred) logits."""
    model = tiny_model(family, seed=0)
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    logits = []
    for cache in (DynamicCache(), QuantizedKVCache(model.config, bits, 8, 0)):
        with torch.no_grad():
            model(ids[:, :20], past_key_values=cache, use_cache=True)
            logits.append(torch.cat([model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
                                     for t in range(20, 24)], 1))
    full, got = logits
    return float((got - full).norm() / (full - full.mean(-1, keepdim=True)).norm())


def test_model_logits_through_the_4_bit_cache_stay_close():
    four, two = _decode_error("llama", 4), _decode_error("llama", 2)
    assert 0 < four < 0.15 < two  # 10 % and 33 % on the random tiny Llama


def test_sliding_window_layers_keep_every_token_correctly():
    """Gemma 2's sliding layers get full (quantized) layers: the mask, not the cache, bounds what they see."""
    from transformers.cache_utils import Cache, DynamicLayer

    model = tiny_model("gemma2", seed=0)  # alternating sliding-window (8) and full layers
    ids = torch.randint(3, 97, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, 20:]
        cache = Cache(layers=[DynamicLayer() for _ in range(model.config.num_hidden_layers)])
        model(ids[:, :20], past_key_values=cache, use_cache=True)
        got = torch.cat([model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
                         for t in range(20, 24)], 1)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-5)
    assert 0 < _decode_error("gemma2", 4) < _decode_error("gemma2", 2)


def test_bytes_formula_by_hand():
    # 2 layers, 4 heads x 8 channels, fp32, 4 bits, groups of 8, window 5, 23 tokens: 3 full, 20 quantized.
    # A quantized token per layer: 4 x 8 x 4 / 8 = 16 B of codes + 4 groups x (scale + zero-point) x 4 B = 32 B.
    per_layer = 20 * (16 + 32) + 3 * 4 * 8 * 4
    assert quantized_kv_bytes(layers=2, kv_heads=4, head_dim=8, float_bytes=4, bits=4, group_size=8, residual=5,
                              tokens=23) == 2 * 2 * per_layer


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("residual", [0, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_live_bytes_equal_the_formula_whichever_way_tokens_arrive(bits, residual, dtype):
    for chunks in ([23, 1, 1, 1], [1] * 26, [7, 19]):  # prefill + decode, token by token, two chunks
        layer = QuantizedKVLayer(bits, group_size=4, residual=residual)
        gen = torch.Generator().manual_seed(0)
        for n in chunks:
            k, v = (torch.randn(2, 4, n, 8, generator=gen).to(dtype) for _ in range(2))
            out_k, _ = layer.update(k, v)
        tokens = sum(chunks)
        assert out_k.shape[-2] == layer.get_seq_length() == tokens
        per_sample = quantized_kv_bytes(layers=1, kv_heads=4, head_dim=8, float_bytes=dtype.itemsize, bits=bits,
                                        group_size=4, residual=residual, tokens=tokens)
        assert layer.kv_bytes() == 2 * per_sample
        assert layer.keys.shape[-2] == (tokens % residual if residual else 0)


@pytest.mark.parametrize("residual", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_reads_every_block_dequantized_and_the_window_in_full_precision(residual, dtype):
    # what attention gets at every update, against the definition rebuilt from scratch: every quantized block
    # so far dequantized (blocks quantized at this update still read in full precision), then the
    # full-precision tokens; the cache keeps its dequantized past in reserved buffers, so pin it exactly
    for chunks in ([23, 1, 1, 1, 1], [1] * 40, [7, 19, 1, 33]):  # the buffers grow past their first size
        layer = QuantizedKVLayer(4, group_size=4, residual=residual)
        gen = torch.Generator().manual_seed(1)
        seen_k, seen_v = [], []
        for n in chunks:
            k, v = (torch.randn(2, 4, n, 8, generator=gen).to(dtype) for _ in range(2))
            before = list(layer.blocks)
            out_k, out_v = layer.update(k, v)
            seen_k.append(k)
            seen_v.append(v)
            quantized = sum(b[0].shape[-2] for b in before)
            want_k = torch.cat([layer._dequantize(b[0]) for b in before] + [torch.cat(seen_k, 2)[..., quantized:, :]], 2)
            want_v = torch.cat([layer._dequantize(b[1]) for b in before] + [torch.cat(seen_v, 2)[..., quantized:, :]], 2)
            assert torch.equal(out_k, want_k.to(dtype)) and torch.equal(out_v, want_v.to(dtype))
        layer.reset()
        assert layer._buf is None and layer._filled == 0 and layer._pending is None


@pytest.mark.parametrize("name", ["kvquant", "kvquant+gqa"])
def test_measured_equals_analytic_at_the_stated_context(name):
    """A run's measurement (prompt + generated tokens, as ``harness.orchestration.run.measure``) with a window."""
    prompt, new = 29, 6
    measured_tokens = prompt + new - 1  # the last generated token is returned, never stored
    model = tiny_model("llama", seed=0)
    config = copy.deepcopy(model.config)
    method = get_method(name)
    params = method.params_for_budget(config, get_spec(name).budgets(None, {}, 4)[0], residual=8,
                                      context=measured_tokens)
    model = method.apply(model, params).eval()
    cache = method.new_cache(model, params)
    generate_exactly(model, torch.randint(3, 97, (1, prompt)), new, cache=cache)
    analytic = method.analytic_bytes_per_token(config, params, torch.float32)
    assert method.live_bytes(cache) == analytic * measured_tokens
    # the window makes the per-token figure depend on the context it is stated at
    other = method.params_for_budget(config, get_spec(name).budgets(None, {}, 4)[0], residual=8, context=32)
    assert method.analytic_bytes_per_token(config, other, torch.float32) != analytic


def test_budget_and_resolved_params():
    config = tiny_config("llama")  # 4 K/V heads x 8 channels, 2 layers
    spec, method = get_spec("kvquant"), get_method("kvquant")
    assert spec.budgets(None, {"bits": 2}, 4) == [0.125] and spec.budgets(None, {}, 4) == [0.25]
    assert get_spec("kvquant+gqa").budgets(None, {"bits": 4}, 4) == [0.125]
    params = method.params_for_budget(config, 0.125, bits=2)
    assert params == {"quant": {"bits": 2, "group_size": 8, "residual": 0}}
    # fp32: 4 x 8 x 2 / 8 = 8 B of codes + 4 groups x 2 x 4 B = 40 B per layer and K or V, of 128 B
    assert method.analytic_bytes_per_token(config, params, torch.float32) == 2 * 2 * 40
    stacked = get_method("kvquant+gqa").params_for_budget(config, 0.125)
    assert stacked["inner"] == {"num_key_value_heads": 2} and stacked["quant"]["group_size"] == 8
    assert get_spec("kvquant+gqa").train_key(0.125, {}) == ("gqa", 0.5, {})
    assert spec.train_key(0.25, {"bits": 4}) == ("base", 1.0, {})


@pytest.mark.parametrize("bits", [3, 8, 1, True, "4", 4.0])
def test_bad_bits_are_refused_everywhere(bits):
    config = tiny_config("llama")
    for name in ("kvquant", "kvquant+gqa", "kvquant+mixsga"):
        with pytest.raises(ValueError, match="bits must be 2 or 4"):
            get_spec(name).parse_params({"bits": bits})
        with pytest.raises(ValueError, match="bits must be 2 or 4"):
            get_method(name).params_for_budget(config, 0.25, bits=bits)
        with pytest.raises(ConfigError, match="bits must be 2 or 4"):
            validate_config({"experiments": {"m": {"runs": [{"method": name, "params": {"bits": bits}}]}}})
    if not isinstance(bits, str):
        with pytest.raises(ValueError, match="bits must be one of"):
            QuantizedKVLayer(bits)


def test_other_bad_params_are_refused():
    config = tiny_config("llama")
    method = get_method("kvquant")
    with pytest.raises(ValueError, match="budget is derived from its bits"):
        method.params_for_budget(config, 0.5, bits=4)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        method.params_for_budget(config, 0.25, group_size=3)
    with pytest.raises(ValueError, match="choose a smaller group_size"):  # 2 heads x 1 group: no whole bytes
        get_method("kvquant+gqa").params_for_budget(config, 0.0625, bits=2, group_size=8)
    with pytest.raises(ValueError, match="give context"):
        method.params_for_budget(config, 0.25, residual=8)
    with pytest.raises(ValueError, match="without residual it is not taken"):
        method.params_for_budget(config, 0.25, context=40)
    with pytest.raises(ValueError, match="residual must be an integer"):
        method.params_for_budget(config, 0.25, residual=-1)
    with pytest.raises(ConfigError, match="budget is derived from its bits"):
        validate_config({"experiments": {"m": {"runs": [{"method": "kvquant", "budgets": [0.5]}]}}})


def test_no_compiled_kernel_is_needed(monkeypatch):
    """quanto's CPU unpack kernel compiles C++ at first use; the cache never asks for it."""
    from optimum.quanto.library.extensions import get_extension

    ext = get_extension("quanto_cpp")
    monkeypatch.setattr(type(ext), "lib", property(lambda self: pytest.fail("quanto's C++ kernel was asked for")))
    layer = QuantizedKVLayer(2, group_size=4, residual=3)
    for n in (5, 1, 1, 1):
        k = torch.randn(1, 4, n, 8)
        out_k, _ = layer.update(k, k)
    assert out_k.shape[-2] == 8 and len(layer.blocks) == 2


def test_a_run_records_measured_equal_to_analytic_bytes_and_scores_through_the_cache(tiny_setup, tmp_path):
    """The whole run pipeline on a random tiny Llama: 12-token prompt + 4 generated = 15 stored tokens."""
    from harness.orchestration.config import run_spec, run_table
    from harness.orchestration.run import execute_run

    raw = {key: copy.deepcopy(tiny_setup["cfg"][key]) for key in ("models", "eval", "training", "measure")}
    raw["experiments"] = {"main": {"training": "none", "runs": [
        {"method": "base"}, {"method": "kvquant", "params": {"bits": 2, "residual": 4, "context": 15}}]}}
    cfg = validate_config(raw)
    rows = [r for r in run_table(cfg) if r["model"] == "llama3"]
    records = [execute_run(run_spec(cfg, r["run_id"], rows), tmp_path / f"{r['run_id']}.json",
                           model_path=tiny_setup["model"], corpus_dir=tiny_setup["corpus"]) for r in rows]
    base, quant = records
    b = quant["budget"]
    assert b["measured_tokens"] == 15 and b["nominal"] == 0.125
    assert b["measured_bytes"] == b["analytic_bytes_per_token"] * 15  # 12 quantized + 3 in the window
    assert b["realized"] == b["measured_bytes"] / b["base_measured_bytes"] < 0.5
    q = quant["quality"]
    assert q["ppl_protocol"] == "bounded_cache" and q["zeroshot"] is None
    assert q["ppl_token"] != base["quality"]["ppl_token"]  # scored through the quantized cache
    assert quant["identity"]["method_fields"]["variant"] == "KV cache 2-bit"
    assert quant["identity"]["method_fields"]["eviction"] is None
    assert quant["flags"] == {"simulated": False, "query_aware": False}

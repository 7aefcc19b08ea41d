"""Tables 9 / 10 overheads: the paper's parameter and KV-byte figures, the difference explained, a timing smoke run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.measurement.overheads import (
    TABLE9_MODELS,
    build_method,
    kv_bytes,
    overheads,
    paper_config,
    parameter_breakdown,
    parameter_difference,
    time_decode,
)
from harness.models.zoo import build_config

# Table 9 of the paper (50 % KV budget, fp32).
TABLE9_KV = {"opt-125m": (36_864, 36_867), "llama3.2-1b": (32_768, 32_772), "gemma2-2b": (106_496, 106_502)}
TABLE9_PARAMS = {"opt-125m": ("118m", "125m"), "llama3.2-1b": ("1.22b", "1.24b"), "gemma2-2b": ("2.55b", "2.61b")}
# Parameter counts of the real hub checkpoints (tied embeddings counted once).
HUB_PARAMS = {"opt-125m": 125_239_296, "llama3.2-1b": 1_235_814_400, "gemma2-2b": 2_614_341_888}


def paper_style(n: int, unit: str) -> str:
    return f"{round(n / 1e6)}m" if unit.endswith("m") else f"{round(n / 1e9, 2):.2f}b"


class Vocab:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __len__(self) -> int:
        return 128


@pytest.mark.parametrize("name", TABLE9_MODELS)
def test_table9_kv_bytes_and_params(name):
    config = paper_config(name)
    gqa_kv, mix_kv_paper = TABLE9_KV[name]
    diff = parameter_difference(config)
    gqa = kv_bytes(config, "gqa", diff["gqa_params"])
    mix = kv_bytes(config, "mixsga", diff["mixsga_params"])
    assert gqa["kv_bytes_per_token"] == gqa_kv == gqa["kv_bytes_per_token_paper_index"]
    assert gqa["base_kv_bytes_per_token"] == 2 * gqa_kv
    layers = config.num_hidden_layers
    # The packed 2-bit index per layer (the paper prints Gemma's 6.5 B as +6) and our uint8 index.
    assert mix["kv_bytes_per_token_paper_index"] == gqa_kv + layers * 2 / 8
    assert math.floor(mix["kv_bytes_per_token_paper_index"]) == mix_kv_paper
    assert mix["kv_bytes_per_token"] == gqa_kv + layers
    # Parameters: the paper's rounded figures, and the base model is the real checkpoint's size.
    want_gqa, want_mix = TABLE9_PARAMS[name]
    assert paper_style(diff["gqa"], want_gqa) == want_gqa
    assert paper_style(diff["mixsga"], want_mix) == want_mix
    assert diff["mixsga"] - diff["routers"] == HUB_PARAMS[name]
    assert diff["explained"]
    assert diff["kept_kv_weights"] == diff["kept_kv_weights_closed_form"]
    assert diff["routers"] == diff["routers_closed_form"]


@pytest.mark.parametrize("family", ["llama3", "opt", "gemma2"])
def test_difference_is_kept_kv_weights_plus_routers(family):
    config = build_config(family, "tiny", Vocab(), num_hidden_layers=2)
    diff = parameter_difference(config)
    hidden, layers = config.hidden_size, 2
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    bias = 1 if family == "opt" else 0  # OPT's K/V projections have biases
    kept = layers * 2 * (heads // 2) * head_dim * (hidden + bias)
    routers = layers * (hidden * 3 + 3)
    assert diff["kept_kv_weights"] == kept and diff["routers"] == routers
    assert diff["difference"] == kept + routers and diff["explained"]
    # The same counts on real (allocated) models.
    for method in ("gqa", "mixsga"):
        model, _ = build_method(config, method, device="cpu")
        assert parameter_breakdown(model)["total"] == diff[method]
        assert all(p.device.type == "cpu" for p in model.parameters())
    meta, _ = build_method(config, "mixsga")
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_decode_timing_runs_and_is_positive():
    torch.manual_seed(0)
    config = build_config("llama3", "tiny", Vocab(), num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    built = {m: build_method(config, m, device="cpu") for m in ("gqa", "mixsga")}
    prompt = torch.randint(3, 128, (1, 6))
    got = time_decode(built, prompt, new_tokens=4, repeats=5)
    for method, res in got.items():
        tps = res["decode_tokens_per_s"]
        assert tps["n"] == 5 and all(tps[k] > 0 and math.isfinite(tps[k]) for k in ("mean", "p50", "p90", "min"))
        assert res["prefill_ms"]["p50"] > 0
    fractions = got["mixsga"]["decode_routing_fractions"]
    assert len(fractions) == 3 and sum(fractions) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="repeats"):
        time_decode(built, prompt, new_tokens=4, repeats=2)


def test_overheads_result_is_json_ready():
    out = overheads(zoo=None, families=("opt",), paper_models=("opt-125m",), prompt_tokens=4, new_tokens=3,
                    repeats=5)
    json.dumps(out, allow_nan=False)
    by = {(r["model"], r["method"]): r for r in out["rows"]}
    assert set(by) == {("opt-125m", "gqa"), ("opt-125m", "mixsga"), ("tiny:opt", "gqa"), ("tiny:opt", "mixsga")}
    assert by[("opt-125m", "gqa")]["kv_bytes_per_token"] == 36_864
    assert by[("opt-125m", "gqa")]["decode_tokens_per_s"] is None and by[("opt-125m", "gqa")]["device"] is None
    tiny = by[("tiny:opt", "mixsga")]
    assert tiny["decode_tokens_per_s"]["p50"] > 0 and tiny["device"].startswith("cpu")
    assert tiny["params"] > by[("tiny:opt", "gqa")]["params"]
    assert [c["model"] for c in out["throughput"]] == ["tiny:opt"] and out["throughput"][0]["mixsga_vs_gqa"] > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown paper model"):
        paper_config("gpt-9")
    with pytest.raises(ValueError, match="time_paper_models"):
        overheads(zoo=None, families=(), paper_models=("opt-125m",), time_paper_models=("gemma2-2b",))
    with pytest.raises(ValueError, match="dtype"):
        overheads(zoo=None, families=(), paper_models=(), dtype="float7")
    with pytest.raises(ValueError, match="unknown family"):
        overheads(zoo=None, families=("gpt2",), paper_models=())

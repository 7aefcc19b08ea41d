"""Trained Gemma 2 checkpoints load with plain transformers as the suite runs them (issue 13, Gemma 2 part).

Soft-capping of the attention logits exists only in Gemma 2's eager attention; transformers'
default, sdpa, silently skips it. ``save_converted`` (what ``execute_train`` and pretraining save
through) records the kernel in ``config.json``, so a plain ``AutoModelForCausalLM.from_pretrained(dir)``
gives the same logits as the suite's loader (``Method.load_trained``, which runs Gemma 2 on eager's
fused equivalent, :mod:`hfconvert.softcap_attention`), for the plain checkpoints (base, GQA / MQA:
native Gemma 2) and the converted ones (CLA, mixSGA). Plain transformers runs its own eager function,
so its logits equal the suite's to fp32 rounding; the suite's own loader gives them exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from harness.methods import get_method
from harness.models.zoo import build_config
from hfconvert.softcap_attention import ATTN_NAME as SOFTCAP_FUSED

TEXTS = [f"gemma two checkpoint {i}: {'soft cap ' * (i % 4)} then {i * 3} words\n" for i in range(40)]
# method -> budget on the tiny Gemma 2 (4 K/V heads, 4 layers)
CASES = {"base": 1.0, "gqa": 0.5, "mqa": 0.25, "cla": 0.5, "mixsga": 0.5}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TEXTS)


def _trained(method_name: str, tok, seed: int = 0):
    """A tiny zoo Gemma 2 (fused eager, as the zoo builds it) converted by the method and perturbed as training would."""
    config = build_config("gemma2", "tiny", tok, num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                          max_position_embeddings=128, sliding_window=8)
    assert config._attn_implementation == SOFTCAP_FUSED
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    method = get_method(method_name)
    params = method.params_for_budget(config, CASES[method_name])
    model = method.convert(model, params).eval()
    with torch.no_grad():
        noise = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.02  # peaked attention
            p.add_(scale * torch.randn(p.shape, generator=noise))
    return model, method, params


@pytest.mark.parametrize("method_name", sorted(CASES))
def test_plain_from_pretrained_gives_the_suites_logits(method_name, tok, tmp_path):
    from hfconvert import save_converted

    model, method, params = _trained(method_name, tok)
    save_converted(model, tmp_path, tok)
    saved = json.loads((tmp_path / "config.json").read_text())
    if method_name == "mixsga":  # mixSGA records its base kernel beside its routing config
        assert saved["mixsga"]["base_attn_implementation"] == "eager"
    else:
        assert saved["attn_implementation"] == "eager"
    ids = torch.randint(3, len(tok), (2, 24), generator=torch.Generator().manual_seed(2))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no kwargs, the packages imported
    suite, _ = method.load_trained(tmp_path, params, dtype=torch.float32, device="cpu")
    assert type(plain) is type(model) and type(suite) is type(model)
    assert plain.config._attn_implementation == ("mixsga" if method_name == "mixsga" else "eager")
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(suite(input_ids=ids).logits, want, atol=0, rtol=0)
        if method_name != "mixsga":  # the kernel matters: sdpa (no soft-capping) gives other logits
            sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
            assert (sdpa(input_ids=ids).logits - want).abs().max() > 1e-3


def test_resaving_a_reloaded_plain_checkpoint_keeps_the_kernel(tok, tmp_path):
    """transformers drops the key on its own save; saving through the suite again writes it again."""
    from hfconvert import save_converted

    model, _, _ = _trained("gqa", tok)
    save_converted(model, tmp_path / "a", tok)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    save_converted(again, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["attn_implementation"] == "eager"

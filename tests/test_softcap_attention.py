"""The fused soft-capped kernel computes transformers' Gemma 2 eager attention, forward and backward.

Compared against ``transformers.models.gemma2.modeling_gemma2.eager_attention_forward`` itself:
full-sequence (banded) and unbanded paths, sliding and global layers, GQA / MHA, left padding
from transformers' own mask functions, a cache prefix (``q_len < k_len``), a mask the band
does not cover; a whole Gemma 2's loss and parameter gradients; and the eager fallback.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.gemma2 import modeling_gemma2

from hfconvert import recorded_attention
from hfconvert.softcap_attention import ATTN_NAME, BLOCK, _blocks, softcap_attention_forward

SCALING, CAP = 48**-0.5, 50.0
MIN = torch.finfo(torch.float32).min


def _module(heads: int, kv_heads: int, window: int | None, training: bool = False) -> SimpleNamespace:
    """What either function reads from the attention module."""
    return SimpleNamespace(num_key_value_groups=heads // kv_heads, training=training, head_dim=48,
                           sliding_window=window)


def _causal(batch: int, q: int, k: int, window: int | None) -> torch.Tensor:
    """An additive causal (sliding) mask, queries at the last ``q`` of ``k`` positions."""
    qi = torch.arange(q)[:, None] + (k - q)
    ki = torch.arange(k)[None]
    ok = ki <= qi
    if window:
        ok &= ki > qi - window
    return torch.zeros(batch, 1, q, k).masked_fill(~ok, MIN)


def _inputs(batch: int, heads: int, kv_heads: int, q: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # scaled so the soft-cap bites (|scores| reach the cap) and the softmax is peaked
    query = 6 * torch.randn(batch, heads, q, 48, generator=gen)
    key = 6 * torch.randn(batch, kv_heads, k, 48, generator=gen)
    value = torch.randn(batch, kv_heads, k, 48, generator=gen)
    grad = torch.randn(batch, q, heads, 48, generator=gen)
    return query, key, value, grad


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within fp32 rounding, relative to the tensor's scale."""
    torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)


def _compare(module, query, key, value, grad, mask, window) -> None:
    results = []
    for fn in (modeling_gemma2.eager_attention_forward, softcap_attention_forward):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=SCALING, softcap=CAP, sliding_window=window)
        (out * grad).sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    (out, *grads), (want, *want_grads) = results[1], results[0]
    assert out.shape == want.shape == grad.shape
    _close(out, want)
    for g, w in zip(grads, want_grads):
        _close(g, w)


@pytest.mark.parametrize("window", [None, 64], ids=["global", "sliding"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 4), (8, 2), (4, 4)])
def test_full_sequence_band_equals_eager(window, heads, kv_heads):
    length = 2 * BLOCK + 44  # three query blocks, the last one short
    mask = _causal(1, length, length, window)
    assert _blocks(mask, length, length, window) is not None  # the banded path runs
    _compare(_module(heads, kv_heads, window), *_inputs(1, heads, kv_heads, length, length), mask, window)


@pytest.mark.parametrize("window", [None, 64], ids=["global", "sliding"])
def test_left_padded_batch_with_transformers_masks_equals_eager(window):
    length, pads = BLOCK + 72, (0, 37)
    config = Gemma2Config(sliding_window=window or 4096, attn_implementation=ATTN_NAME, num_hidden_layers=2)
    padding = torch.ones(2, length, dtype=torch.long)
    padding[1, : pads[1]] = 0
    maker = create_sliding_window_causal_mask if window else create_causal_mask
    mask = maker(config=config, inputs_embeds=torch.zeros(2, length, 8), attention_mask=padding,
                 past_key_values=None, position_ids=torch.arange(length).expand(2, -1))
    assert mask.dtype == torch.float32 and mask.shape == (2, 1, length, length)
    assert bool((mask[1, 0, 0] <= MIN / 2).all())  # a padded query row sees no key: the unbanded path
    assert _blocks(mask, length, length, window) is None
    _compare(_module(8, 4, window), *_inputs(2, 8, 4, length, length, seed=1), mask, window)


@pytest.mark.parametrize("window", [None, 16], ids=["global", "sliding"])
def test_cache_prefix_equals_eager(window):
    """Chunked prefill / decode: queries are the last ``q`` of ``k`` positions."""
    for q_len, k_len in ((20, 50), (1, 33)):
        mask = _causal(2, q_len, k_len, window)
        _compare(_module(8, 4, window), *_inputs(2, 8, 4, q_len, k_len, seed=2), mask, window)


def test_mask_the_band_does_not_cover_is_used_whole():
    """A key left of the window left visible: the band would drop it, so the whole matrix is computed."""
    length, window = 2 * BLOCK, 16
    mask = _causal(1, length, length, window)
    mask[..., -1, 3] = 0.0
    assert _blocks(mask, length, length, window) is None
    _compare(_module(8, 4, window), *_inputs(1, 8, 4, length, length, seed=3), mask, window)


def test_no_mask_equals_eager():
    _compare(_module(8, 4, None), *_inputs(1, 8, 4, 30, 30, seed=4), None, None)


def _tiny_gemma(kernel: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
                          sliding_window=24, max_position_embeddings=512, attn_logit_softcapping=50.0,
                          final_logit_softcapping=30.0, attn_implementation=kernel, pad_token_id=0,
                          bos_token_id=2, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # peaked attention, so soft-capping matters
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model.train()


def test_gemma2_loss_and_parameter_gradients_equal_eager():
    ids = torch.randint(3, 97, (2, BLOCK + 40), generator=torch.Generator().manual_seed(5))
    models = {k: _tiny_gemma(k) for k in ("eager", ATTN_NAME)}
    losses = {}
    for kernel, model in models.items():
        losses[kernel] = model(input_ids=ids, labels=ids).loss
        losses[kernel].backward()
    torch.testing.assert_close(losses[ATTN_NAME], losses["eager"], atol=1e-5, rtol=1e-5)
    eager = dict(models["eager"].named_parameters())
    for name, p in models[ATTN_NAME].named_parameters():
        _close(p.grad, eager[name].grad)


def test_dropout_in_training_and_requested_weights_fall_back_to_eager(monkeypatch):
    calls = []
    original = modeling_gemma2.eager_attention_forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr("hfconvert.softcap_attention.gemma2_eager", spy)
    query, key, value, _ = _inputs(1, 8, 4, 12, 12)
    mask = _causal(1, 12, 12, None)
    out, weights = softcap_attention_forward(_module(8, 4, None), query, key, value, mask, dropout=0.0,
                                             scaling=SCALING, softcap=CAP)
    assert weights is None and not calls  # the fused path
    torch.manual_seed(7)
    out, weights = softcap_attention_forward(_module(8, 4, None, training=True), query, key, value, mask,
                                             dropout=0.3, scaling=SCALING, softcap=CAP)
    assert len(calls) == 1 and calls[0]["dropout"] == 0.3
    torch.manual_seed(7)
    want, want_weights = original(_module(8, 4, None, training=True), query, key, value, mask, dropout=0.3,
                                  scaling=SCALING, softcap=CAP)
    assert torch.equal(out, want) and torch.equal(weights, want_weights)
    _, weights = softcap_attention_forward(_module(8, 4, None), query, key, value, mask, dropout=0.0,
                                           scaling=SCALING, softcap=CAP, output_attentions=True)
    assert len(calls) == 2 and weights is not None and weights.shape == (1, 8, 12, 12)


def test_model_output_attentions_are_eagers_weights():
    model = _tiny_gemma(ATTN_NAME).eval()
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = model(input_ids=ids, output_attentions=True).attentions
        model.set_attn_implementation("eager")
        want = model(input_ids=ids, output_attentions=True).attentions
    assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_checkpoints_record_the_eager_function():
    assert recorded_attention(ATTN_NAME) == "eager"
    assert recorded_attention("sdpa") == "sdpa" and recorded_attention("mixsga") is None

"""mixSGA's preallocated cache and batched decode step; the Triton kernel against the torch path.

The kernel tests run Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before anything imports Triton) and skip, saying why, where Triton
is not installed.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mixsga import MixSGACache, load_mixsga, mixsga_kv_bytes_for_counts
from mixsga.cache import PAGE
from mixsga.kernels import decode_attention, resolve_backend, triton_available
from mixsga.kernels.torch_decode import decode_attention_biased
from tests.test_mixsga_models import VOCAB, _routing_of, _stepwise, converted, left_padded, record_routes  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs compiled on CUDA, interpreted on CPU
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton)")
# tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA, before triton is imported
needs_backend = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA and TRITON_INTERPRET is not 1: Triton cannot run the kernel here",
)


def _ragged_stores(batch: int, kv_heads: int, dim: int, group_sizes, max_len: int, seed: int):
    """Random expert stores with ragged fills (some samples empty in some experts, one empty everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len, (batch, len(group_sizes)), generator=gen)
    if batch > 1:
        lengths[0] = 0  # a padded sample with nothing stored
    if batch > 2:
        lengths[1, 0] = 0
    caps = [int(lengths[:, e].max()) + int(torch.randint(0, 5, (1,), generator=gen)) + 1 for e in range(len(group_sizes))]
    stores = [torch.randn(2, batch, kv_heads // g, c, dim, generator=gen) for g, c in zip(group_sizes, caps)]
    return lengths.to(DEVICE), [s.to(DEVICE) for s in stores]


@needs_triton
@needs_backend
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("heads", [(8, 4), (32, 4)])
def test_triton_kernel_matches_torch_on_ragged_routings(batch, softcap, window, heads):
    q_heads, kv_heads = heads
    group_sizes, dim = (1, 2, 4), 16
    for seed in range(2):
        lengths, stores = _ragged_stores(batch, kv_heads, dim, group_sizes, 40, seed)
        starts = None if window is None else (lengths - window).clamp_min(0)
        query = torch.randn(batch, q_heads, dim, generator=torch.Generator().manual_seed(100 + seed)).to(DEVICE)
        keys, values = [s[0] for s in stores], [s[1] for s in stores]
        ref = decode_attention(query, keys, values, lengths, starts, 0.25, softcap, "torch")
        got = decode_attention(query, keys, values, lengths, starts, 0.25, softcap, "triton")
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        if batch > 1:
            assert torch.all(got[0] == 0)  # nothing stored -> zeros, like the torch path


@needs_triton
@needs_backend
def test_triton_kernel_with_a_switched_off_expert():
    lengths, stores = _ragged_stores(3, 4, 8, (2, 4), 30, seed=7)  # experts of group sizes 2 and 4 only
    query = torch.randn(3, 8, 8).to(DEVICE)
    keys, values = [s[0] for s in stores], [s[1] for s in stores]
    ref = decode_attention(query, keys, values, lengths, None, 0.3, None, "torch")
    got = decode_attention(query, keys, values, lengths, None, 0.3, None, "triton")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_biased_hot_path_matches_the_length_masked_reference():
    batch, q_heads, kv_heads, dim, group_sizes = 4, 16, 4, 8, (1, 2, 4)
    lengths, stores = _ragged_stores(batch, kv_heads, dim, group_sizes, 25, seed=3)
    lengths, stores = lengths.cpu(), [s.cpu() for s in stores]  # this one compares two torch paths
    lengths[:, 2] = lengths[:, 2].clamp_min(1)  # the hot path needs a filled slot in every sample
    query = torch.randn(batch, q_heads, dim)
    keys_t, values, biases = [], [], []
    for s, e in zip(stores, range(3)):
        _, _, h, cap, _ = s.shape
        keys_t.append(s[0].reshape(batch * h, cap, dim).transpose(1, 2))
        values.append(s[1].reshape(batch * h, cap, dim))
        filled = torch.arange(cap)[None, :] < lengths[:, e : e + 1]
        bias = torch.where(filled, 0.0, float("-inf"))[:, None, :].expand(batch, h, cap)
        biases.append(bias.reshape(batch * h, 1, cap))
    for softcap in (None, 10.0):
        ref = decode_attention(query, [s[0] for s in stores], [s[1] for s in stores], lengths, None, 0.5, softcap)
        got = decode_attention_biased(query, keys_t, values, biases, 0.5, softcap)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="unknown decode backend"):
        resolve_backend("cuda-graphs", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("family", ["llama", "tinyllama", "opt", "gemma2"])
def test_long_batched_decode_across_capacity_growth_matches_full_forward(family):
    """Left-padded batch of 3, decoded past several capacity growths (PAGE-slot pages)."""
    _, model = converted(family, ratios=(3, 1, 6))
    length = 6 + PAGE + 20
    ids, mask = left_padded(batch=3, length=length, pad=(5, 0, 2), seed=13)
    step_logits, cache = _stepwise(model, ids, prompt_len=6, chunk=1, mask=mask)
    routing = _routing_of(cache, model, list(mask.bool()))
    pos_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), model.mixsga_runtime.force_routing(routing):
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(step_logits[real], full[real], atol=2e-5, rtol=1e-5)
    layer = cache.layers[0]
    assert all(buf.shape[3] % PAGE == 0 for buf in layer.buffers)
    # live bytes are what is filled (the ledger's figure); reserved bytes hold them and more
    counts = cache.expert_counts()
    assert cache.kv_bytes() == mixsga_kv_bytes_for_counts(model.config, counts, (1, 2, 4), torch.float32)
    assert cache.reserved_bytes() > cache.kv_bytes()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sampling_generate_equals_full_forward_under_its_routing(family):
    _, model = converted(family, ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=7, pad=(2, 0), seed=21)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=True,
                             top_k=0, temperature=1.0, pad_token_id=0, return_dict_in_generate=True,
                             output_logits=True)
    seq, cache = out.sequences, out.past_key_values
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], dim=1)
    # the last sampled token is never fed back: the cache covers seq[:, :-1]
    routing = _routing_of(cache, model, list(full_mask[:, :-1].bool()))
    pos_ids = (full_mask[:, :-1].cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), model.mixsga_runtime.force_routing(routing):
        full = model(input_ids=seq[:, :-1], attention_mask=full_mask[:, :-1], position_ids=pos_ids,
                     use_cache=False).logits
    got = torch.stack(out.logits, dim=1)  # [B, 6, V]: the logits each sampled token was drawn from
    torch.testing.assert_close(got, full[:, -6:], atol=2e-5, rtol=1e-5)


def test_save_and_reload_decode_the_same(tmp_path):
    _, model = converted("tinyllama", ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=8, pad=(3, 0), seed=2)
    with torch.no_grad():
        before = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.save_pretrained(tmp_path)
    again = load_mixsga(str(tmp_path)).eval()
    with torch.no_grad():
        after = again.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)


@needs_triton
@needs_backend
def test_generate_with_the_triton_backend_equals_torch():
    """The whole decode path on the kernel (interpreted on CPU) gives the torch path's tokens and logits."""
    _, model = converted("llama", ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=8, pad=(3, 0), seed=4)
    outs = {}
    for backend in ("torch", "triton"):
        with torch.no_grad():
            outs[backend] = model.generate(
                ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                past_key_values=MixSGACache(model.config, decode_backend=backend), return_dict_in_generate=True,
                output_logits=True,
            )
    assert torch.equal(outs["torch"].sequences, outs["triton"].sequences)
    torch.testing.assert_close(torch.stack(outs["triton"].logits), torch.stack(outs["torch"].logits),
                               atol=1e-5, rtol=1e-5)


def test_decode_steps_read_no_expert_id_on_the_host(monkeypatch):
    """After prefill, decode steps never call ``.tolist()`` / ``.item()`` on routing or fill tensors.

    (On CUDA each would be a device sync; the host keeps only upper bounds of the fills,
    read back once per capacity growth.)
    """
    _, model = converted("llama", ratios=(3, 1, 6))
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    cache = MixSGACache(model.config)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    calls = []
    for name in ("tolist", "item", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    token = out.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        for _ in range(5):  # well inside the first page: no growth, so no read at all
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    monkeypatch.undo()
    assert calls == []
    assert cache.get_seq_length() == 15


@pytest.mark.slow
def test_compiled_backend_captures_the_decode_step_and_matches_eager():
    """``torch.compile(fullgraph=True)`` of the hot path (no graph break), equal to eager, through generate."""
    _, model = converted("llama", ratios=(3, 1, 6))
    ids, mask = left_padded(batch=2, length=8, pad=(3, 0), seed=6)
    outs = {}
    for backend in ("torch", "compiled"):
        with torch.no_grad():
            outs[backend] = model.generate(
                ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                past_key_values=MixSGACache(model.config, decode_backend=backend), return_dict_in_generate=True,
                output_logits=True,
            )
    assert torch.equal(outs["torch"].sequences, outs["compiled"].sequences)
    torch.testing.assert_close(torch.stack(outs["compiled"].logits), torch.stack(outs["torch"].logits),
                               atol=1e-5, rtol=1e-5)


def _decode_greedy(model, ids, steps, fast: bool, monkeypatch, repeat_at: int | None = None):
    """Prefill ``ids``, then ``steps`` greedy decode steps; logits per step and the cache.

    ``fast`` toggles ``MixSGALayer.host_fast_path``; ``repeat_at`` repeats the cache to batch 2
    (``batch_repeat_interleave``) before that step, so the batched step continues the fast path's stores.
    """
    from mixsga.cache import MixSGALayer

    monkeypatch.setattr(MixSGALayer, "host_fast_path", fast)
    cache = MixSGACache(model.config)
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(steps):
            if step == repeat_at:
                cache.batch_repeat_interleave(2)
                token = token.repeat(2, 1)
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:1, -1])
            token = out.logits[:, -1:].argmax(-1)
    monkeypatch.undo()
    return torch.cat(logits), cache


@pytest.mark.parametrize("family", ["llama", "tinyllama", "opt", "gemma2"])
def test_cpu_batch1_fast_path_equals_the_batched_step(family, monkeypatch):
    """The host fast path (batch 1, CPU) leaves the same stores, masks, fills and index as the batched step.

    Decoded past a capacity growth (and, for Gemma 2, with its sliding windows trimming every
    step), then repeated to batch 2, where the batched step takes over from the fast path's stores.
    """
    _, model = converted(family, ratios=(3, 1, 6))
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    steps = PAGE + 12
    runs = {fast: _decode_greedy(model, ids, steps, fast, monkeypatch, repeat_at=steps - 4) for fast in (True, False)}
    (fast_logits, fast_cache), (ref_logits, ref_cache) = runs[True], runs[False]
    torch.testing.assert_close(fast_logits, ref_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(fast_cache.layers, ref_cache.layers):
        assert torch.equal(a.counts, b.counts) and torch.equal(a.ntok, b.ntok)
        for sample in range(2):
            assert torch.equal(a.index[sample], b.index[sample])
        for e, (sa, sb) in enumerate(zip(a.stores, b.stores)):
            for x, y in zip(sa, sb):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
        for e in a.experts:  # the slot masks: 0 exactly on the filled slots
            cap = a.biases[e].shape[2]
            filled = torch.arange(cap)[None, None, :] < a.counts[:, e, None, None]
            assert torch.equal(a.biases[e], torch.where(filled, 0.0, float("-inf")).expand_as(a.biases[e]))
    assert fast_cache.kv_bytes() == ref_cache.kv_bytes()


def test_cpu_batch1_fast_path_after_eviction_and_crop(monkeypatch):
    """Host fills are dropped by keep_tokens / crop: decoding on continues from the true fills."""
    _, model = converted("llama", ratios=(3, 1, 6))
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(8))
    outs = {}
    for fast in (True, False):
        from mixsga.cache import MixSGALayer

        monkeypatch.setattr(MixSGALayer, "host_fast_path", fast)
        cache = MixSGACache(model.config)
        got = []
        with torch.no_grad():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            for step in range(6):
                if step == 2:
                    keep = torch.ones(cache.num_tokens(), dtype=torch.bool)
                    keep[1:4] = False
                    cache.keep_tokens(keep)
                if step == 4:
                    cache.crop(-1)
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                got.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        monkeypatch.undo()
        outs[fast] = (torch.cat(got), cache.expert_counts())
    torch.testing.assert_close(outs[True][0], outs[False][0], atol=2e-5, rtol=1e-5)
    assert outs[True][1] == outs[False][1]


def test_cpu_batch1_fast_path_survives_an_append_that_does_not_know_it(monkeypatch):
    """Host fills are tied to ``seen``: an append by other code (a subclass's) retires them.

    Every other decode step goes through a batched append that leaves the fast path's host copies
    in place; Gemma 2's windows then trim from the host index, which must be re-read, not reused.
    """
    from mixsga.cache import MixSGALayer

    _, model = converted("gemma2", ratios=(3, 1, 6))
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(9))
    ref_logits, ref_cache = _decode_greedy(model, ids, 12, False, monkeypatch)
    original = MixSGALayer._append_step

    def foreign(self, k, v, expert, real):
        if self.seen % 2:
            return original(self, k, v, expert, real)
        kept, self.host_fast_path = self._exact, False
        try:
            original(self, k, v, expert, real)
        finally:
            self.host_fast_path = True
            del self.host_fast_path  # back to the class attribute
        self._exact = kept  # as code that does not know the host copies would leave them

    monkeypatch.setattr(MixSGALayer, "_append_step", foreign)
    cache = MixSGACache(model.config)
    got = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(12):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            got.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
    monkeypatch.undo()
    torch.testing.assert_close(torch.cat(got), ref_logits, atol=2e-5, rtol=1e-5)
    assert cache.expert_counts() == ref_cache.expert_counts()

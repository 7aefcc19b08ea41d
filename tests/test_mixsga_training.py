"""Training with the auxiliary loss, the ablation switches, and save / reload."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mixsga import MixSGACache, MixSGAConfig, convert_to_mixsga, load_mixsga, routing_stats
from test_mixsga_models import ATOL, FAMILIES, VOCAB, _routing_of, _stepwise, record_routes, tiny_model  # noqa: F401

RATIOS = (3, 1, 6)




def _batch(seed: int, batch: int = 4, length: int = 128) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _train(model, steps: int, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        ids = _batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _held_out_stats(model) -> dict:
    model.mixsga_runtime.reset_stats()
    with torch.no_grad():
        model(input_ids=_batch(999))
    return routing_stats(model)


@pytest.mark.parametrize("aux_loss", ["sigmoid", "softmax"])
def test_aux_loss_lifts_agreement_and_keeps_prefill_ratios(aux_loss):
    torch.manual_seed(0)
    model = convert_to_mixsga(tiny_model("llama"), MixSGAConfig(RATIOS, aux_loss=aux_loss, aux_loss_weight=0.1))
    before = _held_out_stats(model)["agreement"]
    _train(model, steps=40)
    stats = _held_out_stats(model)
    assert stats["agreement"] > 0.9, (before, stats["agreement"])
    assert stats["agreement"] > before + 0.1
    # expert-choice keeps the ratios up to the ceilings: ceil(.3*128)=39, ceil(.1*128)=13, rest 76
    assert stats["prefill_fractions"] == pytest.approx([39 / 128, 13 / 128, 76 / 128])
    # argmax at decode (teacher-forced through the cache) now lands near the ratios as well
    ids = _batch(5, batch=1, length=128)
    cache = MixSGACache(model.config)
    model.mixsga_runtime.reset_stats()
    with torch.no_grad():
        model(input_ids=ids[:, :16], past_key_values=cache, use_cache=True)
        for t in range(16, 128):
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    decode = routing_stats(model)["decode_fractions"]
    assert decode == pytest.approx([0.3, 0.1, 0.6], abs=0.1)


def test_without_aux_loss_agreement_stays_low_and_loss_is_lm_only():
    torch.manual_seed(0)
    model = convert_to_mixsga(tiny_model("llama"), MixSGAConfig(RATIOS, aux_loss_weight=0.0))
    ids = _batch(1)
    out = model(input_ids=ids, labels=ids)
    logits = out.logits
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm)
    assert model.mixsga_runtime.last_aux_loss is not None  # still computed for logging
    _train(model, steps=30)
    assert _held_out_stats(model)["agreement"] < 0.8


def test_loss_includes_weighted_mean_aux_loss():
    torch.manual_seed(0)
    model = convert_to_mixsga(tiny_model("opt"), MixSGAConfig(RATIOS, aux_loss_weight=0.5))
    ids = _batch(2, length=16)
    out = model(input_ids=ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    aux = model.mixsga_runtime.last_aux_loss
    torch.testing.assert_close(out.loss, lm + 0.5 * aux)
    # the LM loss alone sends no gradient to the routers: masks are hard
    routers = [p for n, p in model.named_parameters() if "mixsga_router" in n]
    grads = torch.autograd.grad(lm, routers, allow_unused=True)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    grads = torch.autograd.grad(aux, routers)
    assert all(float(g.abs().max()) > 0 for g in grads)


def test_random_router_keeps_ratios_at_prefill_and_decode():
    model = convert_to_mixsga(tiny_model("gemma2"), MixSGAConfig(RATIOS, router="random", seed=3))
    ids = _batch(3, batch=2, length=40)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=0)
    stats = routing_stats(model)
    assert stats["prefill_fractions"] == pytest.approx([12 / 40, 4 / 40, 24 / 40])
    assert stats["decode_fractions"] == pytest.approx([0.3, 0.1, 0.6], abs=0.1)
    assert math.isnan(stats["agreement"])  # no learned argmax to compare
    # seeded: two fresh models with the same config route, and so generate, identically
    runs = []
    for _ in range(2):
        fresh = convert_to_mixsga(tiny_model("gemma2"), MixSGAConfig(RATIOS, router="random", seed=3))
        with torch.no_grad():
            fresh.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        runs.append((fresh.mixsga_runtime.stats.prefill, fresh.mixsga_runtime.stats.decode))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("family", ["tinyllama", "opt", "gemma2"])
def test_save_and_reload_give_identical_logits(family, tmp_path):
    torch.manual_seed(0)
    model = convert_to_mixsga(tiny_model(family), MixSGAConfig(RATIOS, aux_loss="softmax", seed=7))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        ids = _batch(step, batch=2, length=24)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load_mixsga(str(tmp_path))
    assert loaded.mixsga_runtime.config == model.mixsga_runtime.config
    ids = _batch(42, batch=2, length=20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        a = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_load_rejects_a_plain_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no mixSGA model"):
        load_mixsga(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# router_grad="straight_through": the LM loss trains the router, the forward pass is unchanged.

ST = "straight_through"


def _router_grads(model) -> list[torch.Tensor | None]:
    return [p.grad for n, p in model.named_parameters() if "mixsga_router" in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_straight_through_gate_lets_the_lm_loss_train_the_router(family):
    base = tiny_model(family)
    ids = _batch(11, batch=2, length=24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: padding keeps a constant gate and is not routed
    logits, grads = {}, {}
    for router_grad in ("none", ST):
        # aux weight 0: whatever reaches the router here comes from the LM loss alone
        model = convert_to_mixsga(copy.deepcopy(base), MixSGAConfig(RATIOS, aux_loss_weight=0.0,
                                                                    router_grad=router_grad))
        model.train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        logits[router_grad], grads[router_grad] = out.logits.detach(), _router_grads(model)
        grads[router_grad, "rest"] = {n: p.grad for n, p in model.named_parameters() if "mixsga_router" not in n}
        assert all(spec.gate is None for spec in _specs(model))  # no graph kept past the forward
        with torch.no_grad():  # inference: the gate is not even applied
            logits[router_grad, "eval"] = model.eval()(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(logits["none"], logits[ST])  # gate == 1 exactly: same bits, train and eval
    assert torch.equal(logits["none", "eval"], logits[ST, "eval"])
    assert len(grads["none"]) == 2 * base.config.num_hidden_layers
    assert all(g is None or float(g.abs().max()) == 0.0 for g in grads["none"])
    assert all(g is not None and float(g.abs().max()) > 0 for g in grads[ST])  # every layer's weight and bias
    # the gate's scores read the detached router input: every other weight's gradient is unchanged, bit for bit
    rest, rest_st = grads["none", "rest"], grads[ST, "rest"]
    assert rest.keys() == rest_st.keys() and all(torch.equal(rest[n], rest_st[n]) for n in rest)


def _specs(model):
    return [m.mixsga_spec for n, m in model.named_modules() if n.endswith("self_attn")]


def test_straight_through_gradient_is_the_derivative_of_scaling_a_tokens_kv():
    """dL/dg_t equals d/dε L(token t's K and V times 1 + ε) of the default model, and reaches the router
    as s(1 - s) · dL/dg_t on the token's own expert."""
    base = tiny_model("llama")
    layers = base.config.num_hidden_layers
    ids = _batch(12, batch=1, length=16)
    routing = torch.randint(0, 3, (layers, 1, 16), generator=torch.Generator().manual_seed(0))

    # reference: the default model with an explicit per-token scale on layer 0's K and V
    ref = convert_to_mixsga(copy.deepcopy(base), MixSGAConfig(RATIOS, aux_loss_weight=0.0)).train()
    eps = torch.zeros(16, requires_grad=True)
    attn = _attention_modules_of(ref)[0]
    for proj in (attn.k_proj, attn.v_proj):
        proj.register_forward_hook(lambda m, a, out: out * (1 + eps)[None, :, None])
    with ref.mixsga_runtime.force_routing(routing):
        ref(input_ids=ids, labels=ids).loss.backward()

    model = convert_to_mixsga(copy.deepcopy(base), MixSGAConfig(RATIOS, aux_loss_weight=0.0, router_grad=ST)).train()
    attn = _attention_modules_of(model)[0]
    seen = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("hidden", kw["hidden_states"]), with_kwargs=True)
    # runs after the conversion's gate hook, while the layer's gate is set
    attn.k_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("gate", attn.mixsga_spec.gate))
    with model.mixsga_runtime.force_routing(routing):
        loss = model(input_ids=ids, labels=ids).loss
        gate = seen["gate"]
        gate.retain_grad()
        loss.backward()
    assert torch.equal(gate.detach(), torch.ones_like(gate))
    assert float(eps.grad.abs().max()) > 0
    torch.testing.assert_close(gate.grad[0], eps.grad, rtol=1e-5, atol=1e-9)
    # chain rule into the router: only the token's own expert's score moves, by sigmoid'
    router = attn.mixsga_router
    with torch.no_grad():
        s = torch.sigmoid(torch.nn.functional.linear(seen["hidden"], router.weight, router.bias))[0]
        chosen = torch.nn.functional.one_hot(routing[0, 0], 3).to(s.dtype)
        want_bias = ((s * (1 - s)) * chosen * gate.grad[0, :, None]).sum(0)
    torch.testing.assert_close(router.bias.grad, want_bias, rtol=1e-5, atol=1e-9)
    assert float(want_bias.abs().max()) > 0


def _attention_modules_of(model):
    return [m for n, m in model.named_modules() if n.endswith("self_attn")]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_straight_through_router_decodes_exactly_as_the_default(family):
    base = tiny_model(family)
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(5))
    got = {}
    for router_grad in ("none", ST):
        model = convert_to_mixsga(copy.deepcopy(base), MixSGAConfig(RATIOS, router_grad=router_grad))
        step_logits, cache = _stepwise(model, ids, prompt_len=6)
        routing = _routing_of(cache, model, [torch.ones(14, dtype=torch.bool)])
        # incremental decode equals a full forward under the same routing, with autograd on
        # (the gate is then applied, and still changes nothing)
        with model.mixsga_runtime.force_routing(routing):
            full = model(input_ids=ids, use_cache=False).logits
        assert full.requires_grad
        torch.testing.assert_close(step_logits, full.detach(), atol=ATOL, rtol=1e-5)
        with torch.no_grad():
            gen = model.generate(ids[:, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
        got[router_grad] = (step_logits, cache.kv_bytes(), routing, gen)
    (la, ba, ra, ga), (lb, bb, rb, gb) = got["none"], got[ST]
    assert torch.equal(la, lb) and ba == bb and torch.equal(ra, rb) and torch.equal(ga, gb)


def test_straight_through_survives_save_and_reload(tmp_path):
    model = convert_to_mixsga(tiny_model("opt"), MixSGAConfig(RATIOS, aux_loss_weight=0.0, router_grad=ST))
    model.save_pretrained(tmp_path)
    loaded = load_mixsga(str(tmp_path))
    assert loaded.mixsga_runtime.config == model.mixsga_runtime.config
    assert loaded.mixsga_runtime.config.router_grad == ST
    ids = _batch(13, batch=2, length=16)
    loaded.train()
    loaded(input_ids=ids, labels=ids).loss.backward()
    assert all(g is not None and float(g.abs().max()) > 0 for g in _router_grads(loaded))

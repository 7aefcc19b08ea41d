"""``convert_to_mixsga``: turn a transformers Llama / OPT / Gemma 2 causal LM into mixSGA.

What conversion does, all through public extension points (module hooks, the
attention-function and mask registries, the ``Cache`` API):

* keeps every pretrained weight; adds ``self_attn.mixsga_router`` (one
  ``MixSGARouter`` per layer, He-initialised from ``MixSGAConfig.seed``);
* a forward pre-hook on each attention module routes the chunk from the hidden
  state the module receives (the normed input of its K/V projections):
  expert-choice when the layer's cache is empty or absent (training, prefill),
  argmax when it already holds tokens (decode);
* a forward pre-hook on the model reads the 2-D padding mask (padding is excluded
  from routing and never stored; a 4-D or missing mask means every token is real),
  and gives the model a ``MixSGACache`` whenever it would use a cache: none
  passed, or an empty ``Cache`` such as the ``DynamicCache`` ``generate()``
  creates. In training mode the default is no cache, as for training loops;
* a forward hook adds ``aux_loss_weight / L · Σ_l aux_l`` to ``out.loss`` when the
  model computed a loss;
* with ``router_grad="straight_through"`` only: forward hooks on each layer's
  ``k_proj`` / ``v_proj`` multiply every token's K and V by its straight-through
  gate (``routing.straight_through_gate``, exactly 1 forward) during full-sequence
  passes with autograd on, so the LM loss reaches the router; RoPE, pooling and
  broadcasting are linear per token, so scaling the projection equals scaling the
  routed K/V. The gate's scores come from the detached hidden state, so only the
  router's gradient changes. Inference (no grad, or decode) never applies it;
* ``config._attn_implementation = "mixsga"`` and ``config.mixsga`` (the config
  dict plus the base attention implementation) so that ``save_pretrained`` records
  it and ``load_mixsga`` can rebuild the model; the model is then marked as a
  ``mixsga_<family>`` checkpoint type (``mixsga.hf``).

Routing statistics and the last auxiliary loss live on ``model.mixsga_runtime``
(see ``MixSGARuntime``); ``routing_stats(model)`` is the short way to read them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from mixsga.attention import ATTN_NAME, BASE_IMPLEMENTATIONS, base_attention
from mixsga.cache import MixSGACache, MixSGALayer, Route
from mixsga.config import MixSGAConfig, coerce_config
from mixsga.routing import (
    MixSGARouter,
    RoutingStats,
    argmax_route,
    aux_loss,
    expert_choice,
    random_route,
    straight_through_gate,
)

SUPPORTED_MODEL_TYPES = ("llama", "opt", "gemma2")
ROUTER_NAME = "mixsga_router"


class MixSGARuntime:
    """Per-model mixSGA state: config, routing statistics, last auxiliary loss, overrides."""

    def __init__(self, config: MixSGAConfig, num_layers: int, forward: Callable) -> None:
        self.config = config
        self.num_layers = num_layers
        self.stats = RoutingStats(num_layers, config.num_experts)
        self.last_aux_loss: torch.Tensor | None = None  # mean over layers of this forward's aux loss
        self.forced: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self._params = [
            p.name for p in inspect.signature(forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        self._aux: list[torch.Tensor] = []
        self._real: torch.Tensor | None = None
        self._all_real = True

    def routing_stats(self) -> dict:
        """Per-expert fractions at prefill and decode, and argmax / expert-choice agreement."""
        return self.stats.summary()

    def reset_stats(self) -> None:
        self.stats.reset()

    @contextlib.contextmanager
    def force_routing(self, expert_ids: torch.Tensor) -> Iterator[None]:
        """Route by ``expert_ids`` ``[num_layers, B, T]`` (absolute positions) instead of the router.

        For tests and analysis: e.g. a full forward under the routing a cache realised.
        """
        if expert_ids.dim() != 3 or expert_ids.shape[0] != self.num_layers:
            raise ValueError(
                f"expert_ids must be [num_layers={self.num_layers}, batch, tokens], got {tuple(expert_ids.shape)}"
            )
        if int(expert_ids.min()) < 0 or int(expert_ids.max()) >= self.config.num_experts:
            raise ValueError(f"expert ids must lie in [0, {self.config.num_experts})")
        self.forced = expert_ids.long()
        try:
            yield
        finally:
            self.forced = None


@dataclass
class LayerSpec:
    """What one converted attention module needs at run time."""

    layer_idx: int
    group_sizes: tuple[int, ...]
    active: tuple[bool, ...]
    base_fn: Callable
    runtime: MixSGARuntime
    route: Route | None = field(default=None, repr=False)
    experts: tuple[int, ...] = field(init=False)  # the active experts' ids
    gate: torch.Tensor | None = field(default=None, repr=False)  # [B, L] straight-through K/V gate of this forward

    def __post_init__(self) -> None:
        self.experts = tuple(e for e, a in enumerate(self.active) if a)


def _attention_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    spec: LayerSpec = module.mixsga_spec
    rt, cfg = spec.runtime, spec.runtime.config
    spec.gate = None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache = kwargs.get("past_key_values")
    layer_cache: MixSGALayer | None = None
    if cache is not None:
        if not isinstance(cache, MixSGACache):
            raise ValueError(f"a mixSGA model needs a MixSGACache, got {type(cache).__name__}")
        layer_cache = cache.layers[spec.layer_idx]
    past = layer_cache.seen if layer_cache is not None else 0
    decode = past > 0
    batch, q = hidden.shape[:2]
    real = rt._real
    if real is not None and real.shape != (batch, q):
        raise ValueError(f"attention mask covers {tuple(real.shape)} tokens but the chunk is {(batch, q)}")
    single = decode and len(spec.experts) == 1 and rt.forced is None
    if cfg.router == "learned" and not single:
        router = module.mixsga_router
        logits = F.linear(hidden, router.weight, router.bias)  # the router module, minus nn.Module call overhead
    else:
        logits = None
    with torch.no_grad():
        if single:  # one active expert: argmax routing is constant, the router need not run
            expert = torch.full((batch, q), spec.experts[0], dtype=torch.long, device=hidden.device)
        elif rt.forced is not None:
            expert = rt.forced[spec.layer_idx, :, past : past + q].to(hidden.device)
            if expert.shape != (batch, q):
                raise ValueError(f"forced routing does not cover positions {past}..{past + q} of batch {batch}")
        elif cfg.router == "random":
            if decode:
                expert = random_route((batch, q), cfg.ratios, rt.generator, hidden.device)
            else:
                scores = torch.rand((batch, q, cfg.num_experts), generator=rt.generator).to(hidden.device)
                expert = expert_choice(scores, _real_or_all(real, batch, q, hidden.device), cfg.ratios)
        elif decode:  # (no detach op when no graph is recorded: inference mode, the decode hot path)
            expert = argmax_route(logits.detach() if logits.requires_grad else logits, cfg.active)
        else:
            # Ranking logits equals ranking sigmoid scores, minus sigmoid's ties at saturation.
            expert = expert_choice(logits.detach().float(), _real_or_all(real, batch, q, hidden.device), cfg.ratios)
    if decode:
        # Decode statistics are counted on the device (no host read of expert ids per step).
        rt.stats.add_decode_tensor(spec.layer_idx, expert, real)
    else:
        mask = _real_or_all(real, batch, q, hidden.device)
        learned = logits is not None and rt.forced is None
        argmax = argmax_route(logits.detach(), cfg.active) if learned else None
        rt.stats.add_expert_choice(spec.layer_idx, expert, argmax, mask)
        if learned:
            rt._aux.append(aux_loss(logits, expert, mask, cfg.aux_loss))
        if cfg.router_grad == "straight_through" and logits is not None and torch.is_grad_enabled():
            # From the detached hidden state: the gate's gradient reaches the router only, so every
            # other weight gets exactly the gradient it gets without the gate (the forward is the same).
            router = module.mixsga_router
            gate_logits = F.linear(hidden.detach(), router.weight, router.bias)
            if gate_logits.requires_grad:
                spec.gate = straight_through_gate(gate_logits, expert, real)
    route = Route(expert=expert, real=real, decode=decode, cache_layer=layer_cache)
    spec.route = route
    if layer_cache is not None:
        layer_cache.pending = route


def _attention_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """Drop the layer's straight-through gate once its K/V are projected (it holds the graph)."""
    module.mixsga_spec.gate = None
    return output


def _gate_hook(spec: "LayerSpec", proj: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """``k_proj`` / ``v_proj`` output ``[B, L, H·d]`` times the token's gate (exactly 1 forward)."""
    gate = spec.gate
    if gate is None:
        return output
    if gate.shape != output.shape[:2]:
        raise RuntimeError(f"gate {tuple(gate.shape)} does not match projection output {tuple(output.shape)}")
    return output * gate.unsqueeze(-1).to(output.dtype)


def _real_or_all(real: torch.Tensor | None, batch: int, q: int, device) -> torch.Tensor:
    return real if real is not None else torch.ones((batch, q), dtype=torch.bool, device=device)


def _model_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    rt: MixSGARuntime = model.mixsga_runtime
    if args:
        if len(args) > len(rt._params):
            raise TypeError(f"too many positional arguments for {type(model).__name__}.forward")
        kwargs = {**dict(zip(rt._params, args)), **kwargs}
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        raise ValueError("pass input_ids or inputs_embeds")
    batch, q = tokens.shape[0], tokens.shape[1]
    cache = kwargs.get("past_key_values")
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(model.config, "use_cache", True)) and not model.training
    if cache is None:
        if use_cache:
            kwargs["past_key_values"] = MixSGACache(model.config, rt.config)
        else:
            kwargs["use_cache"] = False
    elif not isinstance(cache, MixSGACache):
        if isinstance(cache, Cache) and cache.get_seq_length() == 0:
            kwargs["past_key_values"] = MixSGACache(model.config, rt.config)
        else:
            raise ValueError(
                f"a mixSGA model keeps its K/V in a MixSGACache; got a non-empty {type(cache).__name__}"
            )
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        if mask.shape[0] != batch or mask.shape[1] < q:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not cover a chunk of {(batch, q)}")
        rt._real = mask[:, -q:].to(device=tokens.device, dtype=torch.bool)
        rt._all_real = bool(rt._real.all())
        if rt._all_real:
            rt._real = None
    else:
        rt._real, rt._all_real = None, True
    rt._aux = []
    return (), kwargs


def _model_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    rt: MixSGARuntime = model.mixsga_runtime
    aux, rt._aux = rt._aux, []
    rt._real, rt._all_real = None, True
    if not aux:
        return output
    mean = torch.stack(aux).mean()  # (1 / L) Σ_l aux_l
    rt.last_aux_loss = mean
    weight = rt.config.aux_loss_weight
    if weight <= 0:
        return output
    if isinstance(output, tuple):
        if kwargs.get("labels") is not None:
            output = (output[0] + weight * mean.to(output[0].dtype),) + tuple(output[1:])
        return output
    if getattr(output, "loss", None) is not None:
        output.loss = output.loss + weight * mean.to(output.loss.dtype)
    return output


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    for m in mods:
        for attr in ("k_proj", "v_proj", "q_proj", "layer_idx"):
            if not hasattr(m, attr):
                raise ValueError(f"{type(m).__name__} has no `{attr}`; not a supported attention module")
    return mods


def _he_init(router: MixSGARouter, generator: torch.Generator) -> None:
    fan_in = router.weight.shape[1]
    weight = torch.randn(router.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
    with torch.no_grad():
        router.weight.copy_(weight.to(router.weight.dtype))
        router.bias.zero_()


def convert_to_mixsga(model: nn.Module, config: MixSGAConfig | dict | tuple) -> nn.Module:
    """Convert a transformers Llama / OPT / Gemma 2 causal LM in place and return it."""
    cfg = coerce_config(config)
    if hasattr(model, "mixsga_runtime"):
        raise ValueError("model is already converted to mixSGA")
    mcfg = getattr(model, "config", None)
    model_type = getattr(mcfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"mixSGA supports model types {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    if not hasattr(model, "generate") or not hasattr(model, "lm_head"):
        raise ValueError(f"expected a causal LM (…ForCausalLM), got {type(model).__name__}")
    cfg.validate_for(mcfg)
    modules = _attention_modules(model)
    if len(modules) != mcfg.num_hidden_layers:
        raise ValueError(f"found {len(modules)} attention modules for {mcfg.num_hidden_layers} layers")
    current = mcfg._attn_implementation
    if getattr(mcfg, "attn_logit_softcapping", None) is not None:
        base = "eager"  # sdpa cannot soft-cap attention logits
    elif current in BASE_IMPLEMENTATIONS:
        base = current
    else:
        raise ValueError(f"mixSGA runs on {BASE_IMPLEMENTATIONS} attention; the model uses {current!r}")
    runtime = MixSGARuntime(cfg, mcfg.num_hidden_layers, model.forward)
    init_gen = torch.Generator().manual_seed(int(cfg.seed))
    for module in sorted(modules, key=lambda m: m.layer_idx):
        weight = module.k_proj.weight
        router = MixSGARouter(mcfg.hidden_size, cfg.num_experts, device=weight.device, dtype=weight.dtype)
        _he_init(router, init_gen)
        module.add_module(ROUTER_NAME, router)
        module.mixsga_spec = LayerSpec(
            layer_idx=int(module.layer_idx),
            group_sizes=cfg.group_sizes,
            active=cfg.active,
            base_fn=base_attention(module, base),
            runtime=runtime,
        )
        module.register_forward_pre_hook(_attention_pre_hook, with_kwargs=True)
        if cfg.router_grad == "straight_through":
            # partial, not a closure: deepcopy of the model then copies the spec the hooks read
            spec = module.mixsga_spec
            module.k_proj.register_forward_hook(functools.partial(_gate_hook, spec))
            module.v_proj.register_forward_hook(functools.partial(_gate_hook, spec))
            module.register_forward_hook(_attention_hook, with_kwargs=True)
    model.mixsga_runtime = runtime
    model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True)
    model.register_forward_hook(_model_hook, with_kwargs=True)
    mcfg.mixsga = {**cfg.to_dict(), "base_attn_implementation": base}
    model.set_attn_implementation(ATTN_NAME)
    from hfconvert import mark_converted  # the types are registered on import of mixsga (mixsga.hf)

    mark_converted(model, "mixsga")  # save_pretrained now writes a "mixsga_<family>" checkpoint
    return model


def routing_stats(model: nn.Module) -> dict:
    """Routing statistics of a converted model since the last ``reset_stats``."""
    return _runtime(model).routing_stats()


def _runtime(model: nn.Module) -> MixSGARuntime:
    rt = getattr(model, "mixsga_runtime", None)
    if rt is None:
        raise ValueError(f"{type(model).__name__} is not converted to mixSGA")
    return rt


def _checkpoint_tensors(path: str, predicate: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"no safetensors checkpoint in {path!r}")
    out = {}
    for name in files:
        file = os.path.join(path, name)
        try:
            with safe_open(file, framework="pt") as fh:
                for key in fh.keys():
                    if predicate(key):
                        out[key] = fh.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types for a damaged header or body
            raise ValueError(f"cannot read weights file {file} (truncated or not safetensors?): {exc}") from exc
    return out


def load_mixsga(path: str, **from_pretrained_kwargs) -> nn.Module:
    """Load a converted model saved with ``save_pretrained``: base weights, conversion, routers.

    Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``, ``device_map``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not os.path.isdir(path):
        raise FileNotFoundError(f"no mixSGA checkpoint directory at {path!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no config.json in {path!r} (not a save_pretrained directory)")
    from hfconvert import converted_method

    config = AutoConfig.from_pretrained(path)
    spec = getattr(config, "mixsga", None)
    if not isinstance(spec, dict):
        raise ValueError(f"{path!r} holds no mixSGA model (its config has no `mixsga` entry)")
    if converted_method(config) == "mixsga":  # a "mixsga_<family>" checkpoint: its class rebuilds it
        return AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    # An older checkpoint whose config names the base model type: convert, then load the routers.
    base = spec.get("base_attn_implementation", "sdpa")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the routers are "unexpected" keys for the base class
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=base, **from_pretrained_kwargs)
    except Exception as exc:  # safetensors, torch and transformers each raise their own types
        raise ValueError(f"cannot load the weights in {path!r} (truncated or missing model.safetensors?): {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    convert_to_mixsga(model, MixSGAConfig.from_dict(spec))
    expected = {k for k in model.state_dict() if f".{ROUTER_NAME}." in k}
    routers = _checkpoint_tensors(path, lambda k: f".{ROUTER_NAME}." in k)
    missing = expected - set(routers)
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks router weights {sorted(missing)[:4]}…")
    model.load_state_dict(routers, strict=False)
    return model

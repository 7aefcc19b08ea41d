"""The one method registry: mixSGA and every baseline answer the same budget questions.

``get_method(name)`` returns a :class:`Method` with

* ``needs_training``: the method changes the architecture and must be
  (continued-)trained before its quality means anything (GQA, MQA, CLA, mixSGA);
* ``simulated``: True only for methods that would merely mask tokens instead of
  storing fewer bytes; every method here really shrinks its cache, so False;
* ``query_aware``: whether the method's selection looks at queries (and so at
  the question when it is in the prompt); None for methods that select nothing;
* ``params_for_budget(config, budget, **explicit)``: the JSON-ready parameters
  that store ``budget`` x the base model's K/V bytes, or ValueError naming why the
  budget is infeasible for this model;
* ``analytic_bytes_per_token(config, params, dtype)``: stored K/V bytes per token
  (``config`` is always the *base* model's config);
* ``apply(model, params) -> model``: the converted model (in place);
* ``new_cache(model, params)``: a fresh cache object to pass as
  ``past_key_values`` for one batch of sequences (``None``: the model's own
  default cache is right). Eviction methods only act through this cache, and
  only between forward passes: score them token by token or chunk by chunk
  (``baselines.eviction.forward_in_chunks``), never in one full-sequence pass;
* ``live_bytes(cache)``: summed ``nbytes`` of the K/V the cache holds (for
  mixSGA including its per-token expert index, as its analytic figure does).

Names: ``base``, ``gqa``, ``mqa``, ``cla``, ``mixsga``, ``h2o``,
``streamingllm``, ``snapkv``, ``tova``, and stacked ``<eviction>+<inner>`` for
eviction on top of ``gqa`` or ``mixsga`` (e.g. ``h2o+gqa``, ``h2o+mixsga``). A
stacked method's budget is the total: ``keep = budget / inner_budget`` with
``inner_budget`` 0.5 by default (the paper's Table 3: keep 80/60/40/20 % on a
50 % model is a total budget of 40/30/20/10 %). On GQA the eviction cache stores
the grouped heads; on mixSGA it is ``mixsga.eviction.MixSGAEvictionCache``, which
ranks tokens with the same ``EvictionPolicy`` and keeps them within ``keep`` x the
bytes plain mixSGA would hold under the same routing (its module docstring says
why the budget is in bytes there).

``mixsga`` params carry the whole ``MixSGAConfig`` (``ratios``, ``group_sizes`` and
``MIXSGA_KNOBS``: ``aux_loss_weight``, ``aux_loss``, ``router``, ``seed``), so the
ablations (``router="random"``, ``aux_loss_weight=0``) are selectable by config:
``get_method("mixsga").params_for_budget(config, 0.5, router="random")``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from baselines.cla import CLAPlan, cla_kv_bytes_per_token, convert_to_cla, plan_cla
from baselines.eviction import (
    METHODS as EVICTION_METHODS,
    QUERY_AWARE,
    EvictionCache,
    EvictionPolicy,
    enable_eviction_attention,
    rope_inv_freq,
    rotate_keys,
)
from baselines.gqa import convert_to_gqa
from harness.orchestration.config import grouped_kv_heads
from mixsga.budget import (
    full_kv_bytes_per_token,
    grouped_kv_bytes_per_token,
    kv_budget,
    kv_shape,
    mixsga_kv_bytes_per_token,
)

#: The paper's default mixSGA ratios (group sizes 1:2:4) per budget (Fig. 3 and Table 1).
MIXSGA_DEFAULT_RATIOS: dict[float, tuple[int, int, int]] = {
    0.25: (0, 0, 1),
    0.35: (1, 1, 8),
    0.5: (3, 1, 6),
    0.75: (1, 1, 0),
    1.0: (1, 0, 0),
}


#: MixSGAConfig fields besides ratios and group sizes that ``mixsga`` params carry (ablations:
#: ``router="random"``, ``aux_loss_weight=0``, ``aux_loss="softmax"``).
MIXSGA_KNOBS = ("aux_loss_weight", "aux_loss", "router", "seed")


def _check_budget(budget: float) -> float:
    value = float(budget)
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return value


def _same(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


def kv_tensor_bytes(cache: Any) -> int:
    """Summed ``nbytes`` of the ``keys`` / ``values`` tensors of a transformers cache's layers."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"cannot measure a cache of type {type(cache).__name__}: it has no .layers")
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.nbytes
    return total


class Method:
    """Interface shared by every entry (see the module docstring)."""

    name: str = ""
    needs_training: bool = False
    simulated: bool = False
    query_aware: bool | None = None

    def params_for_budget(self, config, budget: float, **explicit) -> dict:
        raise NotImplementedError

    def analytic_bytes_per_token(self, config, params: dict, dtype: torch.dtype | str = torch.float32) -> float:
        raise NotImplementedError

    def apply(self, model, params: dict):
        raise NotImplementedError

    def new_cache(self, model, params: dict):
        return None

    def live_bytes(self, cache) -> int:
        return kv_tensor_bytes(cache)

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def _no_extras(name: str, explicit: dict, allowed: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(explicit) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} takes no parameters {unknown}; allowed: {list(allowed)}")


class Base(Method):
    name = "base"

    def params_for_budget(self, config, budget, **explicit):
        _no_extras(self.name, explicit)
        if not _same(_check_budget(budget), 1.0):
            raise ValueError(f"the base model stores the full cache: budget must be 1.0, got {budget!r}")
        return {}

    def analytic_bytes_per_token(self, config, params, dtype=torch.float32):
        return float(full_kv_bytes_per_token(config, dtype))

    def apply(self, model, params):
        return model


class GQA(Method):
    """Mean-pooled K/V heads; ``mqa`` is the single-head case."""

    needs_training = True

    def __init__(self, name: str = "gqa", single_head: bool = False):
        self.name = name
        self.single_head = single_head

    def params_for_budget(self, config, budget, **explicit):
        _no_extras(self.name, explicit)
        budget = _check_budget(budget)
        heads = kv_shape(config).num_kv_heads
        return {"num_key_value_heads": grouped_kv_heads(budget, heads, single_head=self.single_head)}

    def analytic_bytes_per_token(self, config, params, dtype=torch.float32):
        return float(grouped_kv_bytes_per_token(config, params["num_key_value_heads"], dtype))

    def apply(self, model, params):
        return convert_to_gqa(model, params["num_key_value_heads"])


class CLA(Method):
    name = "cla"
    needs_training = True

    def params_for_budget(self, config, budget, **explicit):
        _no_extras(self.name, explicit, ("kv_sources", "num_key_value_heads"))
        budget = _check_budget(budget)
        heads = kv_shape(config).num_kv_heads
        if "kv_sources" in explicit:
            plan = CLAPlan(tuple(int(s) for s in explicit["kv_sources"]),
                           int(explicit.get("num_key_value_heads", heads)))
            got = plan.num_producers * plan.num_key_value_heads / (int(config.num_hidden_layers) * heads)
            if not _same(got, budget):
                raise ValueError(f"CLA kv_sources {list(plan.kv_sources)} store {got:.2%}, not the budget {budget:.2%}")
        elif _same(budget, 1.0):
            plan = CLAPlan(tuple(range(int(config.num_hidden_layers))), heads)
        else:
            plan = plan_cla(config, budget)
        return {"kv_sources": list(plan.kv_sources), "num_key_value_heads": plan.num_key_value_heads}

    def analytic_bytes_per_token(self, config, params, dtype=torch.float32):
        plan = CLAPlan(tuple(params["kv_sources"]), int(params["num_key_value_heads"]))
        return float(cla_kv_bytes_per_token(config, plan, dtype))

    def apply(self, model, params):
        return convert_to_cla(model, params["kv_sources"], params["num_key_value_heads"])


class MixSGA(Method):
    """mixSGA at a budget; the config's other knobs ride along in the params (ablations)."""

    name = "mixsga"
    needs_training = True
    query_aware = None

    def params_for_budget(self, config, budget, **explicit):
        from mixsga import MixSGAConfig

        _no_extras(self.name, explicit, ("ratios", "group_sizes") + MIXSGA_KNOBS)
        budget = _check_budget(budget)
        group_sizes = [int(g) for g in explicit.get("group_sizes", (1, 2, 4))]
        if "ratios" in explicit:
            ratios = [float(r) for r in explicit["ratios"]]
        else:
            if tuple(group_sizes) != (1, 2, 4):
                raise ValueError("non-default group_sizes need explicit ratios")
            match = [r for b, r in MIXSGA_DEFAULT_RATIOS.items() if _same(b, budget)]
            if not match:
                known = ", ".join(f"{b:.0%}" for b in MIXSGA_DEFAULT_RATIOS)
                raise ValueError(f"no default mixSGA ratio for budget {budget:.2%} (defaults exist for {known}); "
                                 "pass ratios=...")
            ratios = list(match[0])
        got = kv_budget(ratios, group_sizes)
        if not _same(got, budget):
            raise ValueError(f"mixSGA ratios {ratios} with group sizes {group_sizes} store {got:.2%}, "
                             f"not the budget {budget:.2%}")
        # Raises for group sizes that do not divide the model's K/V heads.
        mixsga_kv_bytes_per_token(config, ratios, group_sizes)
        knobs = {k: explicit[k] for k in MIXSGA_KNOBS if k in explicit}
        cfg = MixSGAConfig(ratios=tuple(ratios), group_sizes=tuple(group_sizes), **knobs)  # validates the knobs
        return {"ratios": ratios, "group_sizes": group_sizes, **{k: getattr(cfg, k) for k in MIXSGA_KNOBS}}

    def analytic_bytes_per_token(self, config, params, dtype=torch.float32):
        return float(mixsga_kv_bytes_per_token(config, params["ratios"], params["group_sizes"], dtype))

    def apply(self, model, params):
        from mixsga import convert_to_mixsga

        return convert_to_mixsga(model, self.config(params))

    @staticmethod
    def config(params: dict):
        """The ``MixSGAConfig`` of ``params`` (knobs absent from older params take the defaults)."""
        from mixsga import MixSGAConfig

        knobs = {k: params[k] for k in MIXSGA_KNOBS if k in params}
        return MixSGAConfig(ratios=tuple(params["ratios"]), group_sizes=tuple(params["group_sizes"]), **knobs)

    def new_cache(self, model, params):
        from mixsga import MixSGACache

        return MixSGACache(model.config)

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())


_POLICY_FIELDS = ("recent_fraction", "sink_tokens", "window", "kernel", "compress_question", "question_tokens",
                  "reposition")


class Eviction(Method):
    """H2O, StreamingLLM, SnapKV or TOVA as an evicting cache (``baselines.eviction``)."""

    def __init__(self, method: str):
        self.name = method
        self.query_aware = QUERY_AWARE[method]

    def params_for_budget(self, config, budget, *, context_len: int | None = None, **explicit):
        _no_extras(self.name, explicit, _POLICY_FIELDS)
        keep = _check_budget(budget)
        policy = EvictionPolicy(self.name, keep, **explicit)  # validates every field
        if context_len is not None:
            context_len = int(context_len)
            kept = math.floor(keep * context_len + 1e-9)
            if self.name == "snapkv" and policy.window >= context_len:
                raise ValueError(f"SnapKV observation window ({policy.window}) is not shorter than the context "
                                 f"({context_len} tokens)")
            if self.name == "streamingllm" and policy.sink_tokens >= kept:
                raise ValueError(f"StreamingLLM keeps {kept} of {context_len} tokens: no room for a recent window "
                                 f"after {policy.sink_tokens} sink tokens")
        return policy.as_dict()

    def analytic_bytes_per_token(self, config, params, dtype=torch.float32):
        return float(params["keep"]) * full_kv_bytes_per_token(config, dtype)

    def apply(self, model, params):
        EvictionPolicy(**params)
        return enable_eviction_attention(model)

    def new_cache(self, model, params):
        return EvictionCache(model.config, EvictionPolicy(**params), inv_freq=rope_inv_freq(model))

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())


class Stacked(Method):
    """Token eviction on top of an architectural method (GQA or mixSGA)."""

    def __init__(self, eviction: Eviction, inner: Method):
        self.eviction, self.inner = eviction, inner
        self.name = f"{eviction.name}+{inner.name}"
        self.needs_training = inner.needs_training
        self.query_aware = eviction.query_aware

    def params_for_budget(self, config, budget, *, inner_budget: float = 0.5, inner: dict | None = None,
                          **explicit):
        budget = _check_budget(budget)
        inner_budget = _check_budget(inner_budget)
        keep = budget / inner_budget
        if keep > 1 + 1e-9:
            raise ValueError(f"{self.name}: total budget {budget:.2%} exceeds the inner {self.inner.name} budget "
                             f"{inner_budget:.2%} (keep fraction {keep:.3f} > 1)")
        inner_params = self.inner.params_for_budget(config, inner_budget, **(inner or {}))
        evict_params = self.eviction.params_for_budget(config, min(keep, 1.0), **explicit)
        return {"inner": inner_params, "inner_budget": inner_budget, "eviction": evict_params}

    def analytic_bytes_per_token(self, config, params, dtype=torch.float32):
        return float(params["eviction"]["keep"]) * self.inner.analytic_bytes_per_token(config, params["inner"], dtype)

    def apply(self, model, params):
        model = self.inner.apply(model, params["inner"])
        if isinstance(self.inner, MixSGA):
            return model  # eviction acts through the mixSGA cache (new_cache)
        return self.eviction.apply(model, params["eviction"])

    def new_cache(self, model, params):
        if isinstance(self.inner, MixSGA):
            from mixsga.eviction import MixSGAEvictionCache

            policy = EvictionPolicy(**params["eviction"])
            inv_freq = rope_inv_freq(model)
            rotate = None
            if policy.method == "streamingllm" and policy.reposition and inv_freq is not None:
                rotate = functools.partial(rotate_keys, inv_freq=inv_freq)
            return MixSGAEvictionCache(model.config, policy, rotate=rotate)
        return self.eviction.new_cache(model, params["eviction"])

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())


def _build() -> dict[str, Method]:
    methods: dict[str, Method] = {
        "base": Base(),
        "gqa": GQA("gqa"),
        "mqa": GQA("mqa", single_head=True),
        "cla": CLA(),
        "mixsga": MixSGA(),
    }
    for name in EVICTION_METHODS:
        methods[name] = Eviction(name)
    for name in EVICTION_METHODS:
        for inner in ("gqa", "mixsga"):
            stacked = Stacked(methods[name], methods[inner])
            methods[stacked.name] = stacked
    return methods


METHODS: dict[str, Method] = _build()


def get_method(name: str) -> Method:
    """The registry entry for ``name``; ValueError listing the known names."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def realized_budget(method: Method, config, cache, tokens: int, dtype: torch.dtype | str = torch.float32) -> float:
    """Live cache bytes over the base model's bytes for ``tokens`` stored tokens (all samples together)."""
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens!r}")
    return method.live_bytes(cache) / (full_kv_bytes_per_token(config, dtype) * tokens)


__all__ = ["Method", "METHODS", "MIXSGA_DEFAULT_RATIOS", "get_method", "kv_tensor_bytes", "realized_budget"]

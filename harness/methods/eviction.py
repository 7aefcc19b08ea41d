"""``h2o`` / ``streamingllm`` / ``snapkv`` / ``tova``: token eviction on the base model (``baselines.eviction``).

The budget is the kept fraction of the tokens (``keep``); the policy classes live
in ``baselines.policies``, the evicting cache in ``baselines.eviction``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from harness.methods.core import Method, MethodSpec, ParamError, check_budget, round_up

#: Fields of ``baselines.policies.EvictionPolicy`` a config may set.
POLICY_FIELDS = ("recent_fraction", "sink_tokens", "window", "kernel", "compress_question", "question_tokens",
                 "reposition")
#: Each policy's colour (a stacked run draws it with its architecture's marker).
POLICY_STYLE = {"h2o": "tab:orange", "streamingllm": "tab:brown", "snapkv": "tab:pink", "tova": "tab:olive"}
#: The ``EvictionPolicy`` defaults the config-time checks read (torch-free; tests/test_methods.py holds them equal).
POLICY_DEFAULTS = {"sink_tokens": 4, "window": 32}


class EvictionSpec(MethodSpec):
    evicts = True
    marker = "D"
    param_names = POLICY_FIELDS
    modules = ("harness.methods.eviction",)

    def __init__(self, name: str):
        self.name = self.label = name
        self.color = POLICY_STYLE[name]

    def train_key(self, budget, params):
        return "base", 1.0, {}  # eviction runs on the base model's weights

    def min_tokens(self, params: Mapping[str, Any]) -> tuple[int, str]:
        """``(tokens, why)``: the fewest tokens a cache of this policy must keep to do what the policy says."""
        if self.name == "streamingllm":
            sinks = int(params.get("sink_tokens", POLICY_DEFAULTS["sink_tokens"]))
            return sinks + 1, f"its {sinks} sink tokens and at least one recent token"
        return 1, "at least one token"

    def check_run(self, budget, params, contexts):
        self.check_keep(budget, params, contexts)

    def check_keep(self, budget: float, params: Mapping[str, Any], contexts: Mapping[str, int], *,
                   inner: MethodSpec | None = None, inner_budget: float = 1.0,
                   inner_params: Mapping[str, Any] | None = None) -> None:
        """ValueError when total ``budget`` leaves the policy too few tokens at the shortest of ``contexts``.

        A cache keeps ``floor(keep x n)`` of ``n`` tokens seen; on an ``inner`` architecture at
        ``inner_budget`` (``keep = budget / inner_budget``) it keeps ``keep`` x the inner cache's
        bytes, and a token may cost up to the inner spec's ``token_share`` of a base token. The
        fewest tokens are kept at the shortest context; the error names it and the smallest
        total budget that keeps ``min_tokens`` of its most expensive tokens there.
        """
        if not contexts:
            return
        if self.name == "snapkv":
            window = params.get("window", POLICY_DEFAULTS["window"])
            too_short = {k: n for k, n in contexts.items() if window >= n}
            if too_short:
                key, n = min(too_short.items(), key=lambda item: item[1])
                raise ParamError("window", f"SnapKV observation window ({window}) is not shorter than the context "
                                           f"({n} tokens, {key})")
        share = inner.token_share(inner_budget, inner_params or {}) if inner is not None else 1.0
        key, n = min(contexts.items(), key=lambda item: item[1])
        need, why = self.min_tokens(params)
        # tokens of the most expensive kind that keep x the inner cache's bytes hold (budget x n base tokens)
        kept = math.floor(budget * n / share + 1e-9)
        if kept < need:
            smallest = round_up(need * share / n)
            on = (f" ({inner.name} at {inner_budget:g}, keep {budget / inner_budget:.4g}; one of its tokens may cost "
                  f"{share:.4g} of a base token)") if inner is not None else ""
            raise ValueError(f"budget {budget:g}{on} keeps {kept} of the {n} tokens of {key}, and {self.name} "
                             f"needs {need}: {why}; the smallest feasible budget there is {smallest:g}")

    def fields(self, params):
        return {"architecture": "base", "eviction": self.name, "keep": float(params["keep"]), "variant": None,
                "architecture_params": {}}

    def implementation(self):
        return Eviction(self)


class Eviction(Method):
    """H2O, StreamingLLM, SnapKV or TOVA as an evicting cache (``baselines.eviction``)."""

    def __init__(self, spec: EvictionSpec):
        from baselines.policies import POLICIES

        super().__init__(spec)
        self.query_aware = POLICIES[spec.name].query_aware

    @staticmethod
    def policy(params: dict):
        """The ``baselines.policies`` policy of resolved ``params`` (validates every field)."""
        from baselines.policies import EvictionPolicy

        return EvictionPolicy(**params)

    def params_for_budget(self, config, budget, *, context_len: int | None = None, **explicit):
        from baselines.policies import EvictionPolicy

        self.spec.parse_params(explicit)
        policy = EvictionPolicy(self.name, check_budget(budget), **explicit)  # validates every field
        if context_len is not None:
            policy.check_context(int(context_len))
        return policy.as_dict()

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        from kvledger import full_kv_bytes_per_token

        return float(params["keep"]) * full_kv_bytes_per_token(config, dtype)

    def layer_budget(self, config, params):
        """Tokens each layer keeps (``baselines.policies.UniformBudget`` API): the evicting cache's own default."""
        from baselines.eviction import uniform_budget

        return uniform_budget(config, float(params["keep"]))

    def analytic_bytes(self, config, params, tokens, dtype="float32"):
        return budget_bytes(config, self.layer_budget(config, params), tokens, dtype)

    def prepare(self, model, params):
        from baselines.eviction import enable_eviction_attention

        self.policy(params)
        return enable_eviction_attention(model)

    def new_cache(self, model, params, budget=None, heads=None):
        """The evicting cache; ``budget``: layer-wise token budgets (``baselines.policies.UniformBudget`` API);
        ``heads``: head-wise budgets (``baselines.policies.EqualHeads`` API)."""
        from baselines.eviction import EvictionCache, rope_inv_freq

        return EvictionCache(model.config, self.policy(params), inv_freq=rope_inv_freq(model), budget=budget,
                             heads=heads)

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())


SPECS = tuple(EvictionSpec(name) for name in POLICY_STYLE)


def budget_bytes(config, budget, tokens: int, dtype: Any = "float32") -> float:
    """Exactly what an evicting cache holds for one sample of ``tokens`` tokens: per layer the tokens ``budget``
    keeps there (``floor``ed, so a non-integer ``keep x n`` costs no fraction of a token), at the base model's
    K/V bytes per token and layer. The budget's share of the base, ``keep``, is only what this tends to."""
    import torch

    from kvledger import full_kv_bytes_per_token, kv_shape

    if int(tokens) <= 0:
        raise ValueError(f"tokens must be positive, got {tokens!r}")
    layers = kv_shape(config).num_layers
    seen = torch.tensor([int(tokens)])
    kept = sum(int(budget.tokens(layer, seen)) for layer in range(layers))
    return float(kept * (full_kv_bytes_per_token(config, dtype) // layers))


class RedistributedSpec(MethodSpec):
    """Spec of a policy's eviction whose total budget is redistributed (PyramidKV over layers, AdaKV over heads).

    Subclasses name the one knob beside the policy and its fields (``knob``) and validate it
    in ``parse_params``; the rest (weights, checks, record fields) is the policy's.
    """

    evicts = True
    knob: str = ""
    default_policy = "snapkv"

    def check_run(self, budget, params, contexts):
        # the policy's needs at the same total keep (the redistribution keeps the total)
        policy = {k: v for k, v in params.items() if k not in ("policy", self.knob)}
        EvictionSpec(params.get("policy", self.default_policy)).check_keep(budget, policy, contexts)

    def train_key(self, budget, params):
        return "base", 1.0, {}

    def fields(self, params):
        return {"architecture": "base", "eviction": self.name, "keep": float(params["eviction"]["keep"]),
                "variant": f"{params['eviction']['method']} scores", "architecture_params": {}}


class Redistributed(Method):
    """A policy's eviction (:class:`Eviction`) with the cache hooks that redistribute its budget (``cache_hooks``)."""

    query_aware = True  # the default policy (SnapKV); query_aware_for answers per run
    default_knob: float = 0.0

    @staticmethod
    def scorer(params: dict) -> Eviction:
        """The plain eviction method of the run's policy (it validates, counts and builds the cache)."""
        return EvictionSpec(params["eviction"]["method"]).implementation()

    def query_aware_for(self, params: dict) -> bool | None:
        return self.scorer(params).query_aware

    def params_for_budget(self, config, budget, *, context_len: int | None = None, **explicit):
        explicit = self.spec.parse_params(explicit)
        name = explicit.pop("policy", self.spec.default_policy)
        knob = float(explicit.pop(self.spec.knob, self.default_knob))
        policy = EvictionSpec(name).implementation().params_for_budget(config, budget, context_len=context_len,
                                                                       **explicit)
        return {"eviction": policy, self.spec.knob: knob}

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        # the same total as uniform eviction at this keep, only redistributed
        return self.scorer(params).analytic_bytes_per_token(config, params["eviction"], dtype)

    def analytic_bytes(self, config, params, tokens, dtype="float32"):
        # layer-wise budgets (PyramidKV) count per layer; head-wise ones (AdaKV) keep the uniform layer total
        budget = self.cache_hooks(config, params).get("budget")
        if budget is None:
            budget = self.scorer(params).layer_budget(config, params["eviction"])
        return budget_bytes(config, budget, tokens, dtype)

    def prepare(self, model, params):
        return self.scorer(params).prepare(model, params["eviction"])

    def cache_hooks(self, config, params: dict) -> dict:
        """``budget=`` (layer-wise) and / or ``heads=`` (head-wise) hooks for the evicting cache of a ``config``'s
        model."""
        raise NotImplementedError

    def new_cache(self, model, params):
        return self.scorer(params).new_cache(model, params["eviction"], **self.cache_hooks(model.config, params))

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())

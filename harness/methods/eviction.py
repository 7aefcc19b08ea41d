"""``h2o`` / ``streamingllm`` / ``snapkv`` / ``tova``: token eviction on the base model (``baselines.eviction``).

The budget is the kept fraction of the tokens (``keep``); the policy classes live
in ``baselines.policies``, the evicting cache in ``baselines.eviction``.
"""

from __future__ import annotations

from harness.methods.core import Method, MethodSpec, check_budget

#: Fields of ``baselines.policies.EvictionPolicy`` a config may set.
POLICY_FIELDS = ("recent_fraction", "sink_tokens", "window", "kernel", "compress_question", "question_tokens",
                 "reposition")
#: Each policy's colour (a stacked run draws it with its architecture's marker).
POLICY_STYLE = {"h2o": "tab:orange", "streamingllm": "tab:brown", "snapkv": "tab:pink", "tova": "tab:olive"}


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

    def prepare(self, model, params):
        from baselines.eviction import enable_eviction_attention

        self.policy(params)
        return enable_eviction_attention(model)

    def new_cache(self, model, params, budget=None):
        """The evicting cache; ``budget``: layer-wise token budgets (``baselines.policies.UniformBudget`` API)."""
        from baselines.eviction import EvictionCache, rope_inv_freq

        return EvictionCache(model.config, self.policy(params), inv_freq=rope_inv_freq(model), budget=budget)

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())


SPECS = tuple(EvictionSpec(name) for name in POLICY_STYLE)

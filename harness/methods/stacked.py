"""``<eviction>+gqa`` / ``<eviction>+mixsga``: token eviction on top of an architectural method.

A stacked method's budget is the total: ``keep = budget / inner_budget`` with
``inner_budget`` 0.5 by default (the paper's Table 3: keep 80/60/40/20 % on a
50 % model is a total budget of 40/30/20/10 %). On GQA the eviction cache stores
the grouped heads; on mixSGA it is ``mixsga.eviction.MixSGAEvictionCache``, which
ranks tokens with the same policy and keeps them within ``keep`` x the bytes plain
mixSGA would hold under the same routing. Runs differing only in the keep share
the inner model's checkpoint.
"""

from __future__ import annotations

from harness.methods import eviction, gqa, mixsga
from harness.methods.core import Method, MethodSpec, ParamError, check_budget, parse_inner
from harness.methods.eviction import EvictionSpec

DEFAULT_INNER_BUDGET = 0.5


class StackedSpec(MethodSpec):
    evicts = True
    param_names = ("inner_budget", "inner")

    def __init__(self, eviction: EvictionSpec, inner: MethodSpec):
        self.eviction, self.inner = eviction, inner
        self.name = self.label = f"{eviction.name}+{inner.name}"
        self.color, self.marker = eviction.color, inner.marker
        self.needs_training = inner.needs_training
        self.param_names = self.param_names + eviction.param_names
        extra = ("mixsga.eviction",) if inner.name == "mixsga" else ()
        # on mixSGA whole tokens of unequal byte cost fill a byte budget, from below
        self.exact_bytes = inner.name != "mixsga"
        self.modules = ("harness.methods.stacked", *eviction.modules, *inner.modules, *extra)

    def inner_budget(self, params) -> float:
        return float(params.get("inner_budget", DEFAULT_INNER_BUDGET))

    def parse_params(self, params):
        """The explicit params; ``inner`` checked by the inner method's spec (ParamError naming ``inner.<key>``)."""
        params = super().parse_params(params)
        if "inner_budget" in params:
            value = params["inner_budget"]
            try:
                if isinstance(value, bool):
                    raise ValueError(f"budget must be in (0, 1], got {value!r}")
                check_budget(value)
            except (TypeError, ValueError) as err:
                raise ParamError("inner_budget", str(err)) from None
        if params.get("inner") is not None:
            parse_inner(self.inner, params["inner"])
        return params

    def check_feasible(self, budget, params, kv_heads):
        self.inner.check_feasible(self.inner_budget(params), dict(params.get("inner") or {}), kv_heads)

    def check_run(self, budget, params, contexts):
        inner_budget, inner_params = self.inner_budget(params), dict(params.get("inner") or {})
        if budget > inner_budget + 1e-9:
            raise ValueError(f"total budget {budget:g} exceeds the inner {self.inner.name} budget {inner_budget:g} "
                             f"(params.inner_budget; keep fraction {budget / inner_budget:.4g} > 1): a stacked "
                             "method's budget is the total, eviction on top of the inner model")
        try:
            self.inner.check_run(inner_budget, inner_params, contexts)
        except ParamError as err:
            raise err.under("inner") from None
        except ValueError as err:
            raise ValueError(f"inner {self.inner.name} at {inner_budget:g}: {err}") from None
        evict = {k: v for k, v in params.items() if k not in ("inner", "inner_budget")}
        self.eviction.check_keep(budget, evict, contexts, inner=self.inner, inner_budget=inner_budget,
                                 inner_params=inner_params)

    def train_key(self, budget, params):
        return self.inner.train_key(self.inner_budget(params), dict(params.get("inner") or {}))

    def fields(self, params):
        inner = self.inner.fields(params["inner"])
        return {**inner, "eviction": self.eviction.name, "keep": float(params["eviction"]["keep"])}

    def implementation(self):
        return Stacked(self)


class Stacked(Method):
    """Token eviction on top of an architectural method (GQA or mixSGA)."""

    def __init__(self, spec: StackedSpec):
        super().__init__(spec)
        self.eviction, self.inner = spec.eviction.implementation(), spec.inner.implementation()
        self.query_aware = self.eviction.query_aware

    def params_for_budget(self, config, budget, *, inner_budget: float = DEFAULT_INNER_BUDGET,
                          inner: dict | None = None, **explicit):
        budget = check_budget(budget)
        inner_budget = check_budget(inner_budget)
        # a total above the inner budget, the inner params against it (no contexts: the run's are unknown here)
        self.spec.check_run(budget, {**explicit, "inner_budget": inner_budget, "inner": inner or {}}, {})
        keep = budget / inner_budget
        inner_params = self.inner.params_for_budget(config, inner_budget, **(inner or {}))
        evict_params = self.eviction.params_for_budget(config, min(keep, 1.0), **explicit)
        return {"inner": inner_params, "inner_budget": inner_budget, "eviction": evict_params}

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        return float(params["eviction"]["keep"]) * self.inner.analytic_bytes_per_token(config, params["inner"], dtype)

    def _on_mixsga(self) -> bool:
        return self.inner.name == "mixsga"

    def convert(self, model, params):
        return self.inner.convert(model, params["inner"])  # the eviction stores nothing in the weights

    def prepare(self, model, params):
        model = self.inner.prepare(model, params["inner"])
        if self._on_mixsga():
            return model  # eviction acts through the mixSGA cache (new_cache)
        return self.eviction.prepare(model, params["eviction"])

    def register_checkpoint_types(self):
        self.inner.register_checkpoint_types()

    def new_cache(self, model, params):
        if not self._on_mixsga():
            return self.eviction.new_cache(model, params["eviction"])
        import functools

        from baselines.eviction import rope_inv_freq, rotate_keys
        from mixsga.eviction import MixSGAEvictionCache

        policy = self.eviction.policy(params["eviction"])
        inv_freq = rope_inv_freq(model)
        rotate = None
        if policy.repositions and inv_freq is not None:
            rotate = functools.partial(rotate_keys, inv_freq=inv_freq)
        return MixSGAEvictionCache(model.config, policy, rotate=rotate)

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())


#: Every eviction policy stacked on GQA and on mixSGA.
SPECS = tuple(StackedSpec(e, i) for e in eviction.SPECS for i in (gqa.SPEC, mixsga.SPEC))

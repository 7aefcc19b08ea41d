"""``base``: the unmodified model, always at budget 1.0 (its cache is the ledger's unit)."""

from __future__ import annotations

from harness.methods.core import Method, MethodSpec, check_budget, same


class BaseSpec(MethodSpec):
    name = label = "base"
    color, marker = "black", "*"
    modules = ("harness.methods.base",)

    def budgets(self, given, params, kv_heads):
        if given not in (None, [1.0], [1]):
            raise ValueError(f"method 'base' always runs at budget 1.0, got budgets {given}")
        return [1.0]

    def train_key(self, budget, params):
        return self.name, 1.0, dict(params)

    def implementation(self):
        return Base(self)


class Base(Method):
    def params_for_budget(self, config, budget, **explicit):
        self.spec.parse_params(explicit)
        if not same(check_budget(budget), 1.0):
            raise ValueError(f"the base model stores the full cache: budget must be 1.0, got {budget!r}")
        return {}

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        from kvledger import full_kv_bytes_per_token

        return float(full_kv_bytes_per_token(config, dtype))


SPECS = (BaseSpec(),)

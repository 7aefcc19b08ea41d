"""``cla``: cross-layer attention, groups of adjacent layers sharing one K/V (``baselines.cla``)."""

from __future__ import annotations

from harness.methods.core import Method, MethodSpec, check_budget, same


class CLASpec(MethodSpec):
    name, label = "cla", "CLA"
    color, marker = "tab:blue", "s"
    needs_training = True
    param_names = ("kv_sources", "num_key_value_heads")
    modules = ("harness.methods.cla",)

    def implementation(self):
        return CLA(self)


class CLA(Method):
    def params_for_budget(self, config, budget, **explicit):
        from baselines.cla import CLAPlan, cla_budget, plan_cla
        from kvledger import kv_shape

        self.spec.parse_params(explicit)
        budget = check_budget(budget)
        heads = kv_shape(config).num_kv_heads
        if "kv_sources" in explicit:
            plan = CLAPlan(tuple(int(s) for s in explicit["kv_sources"]),
                           int(explicit.get("num_key_value_heads", heads)))
            got = cla_budget(config, plan)
            if not same(got, budget):
                raise ValueError(f"CLA kv_sources {list(plan.kv_sources)} store {got:.2%}, not the budget {budget:.2%}")
        elif same(budget, 1.0):
            plan = CLAPlan(tuple(range(int(config.num_hidden_layers))), heads)
        else:
            plan = plan_cla(config, budget)
        return {"kv_sources": list(plan.kv_sources), "num_key_value_heads": plan.num_key_value_heads}

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        from baselines.cla import CLAPlan, cla_kv_bytes_per_token

        plan = CLAPlan(tuple(params["kv_sources"]), int(params["num_key_value_heads"]))
        return float(cla_kv_bytes_per_token(config, plan, dtype))

    def convert(self, model, params):
        from baselines.cla import convert_to_cla

        return convert_to_cla(model, params["kv_sources"], params["num_key_value_heads"])

    def register_checkpoint_types(self):
        import baselines.hf  # noqa: F401 - registers cla_<family> (and gqa_opt)


SPECS = (CLASpec(),)

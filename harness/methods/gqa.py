"""``gqa`` / ``mqa``: mean-pooled K/V heads (``baselines.gqa``); MQA keeps a single head."""

from __future__ import annotations

from harness.methods.core import Method, MethodSpec, check_budget


def grouped_kv_heads(budget: float, heads: int, *, single_head: bool = False) -> int:
    """K/V heads that GQA (MQA: ``single_head``) keeps to store ``budget`` of a model with ``heads``.

    ValueError naming the feasible budgets when the model cannot store that share.
    """
    if single_head:
        if abs(budget - 1 / heads) > 1e-9:
            raise ValueError(f"MQA keeps 1 of the model's {heads} K/V heads: its budget is {1 / heads:.2%}, "
                             f"not {budget:.2%} (leave out MQA's budgets to derive it from the model)")
        return 1
    wanted = budget * heads
    feasible = [g for g in range(1, heads + 1) if heads % g == 0]
    if abs(wanted - round(wanted)) > 1e-9 or round(wanted) not in feasible:
        options = ", ".join(f"{g / heads:.2%}" for g in feasible)
        raise ValueError(f"GQA cannot store {budget:.2%} of the K/V on a model with {heads} K/V heads "
                         f"(feasible budgets: {options})")
    return int(round(wanted))


class GQASpec(MethodSpec):
    needs_training = True
    modules = ("harness.methods.gqa",)

    def __init__(self, name: str = "gqa", single_head: bool = False):
        self.name, self.label = name, name.upper()
        self.single_head = single_head
        self.color, self.marker = ("tab:purple", "v") if single_head else ("tab:green", "^")

    def derived_budget(self, params, kv_heads):
        if not self.single_head:
            return None
        if kv_heads is None:  # one K/V head: the budget is the model's, 1 / its K/V heads
            raise ValueError("MQA's budget is 1 / the model's K/V heads, unknown for this hub model; "
                             "give that model entry kv_heads, or give MQA budgets")
        return 1 / kv_heads

    def check_feasible(self, budget, params, kv_heads):
        grouped_kv_heads(budget, kv_heads, single_head=self.single_head)

    def implementation(self):
        return GQA(self)


class GQA(Method):
    """Mean-pooled K/V heads; ``mqa`` is the single-head case."""

    def params_for_budget(self, config, budget, **explicit):
        from kvledger import kv_shape

        self.spec.parse_params(explicit)
        heads = kv_shape(config).num_kv_heads
        return {"num_key_value_heads": grouped_kv_heads(check_budget(budget), heads,
                                                        single_head=self.spec.single_head)}

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        from kvledger import grouped_kv_bytes_per_token

        return float(grouped_kv_bytes_per_token(config, params["num_key_value_heads"], dtype))

    def convert(self, model, params):
        from baselines.gqa import convert_to_gqa

        return convert_to_gqa(model, params["num_key_value_heads"])

    def register_checkpoint_types(self):
        import baselines.hf  # noqa: F401 - registers gqa_opt (GQA on Llama / Gemma 2 is native)


SPEC = GQASpec("gqa")
SPECS = (SPEC, GQASpec("mqa", single_head=True))

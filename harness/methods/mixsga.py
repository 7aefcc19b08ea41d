"""``mixsga``: mixture of weight-shared group-attention experts at a budget (``mixsga``).

Params carry the whole ``MixSGAConfig`` (``ratios``, ``group_sizes`` and
:data:`MIXSGA_KNOBS`), so the ablations (``router="random"``, ``aux_loss_weight=0``)
are selectable by config: ``get_method("mixsga").params_for_budget(config, 0.5, router="random")``.
"""

from __future__ import annotations

from harness.methods.core import Method, MethodSpec, check_budget, same

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
DEFAULT_GROUP_SIZES = (1, 2, 4)


def default_ratios(budget: float, group_sizes) -> list[int]:
    """The paper's ratios for ``budget`` (group sizes 1:2:4 only); ValueError naming the budgets that have them."""
    if tuple(int(g) for g in group_sizes) != DEFAULT_GROUP_SIZES:
        raise ValueError("non-default group_sizes need explicit ratios")
    match = [r for b, r in MIXSGA_DEFAULT_RATIOS.items() if same(b, budget)]
    if not match:
        known = ", ".join(f"{b:.0%}" for b in MIXSGA_DEFAULT_RATIOS)
        raise ValueError(f"no default mixSGA ratio for budget {budget:.2%} (defaults exist for {known}); "
                         "pass ratios=...")
    return list(match[0])


class MixSGASpec(MethodSpec):
    name, label = "mixsga", "mixSGA"
    color, marker = "tab:red", "o"
    needs_training = True
    param_names = ("ratios", "group_sizes") + MIXSGA_KNOBS
    modules = ("harness.methods.mixsga",)

    def derived_budget(self, params, kv_heads):
        from kvledger import kv_budget

        if "ratios" not in params:
            return None
        return kv_budget(params["ratios"], params.get("group_sizes", DEFAULT_GROUP_SIZES))

    def check_feasible(self, budget, params, kv_heads):
        from kvledger import check_group_sizes

        group_sizes = params.get("group_sizes", DEFAULT_GROUP_SIZES)
        check_group_sizes(kv_heads, group_sizes)
        if "ratios" not in params:
            default_ratios(budget, group_sizes)

    def fields(self, params):
        router, aux_weight = params.get("router"), params.get("aux_loss_weight")
        if router not in (None, "learned"):
            variant = f"{router} router"
        elif aux_weight is not None and float(aux_weight) == 0.0:
            variant = "no aux loss"
        else:
            variant = "learned router"
        return {**super().fields(params), "variant": variant}

    def implementation(self):
        return MixSGA(self)


class MixSGA(Method):
    """mixSGA at a budget; the config's other knobs ride along in the params (ablations)."""

    def params_for_budget(self, config, budget, **explicit):
        from mixsga import MixSGAConfig
        from mixsga.budget import kv_budget, mixsga_kv_bytes_per_token

        self.spec.parse_params(explicit)
        budget = check_budget(budget)
        group_sizes = [int(g) for g in explicit.get("group_sizes", DEFAULT_GROUP_SIZES)]
        if "ratios" in explicit:
            ratios = [float(r) for r in explicit["ratios"]]
        else:
            ratios = default_ratios(budget, group_sizes)
        got = kv_budget(ratios, group_sizes)
        if not same(got, budget):
            raise ValueError(f"mixSGA ratios {ratios} with group sizes {group_sizes} store {got:.2%}, "
                             f"not the budget {budget:.2%}")
        # Raises for group sizes that do not divide the model's K/V heads.
        mixsga_kv_bytes_per_token(config, ratios, group_sizes)
        knobs = {k: explicit[k] for k in MIXSGA_KNOBS if k in explicit}
        cfg = MixSGAConfig(ratios=tuple(ratios), group_sizes=tuple(group_sizes), **knobs)  # validates the knobs
        return {"ratios": ratios, "group_sizes": group_sizes, **{k: getattr(cfg, k) for k in MIXSGA_KNOBS}}

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        from mixsga.budget import mixsga_kv_bytes_per_token

        return float(mixsga_kv_bytes_per_token(config, params["ratios"], params["group_sizes"], dtype))

    def convert(self, model, params):
        from mixsga import convert_to_mixsga

        return convert_to_mixsga(model, self.config(params))

    def register_checkpoint_types(self):
        import mixsga.hf  # noqa: F401 - registers mixsga_<family>

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


SPEC = MixSGASpec()
SPECS = (SPEC,)

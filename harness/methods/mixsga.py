"""``mixsga``: mixture of weight-shared group-attention experts at a budget (``mixsga``).

Params carry the whole ``MixSGAConfig`` (``ratios``, ``group_sizes`` and
:data:`MIXSGA_KNOBS`), so the ablations (``router="random"``, ``aux_loss_weight=0``) and the
LM-trained router (``router_grad="straight_through"``) are selectable by config:
``get_method("mixsga").params_for_budget(config, 0.5, router="random")``.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from harness.methods.core import Method, MethodSpec, ParamError, check_budget, same

#: The paper's default mixSGA ratios (group sizes 1:2:4) per budget (Fig. 3 and Table 1).
MIXSGA_DEFAULT_RATIOS: dict[float, tuple[int, int, int]] = {
    0.25: (0, 0, 1),
    0.35: (1, 1, 8),
    0.5: (3, 1, 6),
    0.75: (1, 1, 0),
    1.0: (1, 0, 0),
}
#: MixSGAConfig fields besides ratios and group sizes that ``mixsga`` params carry (ablations:
#: ``router="random"``, ``aux_loss_weight=0``, ``aux_loss="softmax"``; the LM-trained router:
#: ``router_grad="straight_through"``).
MIXSGA_KNOBS = ("aux_loss_weight", "aux_loss", "router", "router_grad", "seed")
DEFAULT_GROUP_SIZES = (1, 2, 4)


def default_ratios(budget: float, group_sizes) -> list[int]:
    """The paper's ratios for ``budget`` (group sizes 1:2:4 only); ValueError naming the budgets that have them."""
    if tuple(int(g) for g in group_sizes) != DEFAULT_GROUP_SIZES:
        raise ValueError(f"no default mixSGA ratios for budget {budget:g} with group sizes {list(group_sizes)} "
                         f"(defaults exist only for group sizes {list(DEFAULT_GROUP_SIZES)}); pass ratios=...")
    match = [r for b, r in MIXSGA_DEFAULT_RATIOS.items() if same(b, budget)]
    if not match:
        known = ", ".join(f"{b:g}" for b in MIXSGA_DEFAULT_RATIOS)
        raise ValueError(f"no default mixSGA ratio for budget {budget:g} ({budget:.2%}; defaults exist for {known}); "
                         "pass ratios=...")
    return list(match[0])


@functools.lru_cache(maxsize=1)
def _config_module() -> ModuleType:
    """``mixsga/config.py`` loaded on its own, torch-free.

    It imports only ``kvledger``, but importing it as ``mixsga.config`` runs the package's
    ``__init__``, which imports torch. Loading the file directly lets the spec validate params
    with ``MixSGAConfig``'s own rules (one place for them) at config expansion.
    """
    path = Path(__file__).resolve().parents[2] / "mixsga" / "config.py"
    name = "harness.methods._mixsga_config"
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module  # dataclasses resolve the module's annotations through sys.modules
    loader.loader.exec_module(module)
    return module


def _numbers(value) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


class MixSGASpec(MethodSpec):
    name, label = "mixsga", "mixSGA"
    color, marker = "tab:red", "o"
    needs_training = True
    param_names = ("ratios", "group_sizes") + MIXSGA_KNOBS
    modules = ("harness.methods.mixsga",)

    def parse_params(self, params):
        """The explicit params, each checked by ``MixSGAConfig``'s rules; ParamError naming the one at fault."""
        from kvledger import kv_budget

        params = super().parse_params(params)
        config = _config_module().MixSGAConfig
        group_sizes = params.get("group_sizes", DEFAULT_GROUP_SIZES)
        if "group_sizes" in params:
            if not _numbers(group_sizes) or not group_sizes:
                raise ParamError("group_sizes", f"{group_sizes!r} is not a non-empty list of integers")
            try:
                config(ratios=(1,) * len(group_sizes), group_sizes=tuple(group_sizes))
            except (TypeError, ValueError) as err:
                raise ParamError("group_sizes", str(err)) from None
        if "ratios" in params:
            ratios = params["ratios"]
            if not _numbers(ratios):
                raise ParamError("ratios", f"{ratios!r} is not a list of numbers")
            if any(r < 0 for r in ratios):
                raise ParamError("ratios", f"{list(ratios)} has a negative ratio (capacity shares are >= 0)")
            if not any(r > 0 for r in ratios):
                raise ParamError("ratios", f"{list(ratios)} are all zero (no expert would take a token)")
            try:
                kv_budget(ratios, group_sizes)
                config(ratios=tuple(ratios), group_sizes=tuple(group_sizes))
            except (TypeError, ValueError) as err:
                raise ParamError("ratios", str(err)) from None
        for knob in MIXSGA_KNOBS:
            if knob in params:
                try:
                    config(**{knob: params[knob]})
                except (TypeError, ValueError) as err:
                    raise ParamError(knob, str(err)) from None
        return params

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

    def check_run(self, budget, params, contexts):
        from kvledger import kv_budget

        group_sizes = list(params.get("group_sizes", DEFAULT_GROUP_SIZES))
        if "ratios" not in params:
            default_ratios(budget, group_sizes)
            return
        got = kv_budget(params["ratios"], group_sizes)
        if not same(got, budget):
            raise ParamError("ratios", f"mixSGA ratios {list(params['ratios'])} with group sizes {group_sizes} "
                                       f"store {got:g} ({got:.2%}) of the K/V, not the budget {budget:g} "
                                       "(leave out the budgets to derive them from the ratios)")

    def token_share(self, budget, params):
        # a token routed to the active expert (ratio > 0) with the smallest group keeps 1 / that size of the heads
        group_sizes = [int(g) for g in params.get("group_sizes", DEFAULT_GROUP_SIZES)]
        ratios = params["ratios"] if "ratios" in params else default_ratios(budget, group_sizes)
        return 1.0 / min(g for g, r in zip(group_sizes, ratios) if r > 0)

    def fields(self, params):
        router, aux_weight = params.get("router"), params.get("aux_loss_weight")
        no_aux = aux_weight is not None and float(aux_weight) == 0.0
        if router not in (None, "learned"):
            variant = f"{router} router"
        elif params.get("router_grad") == "straight_through":
            variant = "LM-trained router" + (", no aux loss" if no_aux else "")
        elif no_aux:
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
        from mixsga.budget import mixsga_kv_bytes_per_token

        self.spec.parse_params(explicit)
        budget = check_budget(budget)
        self.spec.check_run(budget, explicit, {})  # ratios storing another share than the budget, or none for it
        group_sizes = [int(g) for g in explicit.get("group_sizes", DEFAULT_GROUP_SIZES)]
        if "ratios" in explicit:
            ratios = [float(r) for r in explicit["ratios"]]
        else:
            ratios = default_ratios(budget, group_sizes)
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

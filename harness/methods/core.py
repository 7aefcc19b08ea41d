"""What every method answers: the torch-free :class:`MethodSpec` and the :class:`Method` implementation base.

A method module (``harness.methods.<name>``) defines both. Its spec is what the
config expansion, the workflow and the analysis ask; it must stay importable
without torch, so a module imports torch and the method packages (``mixsga``,
``baselines``) only inside its implementation's functions.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def check_budget(budget: float) -> float:
    """``budget`` as a float in (0, 1]; ValueError otherwise."""
    value = float(budget)
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    return value


def same(a: float, b: float) -> bool:
    """Budgets equal up to float noise."""
    return abs(a - b) < 1e-9


class ParamError(ValueError):
    """A method param that is wrong on its own; ``key`` is its dotted path in the params (``inner.ratios``).

    The config expansion names it as ``experiments.<name>.runs[i].params.<key>``.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key

    def under(self, prefix: str) -> "ParamError":
        """The same error for params nested under ``prefix`` (a stacked method's ``inner``)."""
        return ParamError(f"{prefix}.{self.key}", str(self))


def parse_inner(inner_spec: "MethodSpec", inner: Any) -> None:
    """Check a combined method's ``params.inner`` with the inner method's spec (errors name ``inner.<key>``)."""
    if not isinstance(inner, dict):
        raise ParamError("inner", f"{inner!r} is not a mapping of {inner_spec.name} params")
    try:
        inner_spec.parse_params(inner)
    except ParamError as err:
        raise err.under("inner") from None
    except ValueError as err:
        raise ParamError("inner", str(err)) from None


def round_up(value: float, digits: int = 6) -> float:
    """``value`` rounded up at ``digits`` decimals: a smallest feasible budget that is itself feasible."""
    return math.ceil(value * 10**digits - 1e-6) / 10**digits


class MethodSpec:
    """The torch-free facts of one method (see the module docstring).

    Subclasses set the class attributes and override what their method decides.
    """

    name: str = ""
    #: How figures and tables name and draw the method.
    label: str = ""
    color: str = "tab:gray"
    marker: str = "X"
    #: Token eviction: the method bounds its cache by evicting (bounded-cache perplexity, no zero-shot).
    evicts: bool = False
    #: The cache stores every token in fewer bits (``kvquant``): it too acts only through its cache, so such a
    #: spec sets ``evicts`` (bounded-cache perplexity, no zero-shot) while its eviction fields stay empty.
    quantizes: bool = False
    #: The method changes the architecture and is (continued-)trained before its quality means anything.
    needs_training: bool = False
    #: Explicit params the config may give (``params_for_budget`` keywords).
    param_names: tuple[str, ...] = ()
    #: Dotted names of the repository modules implementing the method (the workflow hashes their imports).
    modules: tuple[str, ...] = ()
    #: Live bytes equal the analytic bytes when tokens are whole; False: they only bound them from above.
    exact_bytes: bool = True

    def parse_params(self, params: Mapping[str, Any] | None) -> dict:
        """The explicit params as a dict; ValueError naming unknown keys and the allowed ones."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            raise ValueError(f"method {self.name!r} takes no parameters {unknown}; allowed: {list(self.param_names)}")
        return params

    def budgets(self, given: Sequence[float] | None, params: Mapping[str, Any], kv_heads: int | None) -> list[float]:
        """The nominal budgets of a config run entry (``given``, or derived from params / the model's heads)."""
        if given is not None:
            return [check_budget(b) for b in given]
        derived = self.derived_budget(params, kv_heads)
        if derived is None:
            raise ValueError(f"method {self.name!r} needs budgets")
        return [derived]

    def derived_budget(self, params: Mapping[str, Any], kv_heads: int | None) -> float | None:
        """The budget implied when the config names none (mixSGA ratios, MQA's one head); None: none implied."""
        return None

    def check_feasible(self, budget: float, params: Mapping[str, Any], kv_heads: int) -> None:
        """ValueError (naming the feasible budgets) when a model with ``kv_heads`` K/V heads cannot store ``budget``."""

    def check_run(self, budget: float, params: Mapping[str, Any], contexts: Mapping[str, int]) -> None:
        """ValueError when a run at ``budget`` with these explicit ``params`` cannot work on any model.

        Params contradicting the budget, or a budget that keeps fewer tokens than the method
        needs at one of the token counts the run processes (``contexts``: config key -> tokens,
        e.g. ``{"eval.seq_len": 256, "measure.context_lengths[0]": 128}``), naming the smallest
        feasible budget. A :class:`ParamError` names the param at fault.
        """

    def token_share(self, budget: float, params: Mapping[str, Any]) -> float:
        """K/V bytes of the most expensive token the method stores, over the base model's bytes per token.

        Every token costs ``budget`` of a base token unless the method mixes granularities
        (mixSGA: a token routed to the full-head expert costs a whole base token).
        """
        return float(budget)

    def train_key(self, budget: float, params: Mapping[str, Any]) -> tuple[str, float, dict]:
        """``(method, budget, explicit params)`` of the weights the runs use; runs sharing it share a checkpoint."""
        return self.name, float(budget), dict(params)

    def fields(self, params: Mapping[str, Any]) -> dict:
        """Structured method fields of a run with resolved ``params`` (records carry them; analysis reads them).

        ``architecture``: the method whose weights run; ``eviction``: the policy evicting on it, or None;
        ``keep``: the kept fraction of tokens, or None; ``variant``: a named ablation, or None;
        ``architecture_params``: the architecture's resolved params.
        """
        return {"architecture": self.name, "eviction": None, "keep": None, "variant": None,
                "architecture_params": dict(params)}

    def implementation(self) -> "Method":
        """The :class:`Method` that runs it (built on first use; imports torch)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<method spec {self.name}>"


class Method:
    """The implementation every method offers (``harness.methods.get_method``).

    * ``needs_training``, ``query_aware`` (None: selects nothing), ``simulated``
      (True only for a method that would mask tokens instead of storing fewer bytes;
      every method here really shrinks its cache);
    * ``params_for_budget(config, budget, **explicit)``: JSON-ready params storing
      ``budget`` x the base model's K/V bytes, or ValueError naming why not;
    * ``analytic_bytes_per_token(config, params, dtype)`` (``config``: the base model's): bytes per
      token on layers that store every token; ``analytic_bytes(config, params, tokens, dtype)``:
      bytes for one sample of ``tokens`` tokens, sliding-window layers storing only their
      window as the base model's cache does (``kvledger.stored_share``);
    * ``apply(model, params) -> model`` (in place): ``prepare(convert(model, params), params)``.
      A method overrides the two halves, never ``apply`` itself (the contract test checks):
      ``convert`` changes the architecture and weights, which is what a trained checkpoint
      stores; ``prepare`` is the runtime setup no checkpoint stores (eviction attention).
      Both default to returning the model unchanged;
    * ``load_trained(path, params, dtype=, device=)``: the trained checkpoint directory at
      ``path`` (a ``save_pretrained`` one, already converted), prepared to run;
    * ``new_cache(model, params)``: a fresh cache for one batch (None: the model's default is
      right); eviction acts only through this cache, between forward passes;
    * ``live_bytes(cache)``: summed ``nbytes`` of the K/V the cache holds.
    """

    name: str = ""
    needs_training: bool = False
    simulated: bool = False
    query_aware: bool | None = None

    def __init__(self, spec: MethodSpec):
        self.spec = spec
        self.name = spec.name
        self.needs_training = spec.needs_training

    def params_for_budget(self, config, budget: float, **explicit) -> dict:
        raise NotImplementedError

    def analytic_bytes_per_token(self, config, params: dict, dtype: Any = "float32") -> float:
        raise NotImplementedError

    def analytic_bytes(self, config, params: dict, tokens: int, dtype: Any = "float32") -> float:
        """Bytes stored for one sample of ``tokens`` tokens: the per-token figure on what each layer stores.

        A sliding-window layer stores ``min(tokens, W - 1)`` tokens (``kvledger.layer_windows``), in the
        base model's cache and in every method's that keeps the same bytes per token on each layer.
        """
        from kvledger import stored_share

        return self.analytic_bytes_per_token(config, params, dtype) * int(tokens) * stored_share(config, tokens)

    def convert(self, model, params: dict):
        """The conversion a trained checkpoint stores (architecture and weights); in place."""
        return model

    def prepare(self, model, params: dict):
        """Runtime setup stored in no checkpoint, on a converted model; in place."""
        return model

    def apply(self, model, params: dict):
        """``model`` converted and prepared to run (in place)."""
        return self.prepare(self.convert(model, params), params)

    def register_checkpoint_types(self) -> None:
        """Import what registers the checkpoint types ``convert`` saves as (none: plain checkpoints)."""

    def load_trained(self, path, params: dict, *, dtype: Any, device: Any):
        """``(model, tokenizer)`` of the trained checkpoint directory ``path``, converted as saved, prepared."""
        from harness.models.zoo import load_base_model

        self.register_checkpoint_types()
        model, tokenizer = load_base_model(path, dtype=dtype, device=device)
        return self.prepare(model, params), tokenizer

    def new_cache(self, model, params: dict):
        return None

    def live_bytes(self, cache) -> int:
        return kv_tensor_bytes(cache)

    def query_aware_for(self, params: dict) -> bool | None:
        """Whether a run with resolved ``params`` selects tokens by looking at queries (the record's flag)."""
        return self.query_aware

    def __repr__(self) -> str:
        return f"<method {self.name}>"


def kv_tensor_bytes(cache: Any) -> int:
    """Summed ``nbytes`` of the ``keys`` / ``values`` tensors of a transformers cache's layers."""
    import torch

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

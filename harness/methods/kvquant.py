"""``kvquant`` / ``kvquant+gqa`` / ``kvquant+mixsga``: the K/V cache stored as 2- or 4-bit codes.

KIVI-style quantization through transformers' ``QuantoQuantizedLayer`` (optimum-quanto):
per-token groups of ``group_size`` channels, each with a scale and a zero-point in the
cache's float dtype, and a full-precision residual window of the most recent
``N mod residual`` tokens. ``kvquant`` runs on the base model's weights; ``kvquant+gqa``
quantizes the grouped heads of the GQA model (``inner_budget``, 0.5 by default, whose
checkpoint it shares). Quantization acts only through the cache, so the spec sets
``evicts``: perplexity is scored token by token through the quantized cache and
zero-shot (one cache-less forward per choice) is skipped; the record's eviction fields
stay empty.

``kvquant+mixsga`` (its own module, ``harness.methods.kvquant_mixsga``, so that the plain
quantized caches do not hash mixSGA's code) quantizes mixSGA's per-expert stores
(``mixsga.quantized_cache``): each token's pooled K/V at its expert's granularity, per head in groups of ``group_size``
channels along ``head_dim`` (default: the largest divisor of at most 64), each group with a
scale and a zero-point in the cache's float dtype, plus the uint8 expert index per token and
layer, on the mixSGA model at ``inner_budget`` (0.5 by default, whose checkpoint it shares).
It takes no residual window (see that module), so its bytes are the same per token at every
length and equal the analytic bytes wherever plain mixSGA's do (the routing at the ratios).

Params: ``bits`` (2 or 4; default 4), ``group_size`` (default: the largest of at most 64
channels that packs whole bytes per token), ``residual`` (window length; default 0 = no
window), ``context`` (tokens per sample at which the bytes per token are stated; required
with a window, see below).

Budget: derived from the bits, ``bits / 16`` (the codes' share of a 16-bit cache; with
GQA or mixSGA times its ``inner_budget``); a config gives no budget (any other is refused). The
realized budget counts everything at the run's dtype: codes, scales and zero-points, and
the window.

Bytes: with a window the stored bytes are not proportional to the tokens (the last
``N mod residual`` are full precision), so the per-token figure is stated at a context
length: ``analytic_bytes_per_token = quantized_kv_bytes(N = context) / context``. A run
measures its cache after ``measure.context_lengths[0] + new_tokens - 1`` stored tokens
(the last generated token is returned, never stored): give that as ``context`` and the
measured bytes equal the analytic bytes exactly. Without a window the bytes are the same
per token at every length and ``context`` is not taken.
"""

from __future__ import annotations

from typing import Any

from harness.methods import gqa
from harness.methods.core import Method, MethodSpec, ParamError, check_budget, parse_inner, same

DEFAULT_BITS = 4
DEFAULT_INNER_BUDGET = 0.5
#: The float width the nominal budget is stated against (the usual deployed cache).
NOMINAL_FLOAT_BITS = 16
QUANT_PARAMS = ("bits", "group_size", "residual", "context")


def _bits(params) -> int:
    bits = params.get("bits", DEFAULT_BITS)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 4):
        raise ValueError(f"kvquant bits must be 2 or 4 (quanto's qint2 / qint4), got {bits!r}")
    return int(bits)


def _count(params, name: str, minimum: int) -> None:
    value = params.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"kvquant {name} must be an integer >= {minimum}, got {value!r}")


#: Colours by inner method (None: the base model); none shared with another method (a test checks).
COLORS = {None: "teal", "gqa": "darkred", "mixsga": "deeppink"}


class KVQuantSpec(MethodSpec):
    """``kvquant`` on the base model, or (``inner``) on GQA's grouped heads or mixSGA's expert stores."""

    evicts = True  # acts only through the cache: bounded-cache perplexity, no zero-shot (module doc)
    quantizes = True
    marker = "h"

    def __init__(self, inner: MethodSpec | None = None):
        self.inner = inner
        self.name = "kvquant" if inner is None else f"kvquant+{inner.name}"
        self.label = "KV quant" if inner is None else f"KV quant + {inner.label}"
        self.color = COLORS[None if inner is None else inner.name]
        self.needs_training = inner is not None and inner.needs_training
        self.param_names = QUANT_PARAMS + (() if inner is None else ("inner_budget", "inner"))
        self.modules = ("harness.methods.kvquant", "baselines.quantized_cache",
                        *(() if inner is None else inner.modules))

    def parse_params(self, params):
        params = super().parse_params(params)
        _bits(params)  # refused at config time, before any job
        _count(params, "group_size", 1)
        _count(params, "residual", 0)
        _count(params, "context", 1)
        if params.get("residual") and params.get("context") is None:
            raise ValueError("kvquant with a residual window states its bytes per token at a context length: give "
                             "context, the tokens per sample the run measures (measure.context_lengths[0] + "
                             "new_tokens - 1)")
        if not params.get("residual") and params.get("context") is not None:
            raise ValueError("kvquant context only states a residual window's bytes; without residual it is not taken")
        if self.inner is not None and params.get("inner") is not None:
            parse_inner(self.inner, params["inner"])
        return params

    def inner_budget(self, params) -> float:
        return float(params.get("inner_budget", DEFAULT_INNER_BUDGET))

    def derived_budget(self, params, kv_heads):
        share = _bits(params) / NOMINAL_FLOAT_BITS
        return share if self.inner is None else share * self.inner_budget(params)

    def check_feasible(self, budget, params, kv_heads):
        if self.inner is not None:
            self.inner.check_feasible(self.inner_budget(params), dict(params.get("inner") or {}), kv_heads)
        derived = self.derived_budget(params, kv_heads)
        if not same(float(budget), derived):
            raise ValueError(f"{self.name}'s budget is derived from its bits ({_bits(params)} / "
                             f"{NOMINAL_FLOAT_BITS}{'' if self.inner is None else ' x inner_budget'} = "
                             f"{derived:.2%}), not {float(budget):.2%}: leave out its budgets, set bits")

    def check_run(self, budget, params, contexts):
        if self.inner is None:
            return
        try:
            self.inner.check_run(self.inner_budget(params), dict(params.get("inner") or {}), contexts)
        except ParamError as err:
            raise err.under("inner") from None

    def train_key(self, budget, params):
        if self.inner is None:
            return "base", 1.0, {}  # quantization runs on the base model's weights
        return self.inner.train_key(self.inner_budget(params), dict(params.get("inner") or {}))

    def fields(self, params):
        arch = {"architecture": "base", "architecture_params": {}} if self.inner is None else {
            "architecture": self.inner.name, "architecture_params": dict(params["inner"])}
        return {**arch, "eviction": None, "keep": None, "variant": f"KV cache {params['quant']['bits']}-bit"}

    def implementation(self):
        return KVQuant(self)


class KVQuant(Method):
    """The quantized cache (``baselines.quantized_cache.QuantizedKVCache``), on the base model or GQA."""

    query_aware = False

    def __init__(self, spec: KVQuantSpec):
        super().__init__(spec)
        self.inner = None if spec.inner is None else spec.inner.implementation()

    def params_for_budget(self, config, budget, **explicit):
        from kvledger import kv_shape

        budget = check_budget(budget)
        explicit = self.spec.parse_params(explicit)
        self.spec.check_feasible(budget, explicit, kv_shape(config).num_kv_heads)
        out: dict[str, Any] = {}
        heads = kv_shape(config).num_kv_heads
        if self.inner is not None:
            inner_budget = check_budget(self.spec.inner_budget(explicit))
            out["inner"] = self.inner.params_for_budget(config, inner_budget, **dict(explicit.get("inner") or {}))
            out["inner_budget"] = inner_budget
        if self.inner is not None:  # GQA's grouped heads (mixSGA's stores are quantized per pooled head)
            heads = out["inner"].get("num_key_value_heads", heads)
        return {**out, "quant": self.quant_params(explicit, heads, kv_shape(config).head_dim)}

    def quant_params(self, explicit, heads: int, head_dim: int) -> dict:
        """The ``quant`` params: bits, the group size that fits the layout, the residual window."""
        from baselines.quantized_cache import check_layout, default_group_size

        bits = _bits(explicit)
        group = explicit.get("group_size") or default_group_size(bits, heads, head_dim)
        check_layout(bits, group, heads, head_dim)
        quant = {"bits": bits, "group_size": int(group), "residual": int(explicit.get("residual") or 0)}
        if quant["residual"]:
            quant["context"] = int(explicit["context"])
        return quant

    def _kv_heads(self, config, params) -> int:
        from kvledger import kv_shape

        return kv_shape(config).num_kv_heads if self.inner is None else int(params["inner"]["num_key_value_heads"])

    def stored_bytes(self, config, params, dtype: Any, tokens: int) -> int:
        """Stored K/V bytes of one sample holding ``tokens`` tokens (``config``: the base model's)."""
        from baselines.quantized_cache import quantized_kv_bytes
        from kvledger import dtype_bytes, kv_shape

        shape, quant = kv_shape(config), params["quant"]
        return quantized_kv_bytes(layers=shape.num_layers, kv_heads=self._kv_heads(config, params),
                                  head_dim=shape.head_dim, float_bytes=dtype_bytes(dtype), bits=quant["bits"],
                                  group_size=quant["group_size"], residual=quant["residual"], tokens=tokens)

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        tokens = int(params["quant"].get("context", 1))  # no window: the same at every length
        return self.stored_bytes(config, params, dtype, tokens) / tokens

    def analytic_bytes(self, config, params, tokens, dtype="float32"):
        # the quantized cache keeps every token on every layer, sliding-window layers included
        return float(self.stored_bytes(config, params, dtype, int(tokens)))

    def convert(self, model, params):
        return model if self.inner is None else self.inner.convert(model, params["inner"])

    def prepare(self, model, params):
        return model if self.inner is None else self.inner.prepare(model, params["inner"])

    def register_checkpoint_types(self):
        if self.inner is not None:
            self.inner.register_checkpoint_types()

    def new_cache(self, model, params):
        quant = params["quant"]
        from baselines.quantized_cache import QuantizedKVCache

        return QuantizedKVCache(model.config, quant["bits"], quant["group_size"], quant["residual"])

    def live_bytes(self, cache) -> int:
        return int(cache.kv_bytes())


SPECS = (KVQuantSpec(), KVQuantSpec(gqa.SPEC))

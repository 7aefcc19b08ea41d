"""``kvquant+mixsga``: mixSGA's per-expert stores quantized (``mixsga.quantized_cache``).

The quantized cache of :mod:`harness.methods.kvquant` on the mixSGA model at ``inner_budget``
(whose checkpoint it shares), with the store, layout and bytes of the expert stores. A module
of its own so that ``kvquant`` and ``kvquant+gqa`` do not import, and so do not hash, mixSGA's
code: editing mixSGA reruns exactly the runs that execute it (``harness.orchestration.codehash``).
"""

from __future__ import annotations

from harness.methods import mixsga
from harness.methods.core import ParamError
from harness.methods.kvquant import KVQuant, KVQuantSpec, _bits


class KVQuantMixSGASpec(KVQuantSpec):
    """``kvquant+mixsga``: no residual window (the most recent tokens sit in different expert stores)."""

    def __init__(self):
        super().__init__(mixsga.SPEC)
        self.modules = ("harness.methods.kvquant_mixsga", "harness.methods.kvquant", "mixsga.quantized_cache",
                        *mixsga.SPEC.modules)

    def parse_params(self, params):
        params = super().parse_params(params)  # a mapping of known params, or the named error
        if params.get("residual"):
            raise ParamError("residual", "kvquant+mixsga takes no residual window: the most recent tokens sit in "
                                         "different expert stores, so the window's bytes would depend on their "
                                         "routing (mixsga/quantized_cache.py); leave out residual")
        return params

    def implementation(self):
        return KVQuantMixSGA(self)


class KVQuantMixSGA(KVQuant):
    """mixSGA's quantized expert stores (``mixsga.quantized_cache.QuantizedMixSGACache``)."""

    def quant_params(self, explicit, heads: int, head_dim: int) -> dict:
        from mixsga.quantized_cache import check_quant_layout, default_group_size

        bits = _bits(explicit)
        group = explicit.get("group_size") or default_group_size(head_dim)  # per pooled head, along d
        check_quant_layout(bits, group, head_dim)
        return {"bits": bits, "group_size": int(group), "residual": 0}

    def stored_bytes(self, config, params, dtype, tokens: int) -> int:
        raise ValueError("kvquant+mixsga's stored bytes depend on the routing, not on the token count alone: "
                         "use analytic_bytes_per_token (at the ratios) or the cache's kv_bytes()")

    def analytic_bytes_per_token(self, config, params, dtype="float32"):
        # no window; the stores at the routing ratios, index bytes included
        from mixsga.quantized_cache import quantized_mixsga_kv_bytes_per_token

        inner, quant = params["inner"], params["quant"]
        return float(quantized_mixsga_kv_bytes_per_token(config, inner["ratios"], inner["group_sizes"], dtype,
                                                         quant["bits"], quant["group_size"]))

    def analytic_bytes(self, config, params, tokens, dtype="float32"):
        # its bytes follow the routing: the figure at the ratios, every token kept (sliding layers too)
        return self.analytic_bytes_per_token(config, params, dtype) * int(tokens)

    def new_cache(self, model, params):
        from mixsga.quantized_cache import QuantizedMixSGACache

        quant = params["quant"]
        return QuantizedMixSGACache(model.config, quant["bits"], quant["group_size"])


SPECS = (KVQuantMixSGASpec(),)

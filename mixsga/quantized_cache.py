"""mixSGA's per-expert stores quantized: :class:`QuantizedMixSGACache` (``kvquant+mixsga``).

What is stored: every token routed to expert e is stored, as in :class:`mixsga.cache.MixSGALayer`,
as its pooled K and V (``H_kv / g_e`` heads of ``d`` channels) -- but as ``bits``-bit codes. Each
pooled head's K (and V) of each token is split into groups of ``group_size`` channels along ``d``,
each group with its own scale and zero-point in the cache's float dtype: the affine min-max scheme
of optimum-quanto's ``MaxOptimizer`` / ``quantize_affine`` (what ``kvquant`` uses through
transformers' quantized cache), ``scale = (max - min) / (2**bits - 1)``, ``shift = -min``,
``code = clamp(round((x + shift) / scale), 0, 2**bits - 1)``, ``x ~ scale * code - shift``; a
constant group gets code 0 and dequantizes exactly. Codes are packed ``8 // bits`` per byte along
``d`` (``d * bits`` must be a multiple of 8), so a group never spans tokens or heads and the bytes
are a sum over stored tokens. There is no full-precision residual window: the tokens a window
would keep are the most recent ones whichever expert they went to, so its bytes would depend on
the routing of the last tokens, not on the token count; every token is quantized as it is stored.

Bytes per stored token and layer (:func:`quantized_token_bytes`), for a token of expert e, with
``s`` bytes per float::

    2 * (H_kv / g_e) * (d * bits / 8 + 2 * s * d / group_size)  +  1 (its uint8 expert index)

``kv_bytes()`` is that sum over the stored tokens (read off the stores' tensors);
:func:`quantized_mixsga_kv_bytes_per_token` is the analytic figure at the routing ratios.

Decode math: unchanged mixSGA (``MixSGALayer``), on dequantized views. Each update
dequantizes the stores into the layer's float buffers for the duration of that layer's
attention, stores the chunk's pooled K/V there as the parent does, quantizes the newly filled
slots into the codes and writes their dequantized values back, so attention (decode and chunked
prefill alike) reads exactly what is stored, the step's own token included. The float buffers are
dropped again after the attention: between forward passes the cache holds only codes, scales,
zero-points, the expert index and the fill counts. A full-sequence prefill attends over the
projected K/V as plain mixSGA does (the cache is written, not read). Performance is not the aim:
every layer dequantizes its whole store at every step, as transformers' quantized cache does, so
the peak memory of a step also holds one layer's dequantized store (``kv_bytes`` counts what is
stored, ``reserved_bytes`` what the stores allocate). The new slots are read off the fill counts:
the parent must append without dropping or moving tokens inside ``update`` (checked; a parent
that does raises RuntimeError instead of storing wrong codes).

Token eviction, cropping and key rewriting are refused (``keep_tokens``, ``crop``, ``set_keys``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvledger import dtype_bytes, kv_budget, kv_shape
from mixsga.budget import CACHE_INDEX_BITS
from mixsga.cache import INDEX_DTYPE, MixSGACache, MixSGALayer
from mixsga.config import MixSGAConfig

#: Code widths the stores take (the method itself offers 2 and 4, as ``kvquant``; 8 is for tests).
BITS = (2, 4, 8)
#: The largest default group (transformers' quantized cache default).
DEFAULT_MAX_GROUP = 64


def check_quant_layout(bits, group_size, head_dim: int) -> None:
    """ValueError unless ``bits`` is one of :data:`BITS`, groups tile ``head_dim`` and a head's codes fill whole bytes."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if head_dim % group_size:
        raise ValueError(f"group_size {group_size} does not divide head_dim {head_dim}: a group would span heads")
    if head_dim * bits % 8:
        raise ValueError(f"{bits}-bit codes of a {head_dim}-channel head do not fill whole bytes")


def default_group_size(head_dim: int) -> int:
    """The largest divisor of ``head_dim`` of at most :data:`DEFAULT_MAX_GROUP` channels."""
    return max(g for g in range(1, min(DEFAULT_MAX_GROUP, head_dim) + 1) if head_dim % g == 0)


def quantized_token_bytes(num_kv_heads: int, group: int, head_dim: int, float_bytes: int, bits: int,
                          group_size: int) -> int:
    """K+V bytes of one token stored by an expert of group size ``group`` in one layer (index byte not included)."""
    check_quant_layout(bits, group_size, head_dim)
    per_head = head_dim * bits // 8 + 2 * float_bytes * (head_dim // group_size)  # codes + scale + zero-point
    return 2 * (num_kv_heads // int(group)) * per_head


def quantized_mixsga_kv_bytes_per_token(config, ratios: Sequence[float], group_sizes: Sequence[int], dtype,
                                        bits: int, group_size: int) -> float:
    """Analytic bytes per token of the quantized stores at the routing ``ratios`` (all layers, index bytes included).

    ``kv_budget(ratios, group_sizes)`` is the share of the K/V heads a token keeps on average; a token
    keeping every head would cost :func:`quantized_token_bytes` with group size 1 in each layer.
    """
    shape = kv_shape(config)
    full = quantized_token_bytes(shape.num_kv_heads, 1, shape.head_dim, dtype_bytes(dtype), bits, group_size)
    return shape.num_layers * (full * kv_budget(ratios, group_sizes) + CACHE_INDEX_BITS / 8)


def quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``[..., d]`` as (packed codes ``[..., d * bits / 8]`` uint8, scale, shift ``[..., d / group_size]``)."""
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    top = 2**bits - 1
    scale, shift = (hi - lo) / top, -lo  # quanto's MaxOptimizer, in x's dtype
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: code 0 is exact
    codes = torch.clamp(torch.round((groups + shift[..., None]) / safe[..., None]), 0, top).to(torch.uint8)
    codes = codes.reshape(*x.shape[:-1], x.shape[-1] * bits // 8, 8 // bits)
    packed = torch.zeros(codes.shape[:-1], dtype=torch.uint8, device=x.device)
    for i in range(8 // bits):
        packed |= codes[..., i] << (bits * i)
    return packed, scale, shift


def dequantize(packed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`quantize` up to the rounding: ``scale * code - shift``, ``[..., d]`` in the scales' dtype."""
    mask = 2**bits - 1
    codes = torch.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], dim=-1)
    dim, groups = packed.shape[-1] * 8 // bits, scale.shape[-1]
    codes = codes.reshape(*packed.shape[:-1], groups, dim // groups).to(scale.dtype)
    return (scale[..., None] * codes - shift[..., None]).reshape(*packed.shape[:-1], dim)


class QuantizedMixSGALayer(MixSGALayer):
    """A ``MixSGALayer`` whose expert stores hold codes, scales and zero-points (module docstring)."""

    is_croppable = False

    def __init__(self, group_sizes: Sequence[int], active: Sequence[bool], bits: int, group_size: int | None = None,
                 decode_backend: str = "auto") -> None:
        super().__init__(group_sizes, active, decode_backend)
        self.bits, self.group_size = int(bits), group_size
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"bits must be one of {list(BITS)}, got {bits!r}")
        # [expert] -> [2, B, H_kv / g_e, capacity_e, d * bits / 8] uint8, and [..., d / group_size] floats
        self.codes: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        self.shifts: list[torch.Tensor] = []

    # ------------------------------------------------------------------ storage
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        dim = key_states.shape[-1]
        if self.group_size is None:
            self.group_size = default_group_size(dim)
        check_quant_layout(self.bits, self.group_size, dim)
        super().lazy_initialization(key_states, value_states)
        shapes = [buf.shape[:4] for buf in self.buffers]
        self.codes = [torch.zeros((*s, dim * self.bits // 8), dtype=torch.uint8, device=self.device) for s in shapes]
        self.scales = [key_states.new_zeros((*s, dim // self.group_size)) for s in shapes]
        self.shifts = [key_states.new_zeros((*s, dim // self.group_size)) for s in shapes]

    def _materialize(self) -> None:
        """The float buffers the parent's store and attention code reads: the dequantized stores."""
        self.buffers = [dequantize(c, s, z, self.bits) for c, s, z in zip(self.codes, self.scales, self.shifts)]
        self._views_valid = False

    def _release(self) -> None:
        """Drop the dequantized buffers (zero-capacity placeholders keep the parent's shapes)."""
        if self.is_initialized:
            self.buffers = [buf.new_zeros((*buf.shape[:3], 0, buf.shape[4])) for buf in self.buffers]  # no views
            self._views_valid = False

    def _grow_codes(self) -> None:
        """Match the code stores' capacity to the float buffers' after the parent grew them."""
        for e, buf in enumerate(self.buffers):
            extra = buf.shape[3] - self.codes[e].shape[3]
            if extra > 0:
                for name in ("codes", "scales", "shifts"):
                    old = getattr(self, name)[e]
                    pad = old.new_zeros((*old.shape[:3], extra, old.shape[4]))
                    getattr(self, name)[e] = torch.cat([old, pad], dim=3)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store the chunk (parent's ``update``) and quantize what it filled; attention then reads the stored values."""
        route = self.pending
        before, stored = None, None
        if self.is_initialized:
            self._materialize()
            before, stored = self.counts.clone(), self.ntok.clone()
        out = super().update(key_states, value_states, *args, **kwargs)
        if before is None:
            before, stored = torch.zeros_like(self.counts), torch.zeros_like(self.ntok)
        added = key_states.shape[2] if route.real is None else route.real.sum(dim=1)
        if bool((self.counts < before).any()) or bool((self.ntok != stored + added).any()):
            # Slots [before, counts) are the new tokens only if the parent appended without dropping any.
            raise RuntimeError("the mixSGA store dropped or moved tokens inside update; the quantized store "
                               "(mixsga/quantized_cache.py) must follow that change before it can be used")
        self._grow_codes()
        self._absorb(before)
        if route is not None and not route.decode:
            self._release()  # a full-sequence pass attends over the projected K/V, never over the stores
        return out

    def _absorb(self, before: torch.Tensor) -> None:
        """Quantize every expert's slots filled since ``before`` (counts ``[B, E]``) and store them dequantized."""
        for e in self.experts:
            cap = self.buffers[e].shape[3]
            slot = torch.arange(cap, device=self.device)
            new = (slot >= before[:, e : e + 1]) & (slot < self.counts[:, e : e + 1])  # [B, capacity]
            rows, cols = new.nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            values = self.buffers[e][:, rows, :, cols]  # [n, 2, H_kv / g_e, d]
            packed, scale, shift = quantize(values, self.bits, self.group_size)
            self.codes[e][:, rows, :, cols] = packed
            self.scales[e][:, rows, :, cols] = scale
            self.shifts[e][:, rows, :, cols] = shift
            self.buffers[e][:, rows, :, cols] = dequantize(packed, scale, shift, self.bits)

    def attend(self, *args, **kwargs) -> torch.Tensor:
        try:
            return super().attend(*args, **kwargs)
        finally:
            self._release()

    # ------------------------------------------------------------------ what it holds
    @property
    def stores(self) -> list[list[torch.Tensor]]:
        """Per sample and expert, the dequantized filled K/V ``[2, H_kv / g_e, n, d]`` (copies, not views)."""
        if not self.is_initialized:
            return []
        counts = self.counts.tolist()
        return [[dequantize(self.codes[e][:, b, :, :n], self.scales[e][:, b, :, :n], self.shifts[e][:, b, :, :n],
                            self.bits) for e, n in enumerate(row)] for b, row in enumerate(counts)]

    def token_bytes(self) -> list[int]:
        """Bytes one stored token of each expert costs in this layer (codes, scales, zero-points; no index)."""
        return [sum(2 * t.shape[2] * t.shape[4] * t.element_size() for t in (c, s, z))
                for c, s, z in zip(self.codes, self.scales, self.shifts)]

    def live_bytes(self) -> int:
        """Bytes of what is filled: every stored token's codes, scales and zero-points, plus its index byte."""
        if not self.is_initialized:
            return 0
        counts = self.counts.sum(dim=0).tolist()
        return sum(c * u for c, u in zip(counts, self.token_bytes())) + int(self.ntok.sum()) * INDEX_DTYPE.itemsize

    def reserved_bytes(self) -> int:
        """Bytes the preallocated stores hold (filled or not): codes, scales, zero-points, slot masks, index, counts."""
        if not self.is_initialized:
            return 0
        held = (*self.codes, *self.scales, *self.shifts, *self.biases, self.index_buf, self.counts, self.ntok)
        return sum(t.nbytes for t in held)

    def tensors(self) -> list[torch.Tensor]:
        if not self.is_initialized:
            return []
        return [*self.codes, *self.scales, *self.shifts, self.index_buf, self.counts, self.ntok]

    # ------------------------------------------------------------------ re-batching, devices, refusals
    def reset(self) -> None:
        super().reset()
        self.codes, self.scales, self.shifts = [], [], []

    def _move(self, device) -> None:
        if self.is_initialized:
            for name in ("codes", "scales", "shifts"):
                setattr(self, name, [t.to(device, non_blocking=True) for t in getattr(self, name)])
        super()._move(device)

    def _select_samples(self, order) -> None:
        order = torch.as_tensor(order, dtype=torch.long, device=self.counts.device)
        for name in ("codes", "scales", "shifts"):
            setattr(self, name, [t.index_select(1, order) for t in getattr(self, name)])
        super()._select_samples(order)

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("the quantized mixSGA cache stores codes: it does not evict, crop or rewrite keys")

    keep_tokens = set_keys = crop = _refuse


class QuantizedMixSGACache(MixSGACache):
    """A ``MixSGACache`` of :class:`QuantizedMixSGALayer` s (``kv_bytes``: codes, scales, zero-points, index)."""

    def __init__(self, config, bits: int, group_size: int | None = None, mixsga_config: MixSGAConfig | None = None,
                 decode_backend: str = "auto") -> None:
        super().__init__(config, mixsga_config, decode_backend)
        cfg = self.mixsga_config
        self.layers = [QuantizedMixSGALayer(cfg.group_sizes, cfg.active, bits, group_size, decode_backend)
                       for _ in self.layers]
        self.bits, self.group_size = int(bits), group_size

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("the quantized mixSGA cache cannot be rolled back (crop)")

    def keep_tokens(self, *args, **kwargs) -> None:
        raise NotImplementedError("the quantized mixSGA cache does not evict tokens")


__all__ = ["BITS", "QuantizedMixSGACache", "QuantizedMixSGALayer", "check_quant_layout", "default_group_size",
           "dequantize", "quantize", "quantized_mixsga_kv_bytes_per_token", "quantized_token_bytes"]

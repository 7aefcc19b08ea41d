"""KV-cache quantization (KIVI-style) through transformers' quantized cache layer and optimum-quanto.

:class:`QuantizedKVLayer` is ``transformers.cache_utils.QuantoQuantizedLayer`` (its
quanto quantizer, bit widths and checks) with one change to *when* tokens are
quantized, so that what a cache stores depends only on how many tokens it holds:

* The residual window: of ``N`` stored tokens per sample, the most recent
  ``N mod residual`` stay at full precision; every completed block of ``residual``
  tokens is quantized (KIVI's streaming scheme). ``residual = 0``: every token is
  quantized as it is stored. Upstream quantizes a whole prefill at once and then
  re-quantizes everything every ``residual`` decode steps, so its residual count
  depends on how the tokens arrived (prefill vs. decode), not on ``N`` alone.
* Quantization is per token (quanto's ``axis=0``, the upstream default): each
  token's K (and V) of each head is split into groups of ``group_size`` channels
  along ``head_dim``, each group with its own scale and zero-point (quanto's
  ``shift``) stored in the cache's float dtype. A group never spans tokens, so the
  bytes are a sum over tokens and a batch's samples stay independent.
* Codes are packed ``8 // bits`` per byte along the groups; the layout is checked
  (:func:`check_layout`) so that a token's groups fill whole bytes, otherwise
  packing would pad and the bytes would not be a per-token sum.
* Attention in a step sees the dequantized past plus the step's own tokens at
  full precision (as upstream; they are stored quantized after the step).

Stored bytes per sample, per layer, for K and for V alike (:func:`quantized_kv_bytes`),
with ``H`` K/V heads of ``D`` channels, ``s`` bytes per float, ``r = N mod residual``::

    (N - r) * H * (D * bits / 8 + 2 * s * D / group_size)  +  r * H * D * s

Every layer quantizes (sliding-window layers too: the mask still limits what
attention sees, the cache keeps every token, as the byte formula counts).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, QuantoQuantizedLayer

#: Bit widths of the codes (quanto's qint2 / qint4).
BITS = (2, 4)


def _whole(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_bits(bits: Any) -> int:
    """``bits`` if it is one of :data:`BITS`; ValueError otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)} (quanto's qint2 / qint4), got {bits!r}")
    return int(bits)


def check_layout(bits: int, group_size: int, kv_heads: int, head_dim: int) -> None:
    """ValueError unless groups tile ``head_dim`` and one token's codes fill whole bytes (no packing pad)."""
    check_bits(bits)
    _whole(group_size, "group_size", 1)
    if head_dim % group_size:
        raise ValueError(f"group_size {group_size} does not divide head_dim {head_dim}: a group would span tokens")
    per_byte = 8 // bits
    groups = kv_heads * head_dim // group_size
    if groups % per_byte:
        raise ValueError(f"{bits}-bit codes pack {per_byte} groups per byte, but a token has {groups} groups "
                         f"({kv_heads} K/V heads x {head_dim // group_size}); choose a smaller group_size")


def default_group_size(bits: int, kv_heads: int, head_dim: int) -> int:
    """The largest group of at most 64 channels (transformers' default) that :func:`check_layout` accepts."""
    for size in range(min(64, head_dim), 0, -1):
        try:
            check_layout(bits, size, kv_heads, head_dim)
        except ValueError:
            continue
        return size
    raise ValueError(f"no group size packs {bits}-bit codes of {kv_heads} K/V heads x {head_dim} channels")


def residual_tokens(tokens: int, residual: int) -> int:
    """Full-precision tokens of ``tokens`` stored ones: the last ``tokens mod residual`` (0 without a window)."""
    return tokens % residual if residual else 0


def quantized_kv_bytes(*, layers: int, kv_heads: int, head_dim: int, float_bytes: int, bits: int,
                       group_size: int, residual: int, tokens: int) -> int:
    """Stored K+V bytes of one sample holding ``tokens`` tokens (module docstring's formula, all layers)."""
    check_layout(bits, group_size, kv_heads, head_dim)
    full = residual_tokens(tokens, residual)
    codes = kv_heads * head_dim * bits // 8
    scales = 2 * float_bytes * kv_heads * (head_dim // group_size)  # one scale + one zero-point per group
    per_layer = (tokens - full) * (codes + scales) + full * kv_heads * head_dim * float_bytes
    return 2 * layers * per_layer  # K and V


def _stored_bytes(tensor: Any) -> int:
    """Bytes of a (quanto) tensor: its plain storage, or the sum over the inner tensors it flattens to."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is None:
        return int(tensor.nbytes)
    names, _ = tensor.__tensor_flatten__()
    return sum(_stored_bytes(getattr(tensor, name)) for name in names)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's ``unpack`` ("default" implementation): value ``i`` of each byte in the ``i``-th block of rows."""
    return torch.cat([(packed >> (bits * i)) & (2**bits - 1) for i in range(8 // bits)]).to(torch.uint8)


class QuantizedKVLayer(QuantoQuantizedLayer):
    """One layer's quantized K/V: quantized blocks plus the full-precision residual (module docstring)."""

    def __init__(self, bits: int = 4, group_size: int = 64, residual: int = 0):
        super().__init__(nbits=check_bits(bits), axis_key=0, axis_value=0, q_group_size=_whole(group_size,
                         "group_size", 1), residual_length=_whole(residual, "residual", 0))
        self.blocks: list[tuple[Any, Any]] = []  # quantized (keys, values) blocks, oldest first
        # The blocks' dequantized values, in one growing pair of buffers [B, H, capacity, D]: a block is
        # quantized once and never changes, so dequantizing each once gives the very values attention read
        # when every step dequantized every block (O(steps^2) unpacking; 230 s for one 16k-token run at
        # 1,024-token windows), and writing them into reserved room (capacity doubled when full) saves the
        # two whole-cache concatenations a step cost after that (a third of a run's time). A working copy
        # for attention, as transformers' QuantizedCache makes each step; ``kv_bytes`` counts the blocks.
        self._buf: tuple[torch.Tensor, torch.Tensor] | None = None
        self._filled = 0  # dequantized tokens at the front of the buffers
        # The newest block's dequantized K/V, written at the next update: until then the buffers hold the
        # full-precision tokens attention read this step (the current tokens attend to themselves unquantized).
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def _reserve(self, tokens: int, like: torch.Tensor) -> None:
        """Room for ``tokens`` in the buffers (doubling), keeping the dequantized front."""
        if self._buf is not None and self._buf[0].shape[-2] >= tokens:
            return
        capacity = tokens if self._buf is None else max(tokens, 2 * self._buf[0].shape[-2])
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        grown = (like.new_empty(shape), like.new_empty(shape))
        if self._buf is not None and self._filled:
            for new, old in zip(grown, self._buf):
                new[..., : self._filled, :] = old[..., : self._filled, :]
        self._buf = grown

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        if self._pending is not None:  # last step's attention is done: its block's tokens become dequantized
            n = self._pending[0].shape[-2]
            for buf, block in zip(self._buf, self._pending):
                buf[..., self._filled : self._filled + n, :] = block
            self._filled, self._pending = self._filled + n, None
        keys = torch.cat([self.keys, key_states], dim=-2) if self.keys.numel() else key_states
        values = torch.cat([self.values, value_states], dim=-2) if self.values.numel() else value_states
        total = self._filled + keys.shape[-2]
        self._reserve(total, keys)
        self._buf[0][..., self._filled : total, :] = keys
        self._buf[1][..., self._filled : total, :] = values
        out_k, out_v = self._buf[0][..., :total, :], self._buf[1][..., :total, :]
        done = keys.shape[-2] - residual_tokens(self.cumulative_length, self.residual_length)
        if done > 0:  # completed blocks leave the window, quantized
            block = (self._quantize(keys[..., :done, :].contiguous(), axis=self.axis_key),
                     self._quantize(values[..., :done, :].contiguous(), axis=self.axis_value))
            self.blocks.append(block)
            self._pending = (self._dequantize(block[0]), self._dequantize(block[1]))
            keys, values = keys[..., done:, :].clone(), values[..., done:, :].clone()  # no view of the old window
        self.keys, self.values = keys, values
        return out_k, out_v

    def _dequantize(self, qtensor):
        """quanto's dequantization (scale x codes - shift, ungrouped) with its pure-torch unpacking.

        ``qtensor.dequantize()`` unpacks through quanto's CPU kernel, which compiles C++ with ninja at
        first use; the suite must not need a compiler at run time, and the arithmetic is the same.
        """
        from optimum.quanto.tensor.grouped import ungroup

        packed = qtensor._data
        codes = _unpack(packed._data, packed.bits)[: packed.shape[0]]  # packing may add rows; quanto drops them
        return ungroup(qtensor._scale * codes - qtensor._shift, axis=qtensor.axis, orig_shape=qtensor.shape)

    def kv_bytes(self) -> int:
        """Stored bytes: packed codes, scales and zero-points of the blocks, and the full-precision residual."""
        if not self.is_initialized:
            return 0
        quantized = sum(_stored_bytes(k) + _stored_bytes(v) for k, v in self.blocks)
        return quantized + int(self.keys.nbytes) + int(self.values.nbytes)

    def reset(self) -> None:
        super().reset()
        self.blocks, self.cumulative_length = [], 0
        self._buf, self._filled, self._pending = None, 0, None

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("the quantized KV cache does not crop, reorder or select batch rows")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


class QuantizedKVCache(Cache):
    """A :class:`QuantizedKVLayer` per decoder layer of ``config`` (``kv_bytes``: the live stored bytes)."""

    def __init__(self, config, bits: int = 4, group_size: int = 64, residual: int = 0):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        super().__init__(layers=[QuantizedKVLayer(bits, group_size, residual)
                                 for _ in range(int(text.num_hidden_layers))])

    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes() for layer in self.layers)

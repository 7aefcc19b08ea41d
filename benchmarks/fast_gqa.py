"""The strongest GQA reference we can write here: a preallocated (static) K/V cache read by SDPA.

transformers' ``DynamicCache`` appends with ``torch.cat`` (a full copy of the layer's
K and V every step) and its ``StaticCache`` makes SDPA read the whole preallocated
length under a mask. ``StaticViewCache`` preallocates ``max_len`` slots per layer,
writes each chunk in place and hands attention a view of the filled prefix, so a
decode step copies one token and SDPA reads exactly the stored tokens. The model's
own SDPA attention runs unchanged (GQA heads via ``repeat_kv`` / ``enable_gqa`` as
transformers does); with ``--compile`` the benchmark compiles its attention the same
way as mixSGA's.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class StaticViewLayer(DynamicLayer):
    """One layer's preallocated K/V; ``keys`` / ``values`` are views of the filled prefix."""

    is_compileable = False

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.max_len = int(max_len)
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buf = key_states.new_zeros((batch, heads, self.max_len, dim))
        self.value_buf = value_states.new_zeros((batch, heads, self.max_len, value_states.shape[-1]))
        self.keys, self.values = self.key_buf[:, :, :0], self.value_buf[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        end = self.seen + q
        if end > self.max_len:
            raise ValueError(f"StaticViewCache holds {self.max_len} positions; got position {end}")
        self.key_buf[:, :, self.seen : end] = key_states
        self.value_buf[:, :, self.seen : end] = value_states
        self.seen = end
        self.keys, self.values = self.key_buf[:, :, :end], self.value_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buf = self.key_buf.repeat_interleave(repeats, dim=0)
            self.value_buf = self.value_buf.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self.key_buf[:, :, : self.seen], self.value_buf[:, :, : self.seen]

    def live_bytes(self) -> int:
        return 0 if not self.is_initialized else self.keys.nbytes + self.values.nbytes

    def reserved_bytes(self) -> int:
        return 0 if not self.is_initialized else self.key_buf.nbytes + self.value_buf.nbytes


class StaticViewCache(Cache):
    """A transformers ``Cache`` of ``StaticViewLayer``s (``max_len`` positions per layer)."""

    def __init__(self, config, max_len: int) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        super().__init__(layers=[StaticViewLayer(max_len) for _ in range(int(text.num_hidden_layers))])

    def kv_bytes(self) -> int:
        """Bytes of the filled K/V (what a DynamicCache of the same tokens would hold)."""
        return sum(layer.live_bytes() for layer in self.layers)

    def reserved_bytes(self) -> int:
        return sum(layer.reserved_bytes() for layer in self.layers)

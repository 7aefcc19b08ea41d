"""The per-expert KV cache (preallocated stores) and the decode attention that reads it.

Layout (per layer): for every expert e one preallocated buffer
``[2, B, H_kv / g_e, capacity_e, d]`` (K at ``[0]``, V at ``[1]``: pooled and
written with one op each), per-sample fill counts ``counts`` ``[B, E]`` (device),
and the per-token ``uint8`` expert index ``[B, capacity_tokens]`` with per-sample
lengths ``ntok`` ``[B]``. Sample b's tokens routed to e are, in token order, the
first ``counts[b, e]`` slots of e's buffer. Padding is never stored.

Capacity grows geometrically (x ``GROWTH``, rounded up to ``PAGE`` slots), never per
token. A decode step writes every sample's pooled K/V into slot ``counts[b, e]`` of
*every* expert's buffer (one ``scatter_`` per expert, the same for every sample),
then advances only the count of the expert the sample was routed to: the writes to
other experts land beyond their fill and are overwritten later. So appends need no
Python loop over samples and no host read of the expert ids; routing stays on the
device. The host keeps only upper bounds of the fills (each step adds at most one
token per expert), and reads the true fills once per capacity growth.

Bytes: ``kv_bytes()`` is what is *filled* (the ledger's figure for the realised
routing, ``mixsga.budget.mixsga_kv_bytes_for_counts``: pooled K/V plus one index byte
per stored token); ``reserved_bytes()`` is what the buffers hold, like a paged
cache's allocated pages.

Decode attention (``mixsga.kernels.decode_attention``) is one batched step per
layer: per-expert logits over each store's filled slots (length masks), the exact
log-sum-exp merge of the per-expert partials, the value merge; never re-expanding
heads. Gemma 2 soft-capping is applied to the logits. For a sliding-window layer
the window's tokens are the tail of each store: per sample, the expert index's
last W entries say how many each expert holds (computed on the device). Sliding
layers store at most the window, as ``DynamicSlidingWindowLayer`` does: after each
layer's attention (``trim_window``, called by the attention function) every sample
keeps only its last ``W - 1`` tokens (``kvledger.layer_windows``), the stores shifted
down in place (one gather per expert, on the device; nothing on full-attention
layers), so live bytes count what the base model's cache stores there too and a
full-window layer cannot be cropped. Backends: ``"torch"`` (eager), ``"compiled"``
(``torch.compile`` of the same code), ``"triton"`` (the fused kernel; the default on
CUDA when Triton is installed).

CPU batch-1 fast path (``MixSGALayer._host_fast``: a CPU cache holding one sample;
``MixSGALayer.host_fast_path = False`` turns it off). On a CPU the "device" is host
memory, so reading a small tensor costs one op, not a synchronisation; at batch 1 the
per-op dispatch cost, not bytes, decides the step time. There the step reads the
token's expert id on the host (``int(expert)``) and keeps sample 0's fills and expert
index exact on the host (``_exact``: read once, dropped by every other mutation and
tied to ``seen``, so an append by other code retires them), writes the token only
into its expert's store (K and V in one ``stack(out=)`` / ``mean(out=)``, one
slot-mask write; the other experts are untouched), trims sliding windows from the
host index (only the store that lost a token is shifted, only its filled part), and
attends with ``decode_attention_static`` (query, logits and probabilities in
preallocated scratch, views fixed until the next growth): about 25 ops per layer and
step beyond the model's own, where the batched step issues about 60
(``benchmarks.decode_profile``). The stores, masks, counts and index it leaves are
the batched step's; the scratch (``[1, H_q, sum_e capacity_e]`` x 2 plus the query)
is workspace, not counted in ``reserved_bytes``. CUDA, batch > 1, padding tokens and
observers take the batched device-side path.

Multi-token chunks on a non-empty cache (chunked prefill) loop over samples; they
are not the decode hot path.

Token eviction can be stacked on top: ``MixSGACache.set_observer`` hands a policy
each chunk's attention probabilities over the stored tokens in token order (prefill
and decode), and ``MixSGACache.keep_tokens`` drops tokens from every expert store
given a keep mask or keep indices in token order (``mixsga.eviction`` builds
budgeted eviction on these two). A decode step can be observed for the whole batch
at once (``MixSGALayer.batch_observer``: ``[B, H_q, N]`` token-order probabilities
from one gather) and compacted at once (``MixSGALayer.keep_tokens_batch``: per expert
one stable sort of the slots). Sliding-window decode after eviction counts the last
W *kept* tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvledger import layer_windows
from mixsga.config import MixSGAConfig
from mixsga.experts import pool_heads
from mixsga.kernels import decode_attention, resolve_backend
from mixsga.kernels.torch_decode import decode_attention_biased, decode_attention_static, decode_attention_torch

INDEX_DTYPE = torch.uint8
GROWTH = 1.125  # capacity grows by this factor (at most 12.5 % of slots reserved but empty) ...
PAGE = 64  # ... rounded up to whole pages of this many slots


@functools.lru_cache(maxsize=1)
def _compiled_biased():
    # Shapes only change at capacity growth; dynamic=True keeps one graph across growths.
    return torch.compile(decode_attention_biased, dynamic=True, fullgraph=True)


@dataclass
class Route:
    """The routing decision of one attention layer for the current chunk (device tensors only)."""

    expert: torch.Tensor  # [B, q] long
    real: torch.Tensor | None  # [B, q] bool, None = every token real
    decode: bool  # the chunk continues a non-empty cache (argmax routing, compact attention)
    cache_layer: "MixSGALayer | None" = None


class MixSGALayer(CacheLayerMixin):
    """One layer's preallocated per-expert stores (see the module docstring)."""

    is_sliding = False
    #: Take the CPU batch-1 fast path (module docstring); False forces the batched device-side step.
    host_fast_path = True
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, group_sizes: Sequence[int], active: Sequence[bool], decode_backend: str = "auto",
                 window_keep: int | None = None) -> None:
        super().__init__()
        # Sliding-window layer: tokens kept between forward passes (W - 1); None: every token.
        self.window_keep = window_keep
        self._trimmed = False  # tokens left the window: older positions are gone (no crop)
        self.group_sizes = tuple(int(g) for g in group_sizes)
        self.active = tuple(bool(a) for a in active)
        self.experts = [e for e, a in enumerate(self.active) if a]
        self.decode_backend = decode_backend
        self.buffers: list[torch.Tensor] = []  # [expert] -> [2, B, H_kv / g_e, capacity_e, d]
        # [expert] -> [B, H_kv / g_e, capacity_e]: 0 on filled slots, -inf elsewhere; the decode step
        # adds it to the logits (inside baddbmm) instead of building length masks. Repeated per
        # pooled head so that it is one broadcast operand (1 / (2 d) of the K/V; reserved, not live).
        self.biases: list[torch.Tensor] = []
        self.counts: torch.Tensor | None = None  # [B, E] long: filled slots per sample and expert
        self.index_buf: torch.Tensor | None = None  # [B, capacity_tokens] uint8
        self.ntok: torch.Tensor | None = None  # [B] long: stored tokens per sample
        self._bound: list[int] = []  # host upper bound of counts[:, e].max()
        self._tok_bound = 0  # host upper bound of ntok.max()
        self.seen = 0  # positions processed, padding included (drives positions and masks)
        self.pending: Route | None = None
        # Optional ``observer(layer, sample, probs)``: attention probabilities ``[H_q, q_b, n_b]``
        # of the sample's real chunk queries over its stored tokens in token order (set by
        # ``MixSGACache.set_observer``; token-eviction policies score tokens with it).
        self.observer = None
        # Optional ``batch_observer(layer, probs)``: a whole decode step at once, ``probs``
        # ``[B, H_q, N]`` in token order (zero past each sample's stored tokens; N >= every
        # sample's count). Set beside ``observer``, it replaces the per-sample calls of a decode step.
        self.batch_observer = None
        self.layer_idx = -1
        # CPU batch-1 fast path (module docstring): host copies of counts[0] and of the sample's
        # expert index (its length is ntok[0]), exact while not None; every other path that changes
        # the fills drops them. ``_exact_at``: the ``seen`` they hold for; a step that reaches the
        # stores another way (e.g. a subclass's own append) advances ``seen`` and so retires them.
        self._exact: tuple[list[int], list[int]] | None = None
        self._exact_at = -1

    # ------------------------------------------------------------------ storage
    @property
    def batch_size(self) -> int:
        return 0 if self.counts is None else int(self.counts.shape[0])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        if value_states.shape[-1] != dim:
            raise ValueError(
                f"mixSGA stores K and V together and needs equal head sizes, got {dim} and {value_states.shape[-1]}"
            )
        bad = [g for g in self.group_sizes if heads % g]
        if bad:
            raise ValueError(f"group sizes {tuple(bad)} do not divide the layer's {heads} KV heads")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_kv_heads, self.head_dim = heads, dim
        self.buffers = [key_states.new_zeros((2, batch, heads // g, 0, dim)) for g in self.group_sizes]
        self.biases = [key_states.new_zeros((batch, heads // g, 0)) for g in self.group_sizes]
        # One matmul pools a token's K/V to every expert's granularity: rows of ``pool`` are the
        # experts' pooled heads (mean weights 1/g over contiguous groups), stacked.
        rows, self._pool_rows = [], []
        for g in self.group_sizes:
            start = sum(r.shape[0] for r in rows)
            rows.append(torch.kron(torch.eye(heads // g), torch.full((1, g), 1.0 / g)))
            self._pool_rows.append((start, start + heads // g))
        self._pool = torch.cat(rows).to(device=self.device, dtype=self.dtype)
        self._views_valid = False
        self._exact = None
        # _step_bias[e_routed, e]: the bias a decode step writes into expert e's next slot
        self._step_bias = torch.where(
            torch.eye(len(self.group_sizes), dtype=torch.bool), 0.0, float("-inf")
        ).to(device=self.device, dtype=self.dtype)
        self.counts = torch.zeros((batch, len(self.group_sizes)), dtype=torch.long, device=self.device)
        self.index_buf = torch.zeros((batch, 0), dtype=INDEX_DTYPE, device=self.device)
        self.ntok = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._ones = torch.ones((batch, 1), dtype=torch.long, device=self.device)
        # counts += _units[e]: the fast path's count update in one op
        self._units = list(torch.eye(len(self.group_sizes), dtype=torch.long, device=self.device).unbind(0))
        self._bound = [0] * len(self.group_sizes)
        self._tok_bound = 0
        self._backend = resolve_backend(self.decode_backend, self.device)
        self.is_initialized = True

    @staticmethod
    def _grown(capacity: int, need: int) -> int:
        return -(-max(need, int(capacity * GROWTH)) // PAGE) * PAGE

    def _reserve(self, e: int, need: int) -> None:
        """Make expert ``e``'s buffer hold ``need`` slots per sample (geometric growth, whole pages)."""
        buf = self.buffers[e]
        capacity = buf.shape[3]
        if need <= capacity:
            return
        grown = self._grown(capacity, need)
        new = buf.new_zeros((*buf.shape[:3], grown, buf.shape[4]))
        new[:, :, :, :capacity] = buf
        self.buffers[e] = new
        bias = self.biases[e].new_full((*buf.shape[1:3], grown), float("-inf"))
        bias[:, :, :capacity] = self.biases[e]
        self.biases[e] = bias
        self._views_valid = False

    def _refresh_views(self) -> None:
        """Views the decode step reuses until the next growth or re-batching (views cost ops too)."""
        batch = self.batch_size
        self._k_t, self._v, self._bias3, self._slot3, self._slot5 = [], [], [], [], []
        for e, (buf, bias) in enumerate(zip(self.buffers, self.biases)):
            _, _, heads, cap, dim = buf.shape
            self._k_t.append(buf[0].view(batch * heads, cap, dim).transpose(1, 2))
            self._v.append(buf[1].view(batch * heads, cap, dim))
            self._bias3.append(bias.view(batch * heads, 1, cap))
            column = self.counts[:, e : e + 1]
            self._slot3.append(column.view(batch, 1, 1).expand(batch, heads, 1))
            self._slot5.append(column.view(1, batch, 1, 1, 1).expand(2, batch, heads, 1, dim))
        self._tok_slot = self.ntok.view(batch, 1)
        self._scratch = None  # the fast path's, rebuilt for the new capacities on its next step
        self._views_valid = True

    @property
    def _host_fast(self) -> bool:
        """Whether decode steps take the CPU batch-1 fast path (module docstring)."""
        return self.host_fast_path and self.device.type == "cpu" and self.batch_size == 1

    def _refresh_scratch(self, heads_q: int) -> None:
        """The fast path's attention scratch and its per-expert views, for the current capacities."""
        caps = [self.buffers[e].shape[3] for e in self.experts]
        query = torch.empty((1, heads_q, self.head_dim), dtype=self.dtype, device=self.device)
        scores = torch.empty((1, heads_q, sum(caps)), dtype=self.dtype, device=self.device)
        probs = torch.empty_like(scores)
        self._scratch = (query, scores, probs)
        self._q_views, self._s_views, self._p_views = [], [], []
        start = 0
        for e, cap in zip(self.experts, caps):
            pooled = self.buffers[e].shape[2]
            self._q_views.append(query.view(pooled, heads_q // pooled, self.head_dim))
            self._s_views.append(scores[..., start : start + cap].view(heads_q, cap).unflatten(0, (pooled, -1)))
            self._p_views.append(probs[..., start : start + cap].view(heads_q, cap).unflatten(0, (pooled, -1)))
            start += cap

    def _reserve_tokens(self, need: int) -> None:
        capacity = self.index_buf.shape[1]
        if need <= capacity:
            return
        new = self.index_buf.new_zeros((self.index_buf.shape[0], self._grown(capacity, need)))
        new[:, :capacity] = self.index_buf
        self.index_buf = new

    def _store(self, b: int, e: int, n: int | None = None) -> torch.Tensor:
        """Sample ``b``'s filled part of expert ``e``'s store, ``[2, H_kv / g_e, n, d]`` (a view)."""
        if n is None:
            n = int(self.counts[b, e])
        return self.buffers[e][:, b, :, :n]

    # ------------------------------------------------------------------ transformers' layer API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's K/V at each token's expert granularity; return the inputs unchanged."""
        route, self.pending = self.pending, None
        if route is None:
            raise RuntimeError(
                "MixSGACache.update called without a routing decision; use it with a model "
                "converted by mixsga.convert_to_mixsga"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, q, _ = key_states.shape
        if batch != self.batch_size:
            raise ValueError(f"cache holds {self.batch_size} samples but got a batch of {batch}")
        if q == 1:
            self._append_step(key_states, value_states, route.expert, route.real)
        else:
            self._append_chunk(key_states, value_states, route.expert, route.real)
        self.seen += q
        return key_states, value_states

    def _append_step(
        self, k: torch.Tensor, v: torch.Tensor, expert: torch.Tensor, real: torch.Tensor | None
    ) -> None:
        """Append one token per sample (``k``, ``v``: ``[B, H_kv, 1, d]``): index writes, no host read.

        (The CPU batch-1 fast path reads the expert id on the host: module docstring.)
        """
        batch = k.shape[0]
        if real is None and self._host_fast:
            self._append_step_host(k, v, expert)
            return
        self._exact = None
        # [2, B, 1, H_kv, d] @ pool^T -> every expert's pooled heads at once
        pooled = torch.matmul(self._pool, torch.stack((k, v)).view(2, batch, self.num_kv_heads, -1))
        ids = expert.view(batch, 1)
        bias = self._step_bias[ids.view(batch)]  # [B, E]
        if real is not None:
            bias = bias.masked_fill(~real.view(batch, 1), float("-inf"))
        for e in self.experts:
            if self._bound[e] >= self.buffers[e].shape[3]:
                # The host bound is loose after decode steps: read the true fill (once per growth)
                # and leave at least a page of room, so that the next read is a page of steps away.
                self._bound[e] = int(self.counts[:, e].max())
                self._reserve(e, self._bound[e] + PAGE)
        if not self._views_valid:
            self._refresh_views()
        for e in self.experts:
            lo, hi = self._pool_rows[e]
            self.buffers[e].scatter_(3, self._slot5[e], pooled[:, :, lo:hi].unsqueeze(3))
            self.biases[e].scatter_(2, self._slot3[e], bias[:, e : e + 1, None].expand(self._slot3[e].shape))
            self._bound[e] += 1
        self._reserve_tokens(self._tok_bound + 1)
        self.index_buf.scatter_(1, self._tok_slot, ids.to(INDEX_DTYPE))
        if real is None:
            self.counts.scatter_add_(1, ids, self._ones[:batch])
            self.ntok += 1
        else:
            step = real.view(batch, 1).long()
            self.counts.scatter_add_(1, ids, step)
            self.ntok += step.view(batch)
        self._tok_bound += 1

    def _append_step_host(self, k: torch.Tensor, v: torch.Tensor, expert: torch.Tensor) -> None:
        """CPU, one sample: write the token only into its expert's store, at the host-known fill."""
        e = int(expert)  # a CPU tensor: host memory, one op
        counts, index = self._host_fills()
        n, ntok = counts[e], len(index)
        if n >= self.buffers[e].shape[3]:
            self._bound[e] = n
            self._reserve(e, n + PAGE)
        if not self._views_valid:
            self._refresh_views()
        g = self.group_sizes[e]
        if g == 1:  # K and V straight into slot n: one op
            torch.stack((k, v), out=self.buffers[e].narrow(3, n, 1))
        else:  # the mean over each group of heads, as pool_heads (the full forward's pooling)
            kv = torch.stack((k, v)).view(2, 1, self.num_kv_heads // g, g, self.head_dim)
            torch.mean(kv, 3, out=self.buffers[e].select(3, n))
        self._bias3[e].select(2, n).fill_(0.0)
        self._reserve_tokens(ntok + 1)
        self.index_buf.select(1, ntok).fill_(e)
        self.counts.add_(self._units[e])
        self.ntok.add_(1)
        counts[e] = n + 1
        index.append(e)
        self._exact_at = self.seen + 1  # ``update`` advances ``seen`` by this token next
        self._bound[e] = max(self._bound[e], n + 1)
        self._tok_bound = max(self._tok_bound, ntok + 1)

    def _host_fills(self) -> tuple[list[int], list[int]]:
        """The fast path's host copies of sample 0's fills and expert index (read once, then kept exact)."""
        if self._exact is None or self._exact_at != self.seen:
            self._exact = (self.counts[0].tolist(), self.index_buf[0, : int(self.ntok[0])].tolist())
            self._exact_at = self.seen
        return self._exact

    def _append_chunk(
        self, k: torch.Tensor, v: torch.Tensor, expert: torch.Tensor, real: torch.Tensor | None
    ) -> None:
        """Append a chunk (``k``, ``v``: ``[B, H_kv, q, d]``), each real token to its expert's store."""
        batch, _, q, _ = k.shape
        self._exact = None
        kv = torch.stack((k, v))  # [2, B, H_kv, q, d]
        real = torch.ones((batch, q), dtype=torch.bool, device=k.device) if real is None else real
        for e in self.experts:
            hit = (expert == e) & real
            new = hit.sum(dim=1)
            pos = self.counts[:, e : e + 1] + hit.long().cumsum(dim=1) - 1
            total = self.counts[:, e] + new
            top = int(total.max()) if batch else 0
            self._reserve(e, top)
            rows, cols = hit.nonzero(as_tuple=True)
            if rows.numel():
                pooled = pool_heads(kv, self.group_sizes[e])
                self.buffers[e][:, rows, :, pos[rows, cols]] = pooled[:, rows, :, cols]
                self.biases[e][rows, :, pos[rows, cols]] = 0.0
            self.counts[:, e] = total
            self._bound[e] = top
        pos = self.ntok[:, None] + real.long().cumsum(dim=1) - 1
        ntok = self.ntok + real.sum(dim=1)
        top = int(ntok.max()) if batch else 0
        self._reserve_tokens(top)
        rows, cols = real.nonzero(as_tuple=True)
        self.index_buf[rows, pos[rows, cols]] = expert[rows, cols].to(INDEX_DTYPE)
        self.ntok.copy_(ntok)
        self._tok_bound = top

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.buffers, self.biases, self.counts, self.index_buf, self.ntok = [], [], None, None, None
        self._bound, self._tok_bound = [], 0
        self.seen, self.pending, self.is_initialized, self._trimmed = 0, None, False, False
        self._exact, self._views_valid = None, False

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move(self.device)

    def _move(self, device) -> None:
        if not self.is_initialized:
            return
        self.buffers = [t.to(device, non_blocking=True) for t in self.buffers]
        self.biases = [t.to(device, non_blocking=True) for t in self.biases]
        self._pool = self._pool.to(device, non_blocking=True)
        self._step_bias = self._step_bias.to(device, non_blocking=True)
        self._ones = self._ones.to(device, non_blocking=True)
        self._units = [u.to(device, non_blocking=True) for u in self._units]
        self.counts = self.counts.to(device, non_blocking=True)
        self.index_buf = self.index_buf.to(device, non_blocking=True)
        self.ntok = self.ntok.to(device, non_blocking=True)
        self._views_valid = False

    def _select_samples(self, order: Sequence[int] | torch.Tensor) -> None:
        order = torch.as_tensor(order, dtype=torch.long, device=self.counts.device)
        self._exact = None
        self.buffers = [t.index_select(1, order) for t in self.buffers]
        self.biases = [t.index_select(0, order) for t in self.biases]
        self._ones = torch.ones((order.numel(), 1), dtype=torch.long, device=self.counts.device)
        self.counts = self.counts.index_select(0, order)
        self.index_buf = self.index_buf.index_select(0, order)
        self.ntok = self.ntok.index_select(0, order)
        self._views_valid = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_samples(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_samples([i for i in range(self.batch_size) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_samples(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative), or keep the first ``tokens_to_remove`` positions."""
        drop = -tokens_to_remove if tokens_to_remove < 0 else max(self.seen - tokens_to_remove, 0)
        if drop == 0 or not self.is_initialized:
            return
        if self._trimmed:
            raise RuntimeError("a sliding-window mixSGA layer cannot be cropped once tokens left its window "
                               "(as DynamicSlidingWindowLayer): the older tokens are gone")
        for b in range(self.batch_size):
            n = self.num_tokens(b)
            keep = torch.ones(n, dtype=torch.bool, device=self.device)
            keep[max(n - drop, 0):] = False
            self.keep_tokens(keep, sample=b)
        self.seen -= drop

    def trim_window(self) -> None:
        """On a sliding-window layer, keep only every sample's last ``window_keep`` stored tokens.

        Called after the layer's attention (the next query is the window's last token). In
        place, on the device: per expert one gather shifts each sample's store down by the
        number of its oldest tokens that left; buffers (and the decode step's views) stay.
        """
        keep = self.window_keep
        if keep is None or not self.is_initialized or self._tok_bound <= keep:
            return
        if self._host_fast:
            self._trim_window_host(keep)
            return
        self._exact = None
        batch, n, experts = self.batch_size, self._tok_bound, len(self.group_sizes)
        drop = (self.ntok - keep).clamp_min(0)  # [B]: each sample's oldest tokens to drop
        old = torch.arange(n, device=self.device) < drop[:, None]
        idx = self.index_buf[:, :n].long().masked_fill(~old, experts)
        gone = torch.zeros((batch, experts + 1), dtype=torch.long, device=self.device)
        gone = gone.scatter_add_(1, idx, torch.ones_like(idx))[:, :experts]  # [B, E]
        for e in self.experts:
            buf = self.buffers[e]
            cap = buf.shape[3]
            # Only the first `_bound[e]` slots (the host's upper bound of the fills) can hold tokens:
            # shift and re-mask those, not the whole capacity (prefill may have grown it far beyond
            # the window; copying all of it was most of a batched sliding layer's step).
            lim = min(self._bound[e], cap)
            if lim == 0:
                continue
            src = (torch.arange(lim, device=self.device) + gone[:, e : e + 1]).clamp_max(cap - 1)  # [B, lim]
            self._gather_slots(e, src, self.counts[:, e] - gone[:, e])
        self.counts -= gone
        cap = self.index_buf.shape[1]
        src = (torch.arange(n, device=self.device) + drop[:, None]).clamp_max(cap - 1)
        self.index_buf[:, :n].copy_(self.index_buf.gather(1, src))
        self.ntok -= drop
        # no sample holds more than `keep` tokens now, in any expert: tighter host bounds, so a
        # windowed store never grows (nor reads its fills back) once it holds a window and a page
        self._tok_bound = keep
        self._bound = [min(bound, keep) for bound in self._bound]
        self._trimmed = True

    def _trim_window_host(self, keep: int) -> None:
        """``trim_window`` on the CPU batch-1 fast path: the host index says which stores lose tokens.

        Only the stores that lose tokens are shifted, and only their filled part (a decode
        step drops one token: one store), instead of a gather over every store's capacity.
        """
        counts, index = self._host_fills()
        drop = len(index) - keep
        if drop > 0:
            gone = [0] * len(self.group_sizes)
            for e in index[:drop]:
                gone[e] += 1
            for e in self.experts:
                g = gone[e]
                if g == 0:
                    continue
                buf, left = self.buffers[e], counts[e] - g
                if left:
                    buf.narrow(3, 0, left).copy_(buf.narrow(3, g, left).clone())
                self.biases[e].narrow(2, left, g).fill_(float("-inf"))
                self.counts.sub_(self._units[e] if g == 1 else self._units[e] * g)
                counts[e] = left
            self.index_buf.narrow(1, 0, keep).copy_(self.index_buf.narrow(1, drop, keep).clone())
            self.ntok.sub_(drop)
            del index[:drop]
        self._tok_bound = keep
        self._bound = [min(bound, keep) for bound in self._bound]
        self._trimmed = True

    # ------------------------------------------------------------------ mixSGA API
    @property
    def index(self) -> list[torch.Tensor]:
        """Per sample, the expert index of its stored tokens in token order (views, uint8)."""
        if not self.is_initialized:
            return []
        return [self.index_buf[b, :n] for b, n in enumerate(self.ntok.tolist())]

    def sample_index(self, sample: int) -> torch.Tensor:
        """One sample's ``index`` entry (a view), without building every sample's."""
        if not self.is_initialized:
            raise IndexError(f"sample {sample}: the layer stores nothing yet")
        return self.index_buf[sample, : int(self.ntok[sample])]

    @property
    def stores(self) -> list[list[torch.Tensor]]:
        """Per sample and expert, the filled K/V ``[2, H_kv / g_e, n, d]`` (views into the buffers)."""
        if not self.is_initialized:
            return []
        counts = self.counts.tolist()
        return [[self._store(b, e, n) for e, n in enumerate(row)] for b, row in enumerate(counts)]

    @property
    def key_stores(self) -> list[list[torch.Tensor]]:
        """Per sample and expert, the pooled keys ``[H_kv / g_e, n, d]`` (views into the stores)."""
        return [[s[0] for s in row] for row in self.stores]

    @property
    def value_stores(self) -> list[list[torch.Tensor]]:
        """Per sample and expert, the pooled values ``[H_kv / g_e, n, d]`` (views into the stores)."""
        return [[s[1] for s in row] for row in self.stores]

    def set_keys(self, sample: int, expert: int, keys: torch.Tensor) -> None:
        """Overwrite the filled keys of one sample's expert store (e.g. re-rotated by eviction)."""
        n = int(self.counts[sample, expert])
        if keys.shape != (self.num_kv_heads // self.group_sizes[expert], n, self.head_dim):
            raise ValueError(f"keys of shape {tuple(keys.shape)} do not fit the store's {n} tokens")
        self.buffers[expert][0, sample, :, :n] = keys

    def keep_tokens(self, keep: torch.Tensor, sample: int = 0) -> None:
        """Keep only some stored tokens of one sample, in every expert store.

        ``keep`` is a bool mask over the sample's stored tokens in token order
        (length = ``num_tokens(sample)``) or a 1-D tensor of token indices. Positions
        (``get_seq_length``) are unchanged, as for any token-eviction cache.
        """
        idx = self.sample_index(sample)
        n = idx.numel()
        keep = torch.as_tensor(keep, device=idx.device)
        if keep.dtype != torch.bool:
            mask = torch.zeros(n, dtype=torch.bool, device=idx.device)
            if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n):
                raise ValueError(f"keep indices must lie in [0, {n}), got {keep.tolist()}")
            mask[keep.long()] = True
            keep = mask
        elif keep.shape != (n,):
            raise ValueError(f"keep mask must have shape ({n},), got {tuple(keep.shape)}")
        self._exact = None
        for e in self.experts:
            sel = keep[idx == e]
            kept = self._store(sample, e, sel.numel())[:, :, sel]
            self.buffers[e][:, sample, :, : kept.shape[2]] = kept
            self.biases[e][sample, :, : kept.shape[2]] = 0.0
            self.biases[e][sample, :, kept.shape[2] :] = float("-inf")
            self.counts[sample, e] = kept.shape[2]
        kept_idx = idx[keep]
        self.index_buf[sample, : kept_idx.numel()] = kept_idx
        self.ntok[sample] = kept_idx.numel()

    def keep_tokens_batch(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep_tokens`` for every sample at once: ``keep`` ``[B, N]`` bool in token order.

        ``N`` must cover every sample's stored tokens (columns past a sample's count are
        ignored). On the device: per expert one stable sort moves each sample's kept slots
        to the front of its store, in order; the host bounds stay upper bounds. Returns the
        token-order permutation applied, ``[B, n]`` (kept tokens first, in order; ``n`` the
        host bound of the stored tokens), for bookkeeping aligned with the index.
        """
        batch, width = keep.shape
        if batch != self.batch_size or width < self._tok_bound:
            raise ValueError(f"keep mask of shape {tuple(keep.shape)} does not cover the stores' "
                             f"{self.batch_size} samples x {self._tok_bound} tokens")
        self._exact = None
        n = self._tok_bound
        stored = torch.arange(n, device=self.device) < self.ntok[:, None]
        keep = keep[:, :n] & stored
        for e in self.experts:
            kept = self.expert_slots(e, keep, stored)
            if kept.shape[1] == 0:
                continue
            count = kept.sum(1)
            self._gather_slots(e, torch.argsort((~kept).to(torch.uint8), dim=1, stable=True), count)
            self.counts[:, e] = count
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)
        self.index_buf[:, :n].copy_(self.index_buf[:, :n].gather(1, order))
        self.ntok.copy_(keep.sum(1))
        return order

    def _gather_slots(self, e: int, src: torch.Tensor, count: torch.Tensor) -> None:
        """Expert ``e``'s first ``lim`` slots of every sample read from its slots ``src`` ``[B, lim]``
        (one gather, in place); slots ``[0, count[b])`` are marked filled, the rest empty."""
        buf = self.buffers[e]
        batch, lim = src.shape
        shape = (2, batch, buf.shape[2], lim, buf.shape[4])
        buf[:, :, :, :lim].copy_(buf.gather(3, src.view(1, batch, 1, lim, 1).expand(shape)))
        filled = torch.arange(lim, device=self.device) < count[:, None]
        bias = torch.zeros(filled.shape, dtype=self.dtype, device=self.device).masked_fill_(~filled, float("-inf"))
        self.biases[e][:, :, :lim].copy_(bias[:, None, :].expand(batch, buf.shape[2], lim))

    def expert_slots(self, e: int, values: torch.Tensor, tokens: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Per-token ``values`` ``[b, N]`` (token order) moved to expert ``e``'s store slots, ``[b, lim]``.

        ``tokens`` ``[b, N]`` marks the tokens to move (each sample's stored ones, or fewer);
        slots no marked token of ``e`` fills hold zero. ``lim`` is the host bound of ``e``'s
        fills; ``rows`` selects samples.
        """
        lim = min(self._bound[e], self.buffers[e].shape[3])
        mine = (self.index_buf[rows, : values.shape[1]].long() == e) & tokens
        slot = torch.where(mine, mine.long().cumsum(1) - 1, lim)  # the token's slot; others to a spare column
        out = values.new_zeros((values.shape[0], lim + 1))
        return out.scatter_(1, slot, torch.where(mine, values, values.new_zeros(())))[:, :lim]

    def num_tokens(self, sample: int = 0) -> int:
        return int(self.ntok[sample]) if self.is_initialized else 0

    def expert_counts(self) -> list[int]:
        """Stored tokens per expert, summed over samples."""
        if not self.is_initialized:
            return [0] * len(self.group_sizes)
        return self.counts.sum(dim=0).tolist()

    def live_bytes(self) -> int:
        """Bytes of what is filled: pooled K/V of every stored token plus its index byte."""
        if not self.is_initialized:
            return 0
        unit = 2 * self.head_dim * self.buffers[0].element_size()
        per_expert = [unit * (self.num_kv_heads // g) for g in self.group_sizes]
        counts = self.counts.sum(dim=0).tolist()
        return sum(c * p for c, p in zip(counts, per_expert)) + int(self.ntok.sum()) * INDEX_DTYPE.itemsize

    def reserved_bytes(self) -> int:
        """Bytes the preallocated buffers hold (filled or not): K/V, slot masks, index, fill counters."""
        if not self.is_initialized:
            return 0
        return sum(t.nbytes for t in (*self.buffers, *self.biases, self.index_buf, self.counts, self.ntok))

    def tensors(self) -> list[torch.Tensor]:
        return [] if not self.is_initialized else [*self.buffers, self.index_buf, self.counts, self.ntok]

    # ------------------------------------------------------------------ attention
    def attend(
        self,
        query: torch.Tensor,
        route: Route,
        scaling: float,
        softcap: float | None = None,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Attention of the chunk's queries ``[B, H_q, q, d]`` over the compact stores.

        The stores already hold the chunk (``update`` ran first). Returns
        ``[B, q, H_q, d]``; padded query rows are zero.
        """
        batch, heads, q, dim = query.shape
        if q == 1:
            out = self._decode_step(query.view(batch, heads, dim), scaling, softcap, sliding_window)
            if route.real is not None:
                out = torch.where(route.real.view(batch, 1, 1), out, 0)
            return out.view(batch, 1, heads, dim)
        out = query.new_zeros(batch, heads, q, dim)
        for b in range(batch):
            real = torch.arange(q, device=query.device) if route.real is None else route.real[b].nonzero().squeeze(1)
            if real.numel() == 0:
                continue
            n = self.num_tokens(b)
            qpos = torch.arange(n - real.numel(), n, device=query.device)
            out[b, :, real] = self._attend_chunk(b, query[b][:, real], scaling, softcap, sliding_window, qpos)
        return out.transpose(1, 2)

    def _window_starts(self, window: int | None) -> torch.Tensor | None:
        """Per sample and expert, the first store slot inside the last ``window`` stored tokens (device)."""
        if window is None or self._tok_bound <= window:
            return None
        n = self._tok_bound
        pos = torch.arange(n, device=self.device)
        inside = (pos >= (self.ntok - window)[:, None]) & (pos < self.ntok[:, None])  # [B, n]
        idx = self.index_buf[:, :n].long().masked_fill(~inside, len(self.group_sizes))
        tail = torch.zeros((self.batch_size, len(self.group_sizes) + 1), dtype=torch.long, device=self.device)
        tail.scatter_add_(1, idx, torch.ones_like(idx))
        return self.counts - tail[:, :-1]

    def _decode_step(
        self, query: torch.Tensor, scaling: float, softcap: float | None, window: int | None
    ) -> torch.Tensor:
        """Every sample's single decode query ``[B, H_q, d]`` over its stores, in one batched step."""
        experts = self.experts
        starts = self._window_starts(window)
        if self.observer is None and starts is None and self._backend == "torch" and self._host_fast \
                and self.dtype == torch.float32:
            if not self._views_valid:
                self._refresh_views()
            if self._scratch is None or self._scratch[0].shape[1] != query.shape[1]:
                self._refresh_scratch(query.shape[1])
            return decode_attention_static(query, self._scratch, self._q_views, self._s_views, self._p_views,
                                           [self._k_t[e] for e in experts], [self._v[e] for e in experts],
                                           [self._bias3[e] for e in experts], scaling, softcap)
        if self.observer is None and starts is None and self._backend in ("torch", "compiled"):
            # hot path: whole-buffer views and additive slot masks, the same views every step
            if not self._views_valid:
                self._refresh_views()
            fn = decode_attention_biased if self._backend == "torch" else _compiled_biased()
            return fn(query, [self._k_t[e] for e in experts], [self._v[e] for e in experts],
                      [self._bias3[e] for e in experts], scaling, softcap)
        keys = [self.buffers[e][0, :, :, : self._bound[e]] for e in experts]
        values = [self.buffers[e][1, :, :, : self._bound[e]] for e in experts]
        lengths = self.counts if len(experts) == len(self.group_sizes) else self.counts[:, experts]
        active_starts = starts
        if starts is not None and len(experts) != len(self.group_sizes):
            active_starts = starts[:, experts]
        if self.observer is None:
            return decode_attention(query, keys, values, lengths, active_starts, scaling, softcap, self._backend,
                                    empty_rows=False)
        probs: list[torch.Tensor] = []
        out = decode_attention_torch(query, keys, values, lengths, active_starts, scaling, softcap, probs_out=probs)
        self._observe_step(probs[0], [k.shape[2] for k in keys], starts)
        return out

    def _observe_step(self, probs: torch.Tensor, widths: list[int], starts: torch.Tensor | None) -> None:
        """Hand the observer the decode probabilities ``[B, H_q, sum(widths)]`` re-ordered to token order."""
        full = self._token_order(probs, widths, starts)
        if self.batch_observer is not None:
            self.batch_observer(self, full)
            return
        for b, n in enumerate(self.ntok.tolist()):
            self.observer(self, b, full[b, :, None, :n])

    def _token_order(self, probs: torch.Tensor, widths: list[int], starts: torch.Tensor | None) -> torch.Tensor:
        """``probs`` over the expert stores' slots (expert blocks of ``widths``) as ``[B, H_q, N]`` in token order.

        One gather: token t of sample b (expert e, the s-th of e's tokens) reads column
        ``offset_e + s``; zero past the sample's stored tokens and, on a sliding layer,
        before the window (``starts``).
        """
        n = self._tok_bound
        experts = len(self.group_sizes)
        first, start = [0] * experts, 0
        for e, w in zip(self.experts, widths):
            first[e], start = start, start + w
        offsets = torch.tensor(first, dtype=torch.long, device=probs.device)
        idx = self.index_buf[:, :n].long()
        stored = torch.arange(n, device=probs.device) < self.ntok[:, None]  # [B, N]
        hot = (idx[..., None] == torch.arange(experts, device=probs.device)) & stored[..., None]  # [B, N, E]
        slot = (hot.cumsum(1) - 1).gather(2, idx[..., None]).squeeze(2)  # s: the token's slot in its store
        inside = stored if starts is None else stored & (slot >= starts.gather(1, idx))
        col = torch.where(inside, offsets[idx] + slot, 0)
        heads = probs.shape[1]
        full = probs.gather(2, col[:, None, :].expand(-1, heads, -1))
        return torch.where(inside[:, None, :], full, 0)

    def _attend_chunk(
        self,
        b: int,
        query: torch.Tensor,
        scaling: float,
        softcap: float | None,
        window: int | None,
        qpos: torch.Tensor,
    ) -> torch.Tensor:
        """One sample's multi-token chunk: ``query`` ``[H_q, n_q, d]`` -> ``[H_q, n_q, d]``.

        ``qpos`` (token-order positions of the queries among the stored tokens) gives
        causal and window masking.
        """
        heads, nq, dim = query.shape
        query = query * scaling
        idx = self.sample_index(b)
        counts = self.counts[b].tolist()
        logits, values, masks, where = [], [], [], []
        for e in self.experts:
            n = counts[e]
            if n == 0:
                continue
            store = self._store(b, e, n)
            groups = store.shape[1]
            logits.append(torch.matmul(query.reshape(groups, -1, dim), store[0].transpose(1, 2)).view(heads, nq, n))
            values.append(store[1])
            kpos = (idx == e).nonzero().squeeze(1)
            where.append(kpos)
            allowed = kpos[None, :] <= qpos[:, None]
            if window is not None:
                allowed &= kpos[None, :] > qpos[:, None] - window
            masks.append(allowed)
        scores = logits[0] if len(logits) == 1 else torch.cat(logits, dim=-1)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = masks[0] if len(masks) == 1 else torch.cat(masks, dim=-1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if self.observer is not None:
            full = probs.new_zeros(heads, nq, idx.numel())
            full[..., torch.cat(where)] = probs
            self.observer(self, b, full)
        out, start = None, 0
        for vals in values:
            groups, n = vals.shape[0], vals.shape[1]
            part = torch.matmul(probs[..., start : start + n].reshape(groups, -1, n), vals).view(heads, nq, dim)
            out = part if out is None else out + part
            start += n
        return out

class MixSGACache(Cache):
    """A transformers ``Cache`` of ``MixSGALayer``s, one per decoder layer.

    ``generate()`` on a converted model creates one automatically; pass
    ``past_key_values=MixSGACache(model.config)`` to hold on to it.
    """

    def __init__(self, config, mixsga_config: MixSGAConfig | None = None, decode_backend: str = "auto") -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if mixsga_config is None:
            spec = getattr(text, "mixsga", None)
            if spec is None:
                raise ValueError("config has no `mixsga` entry; pass mixsga_config or convert the model first")
            mixsga_config = MixSGAConfig.from_dict(spec)
        self.mixsga_config = mixsga_config
        layers = [
            MixSGALayer(mixsga_config.group_sizes, mixsga_config.active, decode_backend, window_keep=keep)
            for keep in layer_windows(text)
        ]
        super().__init__(layers=layers)

    def kv_bytes(self) -> int:
        """Live bytes: the filled K/V of every stored token plus its index byte (the ledger's figure)."""
        return sum(layer.live_bytes() for layer in self.layers)

    def reserved_bytes(self) -> int:
        """Bytes the preallocated buffers occupy, filled or not (index buffer and fill counters included)."""
        return sum(layer.reserved_bytes() for layer in self.layers)

    def set_observer(self, observer) -> None:
        """Call ``observer(layer, sample, probs)`` after every attention of every layer.

        ``probs`` is ``[H_q, q_b, n_b]``: the attention probabilities of the sample's real
        queries in the current chunk over all its stored tokens in token order (the chunk's
        own tokens included, zero where masked). ``layer.layer_idx`` names the layer; an
        eviction policy can score tokens with it and call ``layer.keep_tokens``. ``None`` removes it.
        """
        for i, layer in enumerate(self.layers):
            layer.observer, layer.layer_idx = observer, i

    def expert_counts(self) -> list[list[int]]:
        """Stored tokens per expert for every layer, ``[num_layers][E]``."""
        return [layer.expert_counts() for layer in self.layers]

    def expert_fractions(self) -> list[float]:
        """Share of stored tokens per expert, all layers pooled (the realised ratios)."""
        totals = [sum(col) for col in zip(*self.expert_counts())]
        n = sum(totals)
        return [t / n for t in totals] if n else [0.0] * len(totals)

    def num_tokens(self, sample: int = 0) -> int:
        """Stored (real, kept) tokens of one sample."""
        return self.layers[0].num_tokens(sample)

    def expert_index(self, layer_idx: int, sample: int = 0) -> torch.Tensor:
        """The per-token expert index of one layer and sample, in token order (uint8)."""
        return self.layers[layer_idx].sample_index(sample)

    def keep_tokens(self, keep: torch.Tensor, layer_idx: int | None = None, sample: int = 0) -> None:
        """Drop tokens from every expert store (all layers, or one): see ``MixSGALayer.keep_tokens``."""
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        for layer in layers:
            layer.keep_tokens(keep, sample=sample)

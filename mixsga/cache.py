"""The per-expert compact KV cache and the decode attention that reads it.

Layout (per layer): for every sample b and expert e one store of shape
``[2, H_kv / g_e, n_{b,e}, d]`` holding, in token order, the K (``[0]``) and V
(``[1]``) of the sample's tokens routed to e, already pooled to that expert's
granularity; plus a ``uint8`` expert index of shape ``[n_b]`` (one entry per
stored token, token order). K and V live in one tensor so that a decode step
pools and appends them with one op each. Padding is never stored and nothing is
preallocated: per-sample stores are ragged, hold no padding or spare slots, and
``kv_bytes()`` (summed tensor ``nbytes``) equals the ledger's figure for the
realised routing (``mixsga.budget.mixsga_kv_bytes_for_counts``).

Appends use ``torch.cat``, like transformers' ``DynamicCache``; a decode step
appends one token to one expert store per sample, so it copies only that store
(fewer bytes than a GQA cache at the same budget copies, which is why mixSGA
decode overtakes GQA at long contexts on CPU).

Decode attention never re-expands heads: for each expert the queries are
grouped onto that expert's pooled heads (a reshape: query head h reads pooled
head ``h // (H_q / H_kv * g_e)``), logits are computed against the compact
store, and the per-expert partial softmaxes are merged exactly. The merge is the
log-sum-exp merge of the per-expert partials, done in one op: a single softmax
over the concatenated per-expert logits divides every expert's exponentials by
the same normaliser ``exp(LSE)`` with ``LSE = logsumexp_e LSE_e``. Each
expert's probabilities then multiply its own value store, accumulated in place
(``baddbmm``). Gemma 2 soft-capping is applied to the logits. For a
sliding-window layer the window's tokens are the tail of each store: the last W
entries of the expert index say how many each expert holds, so no positions
are stored. Sliding layers keep all tokens (unlike ``DynamicSlidingWindowLayer``)
so that bytes follow the ledger on every layer.

Cost of one decode token per layer and sample (no window, no observer):
router matmul + argmax, one host read of the expert id (the store to append to
is chosen on the host; on CUDA this is the one sync per layer the ragged layout
needs, made asynchronous: the id is copied to pinned memory right after the
router and read at the cache update, once the Q/K/V projections are queued), K/V fuse + pool + append, index append, then one logits matmul per
expert holding tokens, one concatenation, one softmax and one value matmul per
expert. Batches > 1 loop over samples (the stores are ragged).

Token eviction can be stacked on top: ``MixSGACache.set_observer`` hands a policy
each chunk's attention probabilities over the stored tokens in token order (prefill
and decode), and ``MixSGACache.keep_tokens`` drops tokens from every expert store
given a keep mask or keep indices in token order (``mixsga.eviction`` builds
budgeted eviction on these two). Sliding-window decode after eviction counts the
last W *kept* tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mixsga.config import MixSGAConfig
from mixsga.experts import pool_heads

INDEX_DTYPE = torch.uint8


@dataclass
class Route:
    """The routing decision of one attention layer for the current chunk."""

    expert: torch.Tensor  # [B, q] long
    real: torch.Tensor | None  # [B, q] bool, None = every token real
    decode: bool  # the chunk continues a non-empty cache (argmax routing, compact attention)
    # Single-token decode: each sample's expert id, -1 where the sample's token is padding.
    ids: list[int] | None = None
    cache_layer: "MixSGALayer | None" = None
    # On CUDA the ids travel to the host asynchronously; ``resolve`` waits for them. The cache
    # update calls it after the layer's Q/K/V projections are queued, so the GPU has work while
    # the host waits instead of idling through a sync right after the router.
    fetch: Callable[[], list[int]] | None = None

    def resolve(self) -> None:
        if self.fetch is not None:
            self.ids, self.fetch = self.fetch(), None


class MixSGALayer(CacheLayerMixin):
    """One layer's per-expert compact stores (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, group_sizes: Sequence[int], active: Sequence[bool]) -> None:
        super().__init__()
        self.group_sizes = tuple(int(g) for g in group_sizes)
        self.active = tuple(bool(a) for a in active)
        self.experts = [e for e, a in enumerate(self.active) if a]
        self.stores: list[list[torch.Tensor]] = []  # [sample][expert] -> [2, H_kv / g_e, n, d]
        self.index: list[torch.Tensor] = []
        self._expert_ids: list[torch.Tensor] = []  # one-element index entries, appended at decode
        self.seen = 0  # positions processed, padding included (drives positions and masks)
        self.pending: Route | None = None
        # Optional ``observer(layer, sample, probs)``: attention probabilities ``[H_q, q_b, n_b]``
        # of the sample's real chunk queries over its stored tokens in token order (set by
        # ``MixSGACache.set_observer``; token-eviction policies score tokens with it).
        self.observer = None
        self.layer_idx = -1

    # ------------------------------------------------------------------ transformers' layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        if value_states.shape[-1] != dim:
            raise ValueError(
                f"mixSGA stores K and V together and needs equal head sizes, got {dim} and {value_states.shape[-1]}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_kv_heads, self.head_dim = heads, dim
        self.stores = [
            [key_states.new_empty((2, heads // g, 0, dim)) for g in self.group_sizes] for _ in range(batch)
        ]
        self.index = [torch.empty(0, dtype=INDEX_DTYPE, device=self.device) for _ in range(batch)]
        self._expert_ids = [
            torch.full((1,), e, dtype=INDEX_DTYPE, device=self.device) for e in range(len(self.group_sizes))
        ]
        self.is_initialized = True

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
        route.resolve()
        batch, _, q, _ = key_states.shape
        if batch != len(self.index):
            raise ValueError(f"cache holds {len(self.index)} samples but got a batch of {batch}")
        if route.ids is not None:
            if batch == 1:
                if route.ids[0] >= 0:
                    self._append_token(0, route.ids[0], key_states, value_states)
            else:
                for b, e in enumerate(route.ids):
                    if e >= 0:
                        self._append_token(b, e, key_states[b : b + 1], value_states[b : b + 1])
        else:
            kv = torch.stack((key_states, value_states), dim=1)  # [B, 2, H_kv, q, d]
            for b in range(batch):
                self._append_chunk(b, kv[b], route.expert[b], None if route.real is None else route.real[b])
        self.seen += q
        return key_states, value_states

    def _append_token(self, b: int, e: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append one token (``k``, ``v``: ``[1, H_kv, 1, d]``) to expert ``e``'s store of sample ``b``."""
        row = self.stores[b]
        row[e] = torch.cat((row[e], pool_heads(torch.cat((k, v)), self.group_sizes[e])), dim=2)
        self.index[b] = torch.cat((self.index[b], self._expert_ids[e]))

    def _append_chunk(self, b: int, kv: torch.Tensor, expert: torch.Tensor, real: torch.Tensor | None) -> None:
        """Append a chunk (``kv``: ``[2, H_kv, q, d]``) of one sample, each token to its expert's store."""
        row = self.stores[b]
        for e in self.experts:
            hit = expert == e if real is None else (expert == e) & real
            sel = hit.nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            new = pool_heads(kv.index_select(2, sel), self.group_sizes[e])
            row[e] = new if row[e].shape[2] == 0 else torch.cat((row[e], new), dim=2)
        tokens = expert if real is None else expert[real]
        self.index[b] = torch.cat((self.index[b], tokens.to(INDEX_DTYPE)))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.stores, self.index = [], []
        self.seen, self.pending, self.is_initialized = 0, None, False

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move(self.device)

    def _move(self, device) -> None:
        self.stores = [[t.to(device, non_blocking=True) for t in row] for row in self.stores]
        self.index = [t.to(device, non_blocking=True) for t in self.index]
        self._expert_ids = [t.to(device, non_blocking=True) for t in self._expert_ids]

    def _select_samples(self, order: Sequence[int]) -> None:
        self.stores = [list(self.stores[i]) for i in order]
        self.index = [self.index[i] for i in order]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_samples(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_samples([i for i in range(len(self.index)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_samples(torch.as_tensor(indices).tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative), or keep the first ``tokens_to_remove`` positions."""
        drop = -tokens_to_remove if tokens_to_remove < 0 else max(self.seen - tokens_to_remove, 0)
        if drop == 0 or not self.is_initialized:
            return
        for b, idx in enumerate(self.index):
            keep = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
            keep[max(idx.numel() - drop, 0):] = False
            self.keep_tokens(keep, sample=b)
        self.seen -= drop

    # ------------------------------------------------------------------ mixSGA API
    @property
    def key_stores(self) -> list[list[torch.Tensor]]:
        """Per sample and expert, the pooled keys ``[H_kv / g_e, n, d]`` (views into the stores)."""
        return [[s[0] for s in row] for row in self.stores]

    @property
    def value_stores(self) -> list[list[torch.Tensor]]:
        """Per sample and expert, the pooled values ``[H_kv / g_e, n, d]`` (views into the stores)."""
        return [[s[1] for s in row] for row in self.stores]

    def keep_tokens(self, keep: torch.Tensor, sample: int = 0) -> None:
        """Keep only some stored tokens of one sample, in every expert store.

        ``keep`` is a bool mask over the sample's stored tokens in token order
        (length = ``num_tokens(sample)``) or a 1-D tensor of token indices. Positions
        (``get_seq_length``) are unchanged, as for any token-eviction cache.
        """
        idx = self.index[sample]
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
        row = self.stores[sample]
        for e in self.experts:
            row[e] = row[e][:, :, keep[idx == e]]
        self.index[sample] = idx[keep]

    def num_tokens(self, sample: int = 0) -> int:
        return int(self.index[sample].numel()) if self.is_initialized else 0

    def expert_counts(self) -> list[int]:
        """Stored tokens per expert, summed over samples."""
        counts = [0] * len(self.group_sizes)
        for row in self.stores:
            for e, t in enumerate(row):
                counts[e] += t.shape[2]
        return counts

    def tensors(self) -> list[torch.Tensor]:
        return [t for row in self.stores for t in row] + list(self.index)

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
        route.resolve()
        if route.ids is not None:
            if batch == 1:
                if route.ids[0] < 0:
                    return query.new_zeros(1, 1, heads, dim)
                return self._decode_token(0, query.reshape(heads, dim), scaling, softcap, sliding_window).view(
                    1, 1, heads, dim
                )
            rows = [
                self._decode_token(b, query[b].reshape(heads, dim), scaling, softcap, sliding_window)
                if e >= 0
                else query.new_zeros(heads, dim)
                for b, e in enumerate(route.ids)
            ]
            return torch.stack(rows).view(batch, 1, heads, dim)
        out = query.new_zeros(batch, heads, q, dim)
        for b in range(batch):
            real = torch.arange(q, device=query.device) if route.real is None else route.real[b].nonzero().squeeze(1)
            if real.numel() == 0:
                continue
            n = self.index[b].numel()
            qpos = torch.arange(n - real.numel(), n, device=query.device)
            out[b, :, real] = self._attend_chunk(b, query[b][:, real], scaling, softcap, sliding_window, qpos)
        return out.transpose(1, 2)

    def _window_tail(self, b: int, window: int | None) -> list[int] | None:
        """Tokens per expert among the sample's last ``window`` stored tokens; None when all are in the window."""
        idx = self.index[b]
        if window is None or idx.numel() <= window:
            return None
        return torch.bincount(idx[-window:], minlength=len(self.group_sizes)).tolist()

    def _observe(self, b: int, probs: torch.Tensor, tail: list[int] | None) -> None:
        """Hand the observer ``probs`` re-ordered from expert-store order to token order."""
        idx = self.index[b]
        cols = []
        for e in self.experts:
            where = (idx == e).nonzero().squeeze(1)
            if tail is not None:
                where = where[where.numel() - tail[e] :]
            cols.append(where)
        order = torch.cat(cols)
        full = probs.new_zeros(*probs.shape[:-1], idx.numel())
        full[..., order] = probs
        self.observer(self, b, full)

    def _decode_token(
        self, b: int, query: torch.Tensor, scaling: float, softcap: float | None, window: int | None
    ) -> torch.Tensor:
        """One sample's single decode query ``[H_q, d]`` over its stores -> ``[H_q, d]``."""
        heads, dim = query.shape
        query = query * scaling
        tail = self._window_tail(b, window)
        logits, values = [], []
        for e in self.experts:
            store = self.stores[b][e]
            if tail is not None:
                store = store[:, :, store.shape[2] - tail[e] :]
            n = store.shape[2]
            if n == 0:
                continue
            groups = store.shape[1]
            # torch.bmm, not torch.matmul: same kernel, half the dispatch overhead at decode sizes
            logits.append(torch.bmm(query.view(groups, heads // groups, dim), store[0].transpose(1, 2)).view(heads, n))
            values.append(store[1])
        scores = logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if probs.dtype != query.dtype:
            probs = probs.to(query.dtype)
        if self.observer is not None:
            self._observe(b, probs.unsqueeze(1), tail)
        out, start = None, 0
        for vals in values:
            groups, n = vals.shape[0], vals.shape[1]
            part = probs[:, start : start + n].view(groups, heads // groups, n)
            if out is None:
                out = torch.bmm(part, vals)
            else:
                out = torch.baddbmm(out.view(groups, heads // groups, dim), part, vals)
            start += n
        return out.view(heads, dim)

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
        idx = self.index[b]
        logits, values, masks = [], [], []
        for e in self.experts:
            store = self.stores[b][e]
            n = store.shape[2]
            if n == 0:
                continue
            groups = store.shape[1]
            logits.append(torch.matmul(query.reshape(groups, -1, dim), store[0].transpose(1, 2)).view(heads, nq, n))
            values.append(store[1])
            kpos = (idx == e).nonzero().squeeze(1)
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
            self._observe(b, probs, None)
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

    def __init__(self, config, mixsga_config: MixSGAConfig | None = None) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if mixsga_config is None:
            spec = getattr(text, "mixsga", None)
            if spec is None:
                raise ValueError("config has no `mixsga` entry; pass mixsga_config or convert the model first")
            mixsga_config = MixSGAConfig.from_dict(spec)
        self.mixsga_config = mixsga_config
        layers = [
            MixSGALayer(mixsga_config.group_sizes, mixsga_config.active)
            for _ in range(int(text.num_hidden_layers))
        ]
        super().__init__(layers=layers)

    def kv_bytes(self) -> int:
        """Bytes the cache holds: summed ``nbytes`` of every store and index (shared tensors once)."""
        seen, total = set(), 0
        for layer in self.layers:
            for t in layer.tensors():
                key = (t.data_ptr(), t.nbytes)
                if t.nbytes and key not in seen:
                    seen.add(key)
                    total += t.nbytes
        return total

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
        return self.layers[layer_idx].index[sample]

    def keep_tokens(self, keep: torch.Tensor, layer_idx: int | None = None, sample: int = 0) -> None:
        """Drop tokens from every expert store (all layers, or one): see ``MixSGALayer.keep_tokens``."""
        layers = self.layers if layer_idx is None else [self.layers[layer_idx]]
        for layer in layers:
            layer.keep_tokens(keep, sample=sample)

"""The per-expert compact KV cache and the decode attention that reads it.

Layout (per layer): for every sample b and expert e one key store and one value
store of shape ``[H_kv / g_e, n_{b,e}, d]`` holding, in token order, the K/V of the
sample's tokens routed to e, already pooled to that expert's granularity; plus a
``uint8`` expert index of shape ``[n_b]`` (one entry per stored token, token order).
Padding is never stored, so per-sample stores are ragged and hold no padding slots:
``kv_bytes()`` (summed tensor ``nbytes``) equals the ledger's figure for the
realised routing (``mixsga.budget.mixsga_kv_bytes_for_counts``).

Appends use ``torch.cat``, like transformers' ``DynamicCache``; a decode step
appends one token to one expert store per sample, so it copies fewer bytes than a
GQA cache at the same budget. At batch size 1 a decode step is a handful of
tensor ops per layer; batch > 1 loops over samples (the stores are ragged).

Decode attention (``MixSGALayer.attend``) never re-expands heads: for each expert
the queries are grouped onto that expert's pooled heads (a reshape: query head h
reads pooled head ``h // (H_q / H_kv * g_e)``), logits are computed against the
compact store, and the per-expert partial softmaxes are merged exactly by one
shared log-sum-exp normaliser (a single softmax over the concatenated per-expert
logits, which is the LSE merge of the per-expert partials done in one op), then
each expert's probabilities multiply its own value store. Gemma 2 soft-capping is
applied to the logits. For a sliding-window layer the window's tokens are the tail
of each store: the last W entries of the expert index say how many each expert
holds, so no positions are stored. Sliding layers keep all tokens (unlike
``DynamicSlidingWindowLayer``) so that bytes follow the ledger on every layer.

Token eviction can be stacked on top: ``MixSGACache.set_observer`` hands a policy
each chunk's attention probabilities over the stored tokens in token order (prefill
and decode), and ``MixSGACache.keep_tokens`` drops tokens from every expert store
given a keep mask or keep indices in token order.
Sliding-window decode after eviction counts the last W *kept* tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
    ids: list[list[int]] | None = None  # decode: expert ids of each sample's real tokens
    cache_layer: "MixSGALayer | None" = None


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
        self.key_stores: list[list[torch.Tensor]] = []
        self.value_stores: list[list[torch.Tensor]] = []
        self.index: list[torch.Tensor] = []
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
        self.dtype, self.device = key_states.dtype, key_states.device
        self.num_kv_heads, self.head_dim = heads, dim

        def empty(g: int) -> torch.Tensor:
            return key_states.new_empty((heads // g, 0, dim))

        self.key_stores = [[empty(g) for g in self.group_sizes] for _ in range(batch)]
        self.value_stores = [[empty(g) for g in self.group_sizes] for _ in range(batch)]
        self.index = [torch.empty(0, dtype=INDEX_DTYPE, device=self.device) for _ in range(batch)]
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
        batch, _, q, _ = key_states.shape
        if batch != len(self.index):
            raise ValueError(f"cache holds {len(self.index)} samples but got a batch of {batch}")
        if route.decode and q == 1:
            for b, ids in enumerate(route.ids):
                if ids:
                    self._append_one(b, ids[0], key_states[b], value_states[b])
        else:
            for b in range(batch):
                self._append_chunk(b, key_states[b], value_states[b], route.expert[b], None if route.real is None else route.real[b])
        self.seen += q
        return key_states, value_states

    def _append_one(self, b: int, e: int, k: torch.Tensor, v: torch.Tensor) -> None:
        g = self.group_sizes[e]
        ks, vs = self.key_stores[b], self.value_stores[b]
        ks[e] = torch.cat([ks[e], pool_heads(k, g)], dim=1)
        vs[e] = torch.cat([vs[e], pool_heads(v, g)], dim=1)
        self.index[b] = torch.cat([self.index[b], torch.tensor([e], dtype=INDEX_DTYPE, device=self.device)])

    def _append_chunk(
        self, b: int, k: torch.Tensor, v: torch.Tensor, expert: torch.Tensor, real: torch.Tensor | None
    ) -> None:
        ks, vs = self.key_stores[b], self.value_stores[b]
        for e in self.experts:
            hit = expert == e if real is None else (expert == e) & real
            sel = hit.nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            g = self.group_sizes[e]
            new_k = pool_heads(k.index_select(1, sel), g)
            new_v = pool_heads(v.index_select(1, sel), g)
            ks[e] = new_k if ks[e].shape[1] == 0 else torch.cat([ks[e], new_k], dim=1)
            vs[e] = new_v if vs[e].shape[1] == 0 else torch.cat([vs[e], new_v], dim=1)
        tokens = expert if real is None else expert[real]
        self.index[b] = torch.cat([self.index[b], tokens.to(INDEX_DTYPE)])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.key_stores, self.value_stores, self.index = [], [], []
        self.seen, self.pending, self.is_initialized = 0, None, False

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move(self.device)

    def _move(self, device) -> None:
        self.key_stores = [[t.to(device, non_blocking=True) for t in row] for row in self.key_stores]
        self.value_stores = [[t.to(device, non_blocking=True) for t in row] for row in self.value_stores]
        self.index = [t.to(device, non_blocking=True) for t in self.index]

    def _select_samples(self, order: Sequence[int]) -> None:
        self.key_stores = [list(self.key_stores[i]) for i in order]
        self.value_stores = [list(self.value_stores[i]) for i in order]
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
        ks, vs = self.key_stores[sample], self.value_stores[sample]
        for e in self.experts:
            sel = keep[idx == e]
            ks[e] = ks[e][:, sel]
            vs[e] = vs[e][:, sel]
        self.index[sample] = idx[keep]

    def num_tokens(self, sample: int = 0) -> int:
        return int(self.index[sample].numel()) if self.is_initialized else 0

    def expert_counts(self) -> list[int]:
        """Stored tokens per expert, summed over samples."""
        counts = [0] * len(self.group_sizes)
        for row in self.key_stores:
            for e, t in enumerate(row):
                counts[e] += t.shape[1]
        return counts

    def tensors(self) -> list[torch.Tensor]:
        return [t for row in self.key_stores + self.value_stores for t in row] + list(self.index)

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
            rows = [
                self._attend_sample(b, query[b], scaling, softcap, sliding_window, None)
                if route.ids[b]
                else query.new_zeros(heads, 1, dim)
                for b in range(batch)
            ]
            out = rows[0].unsqueeze(0) if batch == 1 else torch.stack(rows)
            return out.transpose(1, 2)
        out = query.new_zeros(batch, heads, q, dim)
        for b in range(batch):
            real = torch.arange(q, device=query.device) if route.real is None else route.real[b].nonzero().squeeze(1)
            if real.numel() == 0:
                continue
            n = self.index[b].numel()
            qpos = torch.arange(n - real.numel(), n, device=query.device)
            out[b, :, real] = self._attend_sample(b, query[b][:, real], scaling, softcap, sliding_window, qpos)
        return out.transpose(1, 2)

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

    def _attend_sample(
        self,
        b: int,
        query: torch.Tensor,
        scaling: float,
        softcap: float | None,
        window: int | None,
        qpos: torch.Tensor | None,
    ) -> torch.Tensor:
        """One sample: ``query`` ``[H_q, n_q, d]`` -> ``[H_q, n_q, d]``.

        ``qpos`` (token-order positions of the queries) switches on causal and window
        masking for multi-token chunks; a single decode token sees every stored token,
        or the window's tail.
        """
        heads, nq, dim = query.shape
        query = query * scaling
        idx = self.index[b]
        tail = None
        if window is not None and qpos is None and idx.numel() > window:
            tail = torch.bincount(idx[-window:], minlength=len(self.group_sizes)).tolist()
        logits, values, masks = [], [], []
        for e in self.experts:
            keys, vals = self.key_stores[b][e], self.value_stores[b][e]
            if tail is not None:
                keep = tail[e]
                keys, vals = keys[:, keys.shape[1] - keep :], vals[:, vals.shape[1] - keep :]
            n = keys.shape[1]
            if n == 0:
                continue
            groups = keys.shape[0]
            logits.append(torch.matmul(query.reshape(groups, -1, dim), keys.transpose(1, 2)).view(heads, nq, n))
            values.append(vals)
            if qpos is not None:
                kpos = (idx == e).nonzero().squeeze(1)
                allowed = kpos[None, :] <= qpos[:, None]
                if window is not None:
                    allowed &= kpos[None, :] > qpos[:, None] - window
                masks.append(allowed)
        scores = logits[0] if len(logits) == 1 else torch.cat(logits, dim=-1)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if masks:
            allowed = masks[0] if len(masks) == 1 else torch.cat(masks, dim=-1)
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if self.observer is not None:
            self._observe(b, probs, tail)
        out = None
        start = 0
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

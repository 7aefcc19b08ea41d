"""Token eviction stacked on mixSGA: a byte-budgeted evicting ``MixSGACache``.

``MixSGAEvictionCache(config, policy)`` is a ``MixSGACache`` that scores its
stored tokens from the attention probabilities the cache's observer sees
(prefill and every decode step, token order, all query heads) and, after each
layer's attention, drops tokens from every expert store with ``keep_tokens``.

The policy is any object with the interface of ``baselines.eviction.EvictionPolicy``
(``keep``, ``update_scores``, ``rank``, ``check_prompt``): H2O, StreamingLLM,
SnapKV and TOVA score and rank exactly as the baseline caches do; only the
budget and the storage differ. ``harness.methods`` wires the two packages
together (``get_method("h2o+mixsga")``); mixsga itself does not import baselines.

Differences from the baseline eviction cache, all forced by mixSGA's layout:

* One token set per sample and layer, shared by all heads: a token's K/V lives in
  one expert store at that expert's pooled head count, so per-KV-head token sets
  (the baseline's H2O / SnapKV) do not exist here. The score rows are all query
  heads together (``probs`` is passed as ``[1, 1, H_q, T, S]``): H2O and SnapKV
  sum attention over every query head, TOVA averages over them.
* The budget is in bytes, because tokens cost different bytes by expert: sample b
  keeps the best-ranked tokens (the policy's ``rank``, a prefix of its preference
  order) while their bytes (K/V at the expert's granularity plus the index byte)
  fit ``floor(keep x bytes plain mixSGA would hold for the b's real tokens seen so
  far, under the same routing)``. With uniform per-token costs this is exactly the
  baseline's ``floor(keep x n)`` tokens, and it guarantees
  ``kv_bytes() <= keep x`` the plain mixSGA cache's bytes (equal to ``keep x`` the
  ledger's analytic bytes after an expert-choice prefill). The token budget
  ``floor(keep x n)`` still sizes H2O's recent window and bounds a protected question.
* StreamingLLM repositioning (``rotate``: a function ``(keys [1, H, S, d], delta
  [1, H, S]) -> keys``, e.g. ``baselines.eviction.rotate_keys`` bound to the model's
  RoPE frequencies) rotates the pooled keys of every expert store; pooling commutes
  with RoPE (same rotation for every head), so this is exact. It assumes a real
  token's RoPE position is its index among the sample's real tokens, which holds
  for unpadded inputs and for ``generate`` with left padding.
* Sliding-window layers (Gemma 2) treat tokens outside the next query's window as
  dead, as the baseline does, and budget against what plain mixSGA stores there: the
  bytes of the last ``W - 1`` tokens seen (``kvledger.layer_windows``) and
  ``floor(keep x min(n, W - 1))`` tokens, so the share of the plain cache is ``keep``
  on every layer.

Per-sample bookkeeping (score, token index, RoPE position) is reported apart from
the K/V bytes by ``metadata_bytes()``. An evicting cache cannot be cropped or
reordered (beam search).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from mixsga.budget import dtype_bytes
from mixsga.cache import INDEX_DTYPE, MixSGACache, MixSGALayer
from mixsga.config import MixSGAConfig


class TokenPolicy(Protocol):
    """What the cache needs from an eviction policy (``baselines.eviction.EvictionPolicy`` fits)."""

    keep: float

    def check_prompt(self, shortest: int) -> None: ...

    def update_scores(self, score: torch.Tensor, probs: torch.Tensor, chunk_valid: torch.Tensor) -> torch.Tensor: ...

    def rank(self, score: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor, cap: torch.Tensor,
             prompt_end: int | None) -> torch.Tensor: ...


@dataclass
class SampleState:
    """Eviction bookkeeping of one sample in one layer, aligned with the layer's expert index."""

    score: torch.Tensor  # [n] float32
    slots: torch.Tensor  # [n] long: each stored token's index among the sample's real tokens
    rope_pos: torch.Tensor  # [n] long: the RoPE position its key is rotated to now
    seen: int = 0  # real tokens seen
    seen_bytes: int = 0  # bytes the plain mixSGA cache would hold for them (sliding layer: the window's)
    prompt_end: int | None = None
    recent: torch.Tensor | None = None  # sliding layer: costs of the last W - 1 tokens seen, oldest first


@functools.lru_cache(maxsize=64)  # read per sample, layer and step: built once per layer shape and storage
def _token_costs(head_dim: int, kv_heads: int, group_sizes: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    unit = 2 * head_dim * dtype_bytes(dtype)
    costs = [unit * (kv_heads // g) + INDEX_DTYPE.itemsize for g in group_sizes]
    return torch.tensor(costs, dtype=torch.long, device=device)


def keep_within_bytes(rank: torch.Tensor, valid: torch.Tensor, cost: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep mask: the longest prefix of the preference order (``rank`` 0 first) whose ``cost`` fits ``budget``.

    Invalid tokens are never kept. All tensors are ``[n]``.
    """
    order = torch.argsort(rank)
    ok = valid[order]
    fits = (torch.cumsum(torch.where(ok, cost[order], 0), 0) <= budget) & ok
    keep = torch.zeros_like(valid)
    keep[order] = fits
    return keep


class MixSGAEvictionCache(MixSGACache):
    """A ``MixSGACache`` that evicts tokens after every layer's attention (see the module docstring)."""

    def __init__(self, config, policy: TokenPolicy, *, mixsga_config: MixSGAConfig | None = None,
                 rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(config, mixsga_config)
        if not 0 < float(policy.keep) <= 1:
            raise ValueError(f"keep fraction must be in (0, 1], got {policy.keep!r}")
        self.policy = policy
        self.rotate = rotate
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        types = getattr(text, "layer_types", None) or ["full_attention"] * len(self.layers)
        window = getattr(text, "sliding_window", None)
        self.windows = [window if t == "sliding_attention" else None for t in types[: len(self.layers)]]
        self.states: list[list[SampleState]] = [[] for _ in self.layers]
        for i, layer in enumerate(self.layers):
            layer.observer, layer.layer_idx = self._observe, i
            layer.is_croppable = False

    def set_observer(self, observer) -> None:
        raise ValueError("MixSGAEvictionCache observes attention itself; use a plain MixSGACache to set an observer")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (crop)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("an evicting mixSGA cache does not support beam search (reorder_cache)")

    def metadata_bytes(self) -> int:
        """Bytes of the eviction bookkeeping (scores, token indices, RoPE positions), apart from the K/V."""
        return sum(t.nbytes for row in self.states for s in row
                   for t in (s.score, s.slots, s.rope_pos, *(() if s.recent is None else (s.recent,))))

    def uncompressed_bytes(self) -> int:
        """Bytes the plain mixSGA cache would hold for every real token seen, under the same routing."""
        return sum(s.seen_bytes for row in self.states for s in row)

    def kept_tokens(self) -> list[list[int]]:
        """Stored tokens per layer and sample."""
        return [[layer.num_tokens(b) for b in range(len(layer.index))] for layer in self.layers]

    @staticmethod
    def token_costs(layer: MixSGALayer) -> torch.Tensor:
        """Bytes one token costs in each expert of ``layer``: pooled K and V plus its index entry, ``[E]``."""
        return _token_costs(layer.head_dim, layer.num_kv_heads, tuple(layer.group_sizes), layer.dtype, layer.device)

    def _state(self, layer: MixSGALayer, b: int) -> SampleState:
        states = self.states[layer.layer_idx]
        while len(states) < len(layer.index):
            empty = torch.empty(0, dtype=torch.long, device=layer.device)
            states.append(SampleState(empty.float(), empty, empty))
        return states[b]

    def _observe(self, layer: MixSGALayer, b: int, probs: torch.Tensor) -> None:
        """Score sample ``b``'s tokens with this chunk's ``probs`` ``[H_q, q, n]`` and evict to the budget."""
        policy, st = self.policy, self._state(layer, b)
        idx = layer.sample_index(b)
        n, q = idx.numel(), probs.shape[1]
        device = idx.device
        new = torch.arange(st.seen, st.seen + q, device=device)
        st.slots = torch.cat((st.slots, new))
        st.rope_pos = torch.cat((st.rope_pos, new))
        if st.prompt_end is None:
            st.prompt_end = st.seen + q
            if q > 1:
                policy.check_prompt(q)
        st.seen += q
        cost = self.token_costs(layer)[idx.long()]
        keep_window = layer.window_keep  # plain mixSGA stores at most this many tokens here
        if keep_window is None:
            st.seen_bytes += int(cost[n - q :].sum())
        else:
            recent = cost[n - q :] if st.recent is None else torch.cat((st.recent, cost[n - q :]))
            st.recent = recent[max(recent.numel() - keep_window, 0) :]
            st.seen_bytes = int(st.recent.sum())
        score = torch.cat((st.score, st.score.new_zeros(q)))
        chunk_valid = torch.ones((1, q), dtype=torch.bool, device=device)
        score = policy.update_scores(score[None, None], probs.float()[None, None], chunk_valid)[0, 0]
        valid = torch.ones(n, dtype=torch.bool, device=device)
        window = self.windows[layer.layer_idx]
        if window is not None:  # the next query (token index `seen`) sees only the last `window` tokens
            valid = st.slots > st.seen - window
        stored = st.seen if keep_window is None else min(st.seen, keep_window)
        cap = torch.tensor([[math.floor(policy.keep * stored + 1e-9)]], device=device)
        rank = policy.rank(score[None], valid[None], st.slots[None], cap, st.prompt_end)[0]
        keep = keep_within_bytes(rank, valid, cost, math.floor(policy.keep * st.seen_bytes + 1e-9))
        if bool(keep.all()):
            st.score = score
        else:
            layer.keep_tokens(keep, sample=b)
            st.score, st.slots, st.rope_pos = score[keep], st.slots[keep], st.rope_pos[keep]
        if self.rotate is not None:
            self._reposition(layer, b, st)

    def _reposition(self, layer: MixSGALayer, b: int, st: SampleState) -> None:
        """Rotate kept keys onto consecutive positions ending at the newest token's."""
        kept = st.rope_pos.numel()
        target = (st.seen - kept) + torch.arange(kept, device=st.rope_pos.device)
        delta = target - st.rope_pos
        if not bool(delta.any()):
            return
        idx, row = layer.sample_index(b), layer.stores[b]
        for e in layer.experts:
            store = row[e]
            if store.shape[2] == 0:
                continue
            shift = delta[idx == e][None, None].expand(1, store.shape[1], -1)
            layer.set_keys(b, e, self.rotate(store[0][None], shift)[0])
        st.rope_pos = target

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

A decode step is scored and evicted for the whole batch at once (``_observe_batch``:
one batched policy call, one byte-budget selection, ``MixSGALayer.keep_tokens_batch``),
with each layer's bookkeeping held as ``[B, M]`` rows (:class:`LayerState`). A prefill
chunk is observed per sample (each sample has its own real tokens); both select the
same tokens, because padding columns rank last and cost nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from mixsga.budget import dtype_bytes
from mixsga.cache import GROWTH, INDEX_DTYPE, PAGE, MixSGACache, MixSGALayer
from mixsga.config import MixSGAConfig


class TokenPolicy(Protocol):
    """What the cache needs from an eviction policy (``baselines.eviction.EvictionPolicy`` fits)."""

    keep: float

    def check_prompt(self, shortest: int) -> None: ...

    def update_scores(self, score: torch.Tensor, probs: torch.Tensor, chunk_valid: torch.Tensor) -> torch.Tensor: ...

    def rank(self, score: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor, cap: torch.Tensor,
             prompt_end: int | torch.Tensor | None) -> torch.Tensor: ...


@dataclass
class SampleState:
    """One sample's eviction bookkeeping in one layer (a snapshot: ``MixSGAEvictionCache.states``)."""

    score: torch.Tensor  # [n] float32
    slots: torch.Tensor  # [n] long: each stored token's index among the sample's real tokens
    rope_pos: torch.Tensor  # [n] long: the RoPE position its key is rotated to now
    seen: int = 0  # real tokens seen
    seen_bytes: int = 0  # bytes the plain mixSGA cache would hold for them (sliding layer: the window's)
    prompt_end: int | None = None
    recent: torch.Tensor | None = None  # sliding layer: costs of the last W - 1 tokens seen, oldest first


@dataclass
class LayerState:
    """Every sample's eviction bookkeeping in one layer: row b, columns ``[0, lens[b])``, is aligned
    with sample b's expert index in token order (the rest is padding: score 0)."""

    score: torch.Tensor  # [B, M] float32
    slots: torch.Tensor  # [B, M] long
    rope_pos: torch.Tensor  # [B, M] long
    lens: torch.Tensor  # [B] long: tokens of each row
    seen: torch.Tensor  # [B] long: real tokens seen
    seen_bytes: torch.Tensor  # [B] long
    prompt_end: torch.Tensor  # [B] long: token index after the prompt, -1 before the first chunk
    recent: torch.Tensor | None  # sliding layer [B, W - 1]: costs of the last W - 1 tokens, right-aligned

    @classmethod
    def empty(cls, batch: int, window_keep: int | None, device: torch.device) -> "LayerState":
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        rows = torch.zeros((batch, 0), dtype=torch.long, device=device)
        recent = None if window_keep is None else torch.zeros((batch, window_keep), dtype=torch.long, device=device)
        return cls(rows.float(), rows, rows.clone(), zeros, zeros.clone(), zeros.clone(), zeros - 1, recent)

    def reserve(self, width: int) -> None:
        """Make the rows hold ``width`` columns (geometric growth in pages, as the cache's stores)."""
        have = self.score.shape[1]
        if width <= have:
            return
        grown = -(-max(width, int(have * GROWTH)) // PAGE) * PAGE
        pad = (0, grown - have)
        self.score = torch.nn.functional.pad(self.score, pad)
        self.slots = torch.nn.functional.pad(self.slots, pad)
        self.rope_pos = torch.nn.functional.pad(self.rope_pos, pad)

    def set_row(self, b: int, score: torch.Tensor, slots: torch.Tensor, rope_pos: torch.Tensor) -> None:
        n = score.numel()
        self.reserve(n)
        self.score[b, :n], self.slots[b, :n], self.rope_pos[b, :n] = score, slots, rope_pos
        self.score[b, n:] = 0.0
        self.lens[b] = n

    def sample(self, b: int) -> SampleState:
        n, seen = int(self.lens[b]), int(self.seen[b])
        recent = None
        if self.recent is not None:
            width = self.recent.shape[1]
            recent = self.recent[b, width - min(seen, width):].clone()
        end = int(self.prompt_end[b])
        return SampleState(self.score[b, :n].clone(), self.slots[b, :n].clone(), self.rope_pos[b, :n].clone(),
                           seen, int(self.seen_bytes[b]), None if end < 0 else end, recent)


@functools.lru_cache(maxsize=64)  # read per layer and step: built once per layer shape and storage
def _token_costs(head_dim: int, kv_heads: int, group_sizes: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    unit = 2 * head_dim * dtype_bytes(dtype)
    costs = [unit * (kv_heads // g) + INDEX_DTYPE.itemsize for g in group_sizes]
    return torch.tensor(costs, dtype=torch.long, device=device)


def keep_within_bytes(rank: torch.Tensor, valid: torch.Tensor, cost: torch.Tensor,
                      budget: int | torch.Tensor) -> torch.Tensor:
    """Keep mask: the longest prefix of the preference order (``rank`` 0 first) whose ``cost`` fits ``budget``.

    Invalid tokens are never kept. ``rank``, ``valid``, ``cost`` are ``[..., n]``; ``budget``
    an int or ``[...]`` (one per row).
    """
    order = torch.argsort(rank, dim=-1)
    ok = valid.gather(-1, order)
    spent = torch.cumsum(torch.where(ok, cost.gather(-1, order), 0), -1)
    fits = (spent <= torch.as_tensor(budget, device=spent.device)[..., None]) & ok
    return torch.zeros_like(valid).scatter_(-1, order, fits)


def _floor_share(keep: float, amount: torch.Tensor) -> torch.Tensor:
    """``floor(keep x amount + 1e-9)`` in float64, as Python's ``math.floor`` of the same product."""
    return torch.floor(amount.double() * keep + 1e-9).long()


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
        self.layer_states: list[LayerState | None] = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            layer.observer, layer.batch_observer, layer.layer_idx = self._observe, self._observe_batch, i
            layer.is_croppable = False

    def set_observer(self, observer) -> None:
        raise ValueError("MixSGAEvictionCache observes attention itself; use a plain MixSGACache to set an observer")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (crop)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("an evicting mixSGA cache does not support beam search (reorder_cache)")

    @property
    def states(self) -> list[list[SampleState]]:
        """Per layer and sample, a snapshot of the eviction bookkeeping (empty for a layer not observed yet)."""
        return [[] if st is None else [st.sample(b) for b in range(st.lens.numel())] for st in self.layer_states]

    def metadata_bytes(self) -> int:
        """Bytes of the eviction bookkeeping (scores, token indices, RoPE positions), apart from the K/V.

        Counted per sample as stored: one score, token index and RoPE position per kept token,
        and on a sliding layer one cost per token of the window seen (not the rows' padding).
        """
        total = 0
        for st in self.layer_states:
            if st is None:
                continue
            per_token = st.score.element_size() + st.slots.element_size() + st.rope_pos.element_size()
            total += int(st.lens.sum()) * per_token
            if st.recent is not None:
                total += int(st.seen.clamp_max(st.recent.shape[1]).sum()) * st.recent.element_size()
        return total

    def uncompressed_bytes(self) -> int:
        """Bytes the plain mixSGA cache would hold for every real token seen, under the same routing."""
        return sum(int(st.seen_bytes.sum()) for st in self.layer_states if st is not None)

    def kept_tokens(self) -> list[list[int]]:
        """Stored tokens per layer and sample."""
        return [[layer.num_tokens(b) for b in range(len(layer.index))] for layer in self.layers]

    @staticmethod
    def token_costs(layer: MixSGALayer) -> torch.Tensor:
        """Bytes one token costs in each expert of ``layer``: pooled K and V plus its index entry, ``[E]``."""
        return _token_costs(layer.head_dim, layer.num_kv_heads, tuple(layer.group_sizes), layer.dtype, layer.device)

    def _state(self, layer: MixSGALayer) -> LayerState:
        st = self.layer_states[layer.layer_idx]
        if st is None or st.lens.numel() != layer.batch_size:
            st = LayerState.empty(layer.batch_size, layer.window_keep, layer.device)
            self.layer_states[layer.layer_idx] = st
        return st

    def _observe(self, layer: MixSGALayer, b: int, probs: torch.Tensor) -> None:
        """Score sample ``b``'s tokens with this chunk's ``probs`` ``[H_q, q, n]`` and evict to the budget."""
        policy, st = self.policy, self._state(layer)
        idx = layer.sample_index(b)
        n, q = idx.numel(), probs.shape[1]
        old, seen, device = n - q, int(st.seen[b]), idx.device
        new = torch.arange(seen, seen + q, device=device)
        slots = torch.cat((st.slots[b, :old], new))
        rope_pos = torch.cat((st.rope_pos[b, :old], new))
        if int(st.prompt_end[b]) < 0:
            st.prompt_end[b] = seen + q
            if q > 1:
                policy.check_prompt(q)
        seen += q
        cost = self.token_costs(layer)[idx.long()]
        keep_window = layer.window_keep  # plain mixSGA stores at most this many tokens here
        if keep_window is None:
            seen_bytes = int(st.seen_bytes[b]) + int(cost[n - q :].sum())
        else:
            had = min(seen - q, keep_window)
            recent = torch.cat((st.recent[b, keep_window - had :], cost[n - q :]))[-keep_window:]
            st.recent[b] = 0
            st.recent[b, keep_window - recent.numel() :] = recent
            seen_bytes = int(recent.sum())
        score = torch.cat((st.score[b, :old], st.score.new_zeros(q)))
        chunk_valid = torch.ones((1, q), dtype=torch.bool, device=device)
        score = policy.update_scores(score[None, None], probs.float()[None, None], chunk_valid)[0, 0]
        valid = torch.ones(n, dtype=torch.bool, device=device)
        window = self.windows[layer.layer_idx]
        if window is not None:  # the next query (token index `seen`) sees only the last `window` tokens
            valid = slots > seen - window
        stored = seen if keep_window is None else min(seen, keep_window)
        cap = _floor_share(policy.keep, torch.tensor([[stored]], device=device))
        rank = policy.rank(score[None], valid[None], slots[None], cap, int(st.prompt_end[b]))[0]
        keep = keep_within_bytes(rank, valid, cost, int(_floor_share(policy.keep, torch.tensor(seen_bytes))))
        if not bool(keep.all()):
            layer.keep_tokens(keep, sample=b)
            score, slots, rope_pos = score[keep], slots[keep], rope_pos[keep]
        st.set_row(b, score, slots, rope_pos)
        st.seen[b], st.seen_bytes[b] = seen, seen_bytes
        if self.rotate is not None:
            self._reposition(layer, st, b)

    def _observe_batch(self, layer: MixSGALayer, probs: torch.Tensor) -> None:
        """A decode step, every sample at once: ``probs`` ``[B, H_q, N]`` in token order (one new token each)."""
        policy, st = self.policy, self._state(layer)
        batch, _, width = probs.shape
        device = probs.device
        st.reserve(width)
        ntok = layer.ntok
        col = (ntok - 1)[:, None]  # the new token's column
        st.slots.scatter_(1, col, st.seen[:, None])
        st.rope_pos.scatter_(1, col, st.seen[:, None])
        st.score.scatter_(1, col, 0.0)
        st.prompt_end = torch.where(st.prompt_end < 0, st.seen + 1, st.prompt_end)
        st.seen += 1
        columns = torch.arange(width, device=device)
        stored = columns < ntok[:, None]
        cost = torch.where(stored, self.token_costs(layer)[layer.index_buf[:, :width].long()], 0)
        keep_window = layer.window_keep
        if keep_window is None:
            st.seen_bytes += cost.gather(1, col)[:, 0]
        else:
            st.recent = torch.cat((st.recent[:, 1:], cost.gather(1, col)), dim=1)
            st.seen_bytes = st.recent.sum(1)
        slots = st.slots[:, :width]
        chunk_valid = torch.ones((batch, 1), dtype=torch.bool, device=device)
        score = policy.update_scores(st.score[:, None, :width], probs.float()[:, None, :, None, :], chunk_valid)[:, 0]
        valid = stored
        window = self.windows[layer.layer_idx]
        if window is not None:
            valid = valid & (slots > (st.seen - window)[:, None])
        cap = _floor_share(policy.keep, st.seen if keep_window is None else st.seen.clamp_max(keep_window))
        rank = policy.rank(score, valid, slots, cap[:, None], st.prompt_end[:, None])
        keep = keep_within_bytes(rank, valid, cost, _floor_share(policy.keep, st.seen_bytes))
        if bool((keep | ~stored).all()):
            st.score[:, :width] = score
            st.lens = ntok.clone()
        else:
            order = layer.keep_tokens_batch(keep)  # kept first, in token order (keep lies within `stored`)
            st.lens = keep.sum(1)
            inside = columns < st.lens[:, None]
            st.score[:, :width] = torch.where(inside, score.gather(1, order), 0.0)
            st.slots[:, :width] = slots.gather(1, order)
            st.rope_pos[:, :width] = st.rope_pos[:, :width].gather(1, order)
        if self.rotate is not None:
            self._reposition(layer, st)

    def _reposition(self, layer: MixSGALayer, st: LayerState, sample: int | None = None) -> None:
        """Rotate kept keys onto consecutive positions ending at the newest token's (every sample, or one)."""
        rows = slice(None) if sample is None else slice(sample, sample + 1)
        width = min(st.rope_pos.shape[1], layer._tok_bound)
        lens, columns = st.lens[rows], torch.arange(width, device=st.lens.device)
        inside = columns < lens[:, None]
        target = (st.seen[rows] - lens)[:, None] + columns
        delta = torch.where(inside, target - st.rope_pos[rows, :width], 0)
        if not bool(delta.any()):
            return
        for e in layer.experts:
            shift = layer.expert_slots(e, delta, inside, rows)
            lim = shift.shape[1]
            if lim == 0 or not bool(shift.any()):
                continue
            buf = layer.buffers[e]
            keys = buf[0, rows, :, :lim]
            buf[0, rows, :, :lim] = self.rotate(keys, shift[:, None, :].expand(-1, keys.shape[1], -1))
        st.rope_pos[rows, :width] = torch.where(inside, target, st.rope_pos[rows, :width])

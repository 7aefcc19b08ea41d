"""Token eviction as transformers cache classes: H2O, StreamingLLM, SnapKV, TOVA.

How it plugs into transformers 5.x (no patching of model code):

* :class:`EvictionCache` is a ``transformers.cache_utils.Cache`` whose layers are
  :class:`EvictionLayer` (a ``DynamicLayer`` subclass). ``update`` appends the new
  tokens' K/V and returns past + new, like ``DynamicLayer``.
* The attention function registered as ``"kv_eviction"`` in
  ``transformers.AttentionInterface`` (:func:`enable_eviction_attention` switches a
  model to it) computes attention explicitly, including the probabilities, and
  hands them to the cache layer that was just updated, which scores its tokens
  and evicts down to the budget. Without an eviction cache the function is plain
  exact attention, so the switched model still trains and evaluates normally.
  Probabilities are computed only for the queries the policy reads
  (``EvictionPolicy.score_rows``: StreamingLLM none, TOVA the newest, SnapKV its
  window, H2O all) when a prompt chunk has no padding; the output then comes from SDPA
  (soft-capped logits, Gemma 2: from ``hfconvert.softcap_attention``, the base model's
  own fused kernel), so a prompt prefill of those policies costs about what the base
  model's does (no attention weights are returned on that path).
* The layer reports the number of tokens *seen* as its sequence length (so
  positions and padding masks stay right) and asks transformers only for the
  mask of the current chunk; the mask over the kept past tokens is built from
  the layer's own bookkeeping (validity, absolute token index, sliding window).

Budget: ``keep`` is the kept fraction of the tokens seen, applied per sample and
after every forward pass (prefill and each decode step): sample ``b`` keeps
``floor(keep * n_b)`` of its ``n_b`` real (non-padding) tokens, so stored K/V
never exceeds ``keep`` x the base model's cache for the same tokens. Tensors are
rectangular over the batch; rows of samples that keep fewer tokens carry
masked filler slots, which are counted in the live bytes. Eviction happens after
the attention of a step, so inside one forward pass the current chunk is seen
in full (the standard prefill-then-compress behaviour). A cache given a
layer-wise ``budget`` (a ``baselines.policies.UniformBudget`` subclass, e.g.
PyramidKV's) keeps that layer's token count instead, per sample as well. On a
sliding-window layer (Gemma 2) the base model stores only the last ``W - 1`` tokens
(``DynamicSlidingWindowLayer``), so ``n_b`` there is ``min(n_b, W - 1)``: the budget is
``keep`` x what the base stores on every layer, and tokens outside the next query's
window are dropped first (they are dead).

Head-wise budgets: a cache given ``heads`` (a ``baselines.policies.EqualHeads``
subclass, e.g. AdaKV's) keeps the same ``kv_heads x cap`` tokens per layer and
sample but lets the heads' shares differ. Its layers are
:class:`PackedEvictionLayer`: between forward passes the kept K/V is stored
packed, ``[N, head_dim]`` with ``N`` the kept tokens summed over samples and
heads and ``lengths [B, kv_heads]``, so no head is padded to the longest and the
stored bytes are exactly the kept tokens' (no filler slots at all, even across a
padded batch). A forward pass unpacks it into the rectangular layout (filler
masked) as the attention's working memory and packs again after eviction.

Storage is at K/V-head granularity ``[batch, kv_heads, kept, head_dim]``, never
per query head. A group's query heads share one stored K/V, so H2O and SnapKV
sum their attention over the group's query heads into one score per K/V head
(the mean would rank identically) and each K/V head keeps its own token set;
TOVA averages over all heads of the layer and StreamingLLM is position-only, so
both keep the same tokens in every head.

Policies (``baselines.policies``: one small class each over the scorer base
``EvictionPolicy``; ``EvictionPolicy(method, keep, ...)`` builds the one named):

* ``h2o``: accumulated attention each key received from every query so far
  (heavy hitters) plus the most recent ``recent_fraction`` of the budget.
* ``streamingllm``: the first ``sink_tokens`` real tokens plus the most recent
  ones. Under RoPE the cached keys are re-rotated after eviction so that the
  kept tokens sit at consecutive positions ending just before the next query,
  i.e. the query sees the in-cache distances StreamingLLM prescribes. RoPE
  attention depends only on position differences, so this is done by rotating
  each stored key by (target - current position). OPT's learned absolute
  positions are baked into the hidden states and cannot be moved; there the
  original positions are kept (``EvictionCache.repositions`` is False).
* ``snapkv``: at prefill, the attention of the last ``window`` prompt queries
  (the observation window), average-pooled over neighbouring keys with
  ``kernel``; the window itself is always kept. During decode each generated
  query joins the observation window (its attention is added to the scores)
  and the ``window`` most recent tokens stay protected.
* ``tova``: the attention of the newest query, averaged over heads; the lowest
  tokens are evicted.

``compress_question=False`` with ``question_tokens=q`` protects the last ``q``
tokens of the prompt (the question) from eviction; they count against the
budget. The flag is part of the policy, so records can carry it.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from baselines.attention import decoder_layers
from hfconvert.softcap_attention import softcap_attention_forward
from kvledger import layer_windows
from baselines.policies import METHODS, POLICIES, QUERY_AWARE, EqualHeads, EvictionPolicy, UniformBudget, capacity

ATTENTION_NAME = "kv_eviction"
__all__ = ["ATTENTION_NAME", "METHODS", "POLICIES", "QUERY_AWARE", "EvictionCache", "EvictionLayer", "EvictionPolicy",
           "UniformBudget", "capacity", "enable_eviction_attention", "eviction_cache_factory", "forward_in_chunks",
           "grouped_attention", "rope_inv_freq", "rotate_keys", "EqualHeads", "PackedEvictionLayer",
           "uniform_budget"]

_PENDING = threading.local()


class EvictionLayer(DynamicLayer):
    """One layer's evicting K/V store; see the module docstring.

    Besides ``keys`` / ``values`` (``[B, kv_heads, S, D]``) it keeps, per stored
    slot, the absolute token index (``slots``), whether it holds a real token
    (``valid``), its eviction score and its current RoPE position. These are
    bookkeeping, reported apart from the K/V bytes (:meth:`metadata_bytes`).
    """

    is_croppable = False

    def __init__(self, policy: EvictionPolicy, layer_idx: int, sliding_window: int | None = None,
                 inv_freq: torch.Tensor | None = None, budget: UniformBudget | None = None,
                 heads: EqualHeads | None = None):
        super().__init__()
        self.policy = policy
        if budget is None:  # a share of what the base model stores here (sliding layer: the window's W - 1)
            windows = [None] * layer_idx + [None if sliding_window is None else sliding_window - 1]
            budget = UniformBudget(policy.keep, windows=windows)
        self.budget = budget
        self.heads = heads if heads is not None else EqualHeads()
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.inv_freq = inv_freq
        self.owner: object | None = None  # the EvictionCache holding this layer
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.slots = self.valid = self.score = self.rope_pos = None
        self.n_seen = 0
        self.n_real: torch.Tensor | None = None
        self.prompt_end: int | None = None
        self.awaiting_attention = False
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        bsz, heads, _, dim = key_states.shape
        self.keys = key_states.new_zeros((bsz, heads, 0, dim))
        self.values = value_states.new_zeros((bsz, heads, 0, value_states.shape[-1]))
        self.slots = torch.zeros((bsz, heads, 0), dtype=torch.long, device=self.device)
        self.valid = torch.zeros((bsz, heads, 0), dtype=torch.bool, device=self.device)
        self.score = torch.zeros((bsz, heads, 0), dtype=torch.float32, device=self.device)
        self.rope_pos = torch.zeros((bsz, heads, 0), dtype=torch.long, device=self.device)
        self.n_real = torch.zeros(bsz, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the chunk and return past + chunk; eviction follows in :meth:`observe`."""
        pending = getattr(_PENDING, "layer", None)
        stalled = pending is not None and pending.awaiting_attention and pending.owner is self.owner
        if self.awaiting_attention or stalled:
            raise RuntimeError(
                f"eviction cache layer {self.layer_idx} was updated twice without its attention scores: the model "
                f"is not using the {ATTENTION_NAME!r} attention; call baselines.enable_eviction_attention(model)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        bsz, heads, length, _ = key_states.shape
        new_slots = torch.arange(self.n_seen, self.n_seen + length, device=self.device)
        new_slots = new_slots.expand(bsz, heads, length)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.slots = torch.cat([self.slots, new_slots], dim=-1)
        self.valid = torch.cat([self.valid, torch.ones_like(new_slots, dtype=torch.bool)], dim=-1)
        self.score = torch.cat([self.score, torch.zeros_like(new_slots, dtype=torch.float32)], dim=-1)
        self.rope_pos = torch.cat([self.rope_pos, new_slots.clone()], dim=-1)
        self.n_seen += length
        self.awaiting_attention = True
        _PENDING.layer = self
        return self.keys, self.values

    # -- what transformers asks of a cache layer ------------------------------------------

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # transformers builds the mask of the current chunk only; the past is masked from our bookkeeping.
        return query_length, self.n_seen

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an evicting cache cannot be rolled back (crop)")

    def reset(self) -> None:
        self._clear()

    def _per_sample(self) -> list[str]:
        return ["keys", "values", "slots", "valid", "score", "rope_pos", "n_real"]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for name in self._per_sample():
                setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in self._per_sample():
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            for name in self._per_sample():
                setattr(self, name, getattr(self, name)[indices, ...])

    # -- sizes ------------------------------------------------------------------------------

    def kv_bytes(self) -> int:
        """Bytes of the stored K and V tensors (what the budget counts)."""
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def metadata_bytes(self) -> int:
        """Bytes of the per-slot bookkeeping (token index, validity, score, RoPE position)."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).nbytes for n in ("slots", "valid", "score", "rope_pos"))

    def kept_tokens(self) -> torch.Tensor:
        """Real tokens stored per sample and K/V head, ``[B, kv_heads]``."""
        return self.valid.sum(-1)

    # -- eviction ---------------------------------------------------------------------------

    def past_visibility(self, query_length: int) -> torch.Tensor:
        """``[B, kv_heads, T, S_past]``: which stored past slots each query of the current chunk may attend to."""
        past = self.keys.shape[-2] - query_length
        visible = self.valid[:, :, None, :past].expand(-1, -1, query_length, -1)
        if self.sliding_window is not None:
            q_slots = torch.arange(self.n_seen - query_length, self.n_seen, device=self.device)
            near = (q_slots[:, None] - self.slots[:, :, None, :past]) < self.sliding_window
            visible = visible & near
        return visible

    def observe(self, probs: torch.Tensor, chunk_valid: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        """Take the chunk's attention probabilities ``[B, kv_heads, group, R, S]``, score and evict.

        ``R``: the chunk's last ``R`` queries (all ``T`` of ``chunk_valid [B, T]``, or the policy's
        :meth:`~baselines.policies.EvictionPolicy.score_rows` when the chunk has no padding).
        """
        if not self.awaiting_attention:
            raise RuntimeError(f"eviction layer {self.layer_idx} got attention scores without an update")
        self.awaiting_attention = False
        bsz, heads, _, rows, total = probs.shape
        length = chunk_valid.shape[-1]
        if rows != length and (rows != self.policy.score_rows(length) or not bool(chunk_valid.all())):
            raise ValueError(f"eviction layer {self.layer_idx} got {rows} of {length} query rows; the policy reads "
                             f"{self.policy.score_rows(length)} (every row when the chunk has padding)")
        past = total - length
        policy = self.policy
        chunk_valid = chunk_valid.to(torch.bool)
        self.valid[:, :, past:] = chunk_valid[:, None, :]
        if position_ids is not None:
            pos = position_ids.to(self.device).long().expand(bsz, length)
            self.rope_pos[:, :, past:] = pos[:, None, :]
        self.n_real = self.n_real + chunk_valid.sum(-1)
        first_chunk = self.prompt_end is None
        if first_chunk:
            self.prompt_end = self.n_seen
            if length > 1:  # a prompt prefill, not token-by-token scoring
                policy.check_prompt(int(chunk_valid.sum(-1).min()))
        self.score = policy.update_scores(self.score, probs, chunk_valid[:, length - rows:])
        self._evict(position_ids)

    def _evict(self, position_ids: torch.Tensor | None) -> None:
        policy = self.policy
        valid = self.valid
        if self.sliding_window is not None:
            # The next query (token index n_seen) sees only slots > n_seen - window; older ones are dead.
            valid = valid & (self.slots > self.n_seen - self.sliding_window)
        cap = self.budget.tokens(self.layer_idx, self.n_real)[:, None, None]
        if not self.heads.ragged and bool((valid.sum(-1) <= cap[..., 0]).all()):
            # Every valid slot fits (half the steps of token-by-token decoding at 50 %): a selection
            # keeps valid & (rank < cap), and the valid slots rank 0 .. n - 1, so no ranking is needed.
            keep = valid
        else:
            keep = self.heads.select(policy, self.score, valid, self.slots, cap, self.prompt_end)
        total = keep.shape[-1]
        kept = keep.sum(-1)
        new_len = int(kept.max()) if total else 0
        if new_len == total:
            self.valid = keep
        else:
            index = torch.arange(total, device=self.device).expand_as(keep)
            if bool((kept == new_len).all()):  # equal rows (no padding): the kept slots in storage order
                chosen = index[keep].view(*keep.shape[:-1], new_len)
            else:  # kept slots first, in storage order, then filler
                chosen = torch.argsort(torch.where(keep, index, index + total), dim=-1)[..., :new_len]
            self.keys = self.keys.gather(2, chosen[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, chosen[..., None].expand(-1, -1, -1, self.values.shape[-1]))
            self.slots = self.slots.gather(-1, chosen)
            self.score = self.score.gather(-1, chosen)
            self.rope_pos = self.rope_pos.gather(-1, chosen)
            self.valid = keep.gather(-1, chosen)
        if policy.repositions and self.inv_freq is not None and position_ids is not None:
            self._reposition(position_ids)

    def _reposition(self, position_ids: torch.Tensor) -> None:
        """Rotate kept keys so they occupy consecutive RoPE positions ending at the newest token's."""
        bsz = self.keys.shape[0]
        newest = position_ids.to(self.device).long().expand(bsz, -1)[:, -1]
        kept = self.valid.sum(-1, keepdim=True)
        order = self.valid.long().cumsum(-1) - 1
        target = newest[:, None, None] - (kept - 1 - order)
        delta = torch.where(self.valid, target - self.rope_pos, 0)
        if not bool(delta.any()):
            return
        self.keys = rotate_keys(self.keys, delta, self.inv_freq)
        self.rope_pos = torch.where(self.valid, target, self.rope_pos)


class PackedEvictionLayer(EvictionLayer):
    """An :class:`EvictionLayer` whose K/V heads keep different numbers of tokens, stored packed.

    Between forward passes (``packed``): ``keys`` / ``values`` ``[N, D]``, ``slots`` /
    ``score`` / ``rope_pos`` ``[N]``, sample-major, then head, then storage order, and
    ``lengths [B, kv_heads]`` (``valid`` is None: every stored slot is a kept token).
    ``update`` unpacks into the base layer's rectangular layout, filler slots invalid,
    and eviction packs again, so the rectangle exists only inside a forward pass.
    """

    _PACKED = ("keys", "values", "slots", "score", "rope_pos")

    def _clear(self) -> None:
        super()._clear()
        self.lengths: torch.Tensor | None = None
        self.packed = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.packed:
            self._unpack()
        return super().update(key_states, value_states, *args, **kwargs)

    def _evict(self, position_ids: torch.Tensor | None) -> None:
        super()._evict(position_ids)
        self._pack()

    def _pack(self) -> None:
        keep = self.valid
        self.lengths = keep.sum(-1)
        for name in self._PACKED:  # boolean indexing keeps (sample, head, storage) order
            setattr(self, name, getattr(self, name)[keep])
        self.valid, self.packed = None, True

    def _unpack(self) -> None:
        bsz, heads = self.lengths.shape
        width = int(self.lengths.max()) if self.lengths.numel() else 0
        valid = torch.arange(width, device=self.device) < self.lengths[..., None]
        for name in self._PACKED:
            flat = getattr(self, name)
            rect = flat.new_zeros((bsz, heads, width, *flat.shape[1:]))
            rect[valid] = flat
            setattr(self, name, rect)
        self.valid, self.lengths, self.packed = valid, None, False

    def _rectangular(self, op: Callable[[], None]) -> None:
        """Run a batch operation of the base layer on the unpacked layout, then pack again."""
        was_packed = self.packed
        if was_packed:
            self._unpack()
        op()
        if was_packed:
            self._pack()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rectangular(lambda: super(PackedEvictionLayer, self).reorder_cache(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rectangular(lambda: super(PackedEvictionLayer, self).batch_repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rectangular(lambda: super(PackedEvictionLayer, self).batch_select_indices(indices))

    def metadata_bytes(self) -> int:
        if not self.packed:
            return super().metadata_bytes()
        return sum(getattr(self, n).nbytes for n in ("slots", "score", "rope_pos", "lengths"))

    def kept_tokens(self) -> torch.Tensor:
        return self.lengths.clone() if self.packed else super().kept_tokens()

    def per_head(self, name: str = "slots") -> list[list[torch.Tensor]]:
        """A packed per-slot tensor (``slots``, ``keys``, ...) split as ``[sample][head]``."""
        if not self.packed:
            raise RuntimeError("per_head reads the packed store, between forward passes")
        parts = torch.split(getattr(self, name), self.lengths.flatten().tolist())
        heads = self.lengths.shape[1]
        return [list(parts[b * heads:(b + 1) * heads]) for b in range(self.lengths.shape[0])]


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE-rotated ``keys`` ``[B, H, S, D]`` by ``delta`` ``[B, H, S]`` positions (Llama / Gemma half-split RoPE)."""
    freq = inv_freq.to(device=keys.device, dtype=torch.float64)
    lo, hi = (int(v) for v in torch.aminmax(delta))
    # Few distinct shifts (StreamingLLM's steady state: 0 for the sinks, -1 for the rest): the cos / sin of
    # each shift once, gathered per slot; the same float64 products, so the same values.
    few = hi - lo + 1 < delta.numel()
    shifts = torch.arange(lo, hi + 1, device=keys.device, dtype=torch.float64) if few else delta.to(torch.float64)
    angles = shifts[..., None] * freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if few:
        cos, sin = cos[delta - lo], sin[delta - lo]
    k = keys.to(torch.float64)
    half = k.shape[-1] // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * cos + rotated * sin).to(keys.dtype)


def uniform_budget(config, keep: float) -> UniformBudget:
    """A cache's default layer budgets: every layer of ``config``'s model keeps ``floor(keep x`` what the base stores
    there ``)`` (a sliding-window layer: of its window's tokens)."""
    return UniformBudget(keep, windows=layer_windows(config))


class EvictionCache(Cache):
    """A cache of :class:`EvictionLayer` for every decoder layer of a model config.

    Make a new one for every ``generate`` call or sequence batch; state is never
    shared between caches.
    """

    def __init__(self, config, policy: EvictionPolicy, inv_freq: torch.Tensor | None = None,
                 budget: UniformBudget | None = None, heads: EqualHeads | None = None):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = int(text.num_hidden_layers)
        types = getattr(text, "layer_types", None) or ["full_attention"] * layers
        window = getattr(text, "sliding_window", None)
        budget = budget if budget is not None else uniform_budget(config, policy.keep)
        heads = heads if heads is not None else EqualHeads()
        layer_class = PackedEvictionLayer if heads.ragged else EvictionLayer  # ragged heads are stored packed
        built = [
            layer_class(policy, i, sliding_window=window if t == "sliding_attention" else None, inv_freq=inv_freq,
                        budget=budget, heads=heads)
            for i, t in enumerate(types[:layers])
        ]
        super().__init__(layers=built)
        for layer in built:
            layer.owner = self
        self.policy = policy

    @property
    def repositions(self) -> bool:
        """Whether StreamingLLM positions are re-rotated (RoPE model) rather than kept as original."""
        return self.policy.repositions and self.layers[0].inv_freq is not None

    def kv_bytes(self) -> int:
        """Summed ``nbytes`` of every layer's stored K and V."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def metadata_bytes(self) -> int:
        return sum(layer.metadata_bytes() for layer in self.layers)


# -- the attention function ------------------------------------------------------------------

def _take_pending(layer_idx: int | None) -> EvictionLayer | None:
    layer = getattr(_PENDING, "layer", None)
    _PENDING.layer = None
    if layer is not None and layer_idx is not None and layer.layer_idx != layer_idx:
        raise RuntimeError(f"attention of layer {layer_idx} received the cache update of layer {layer.layer_idx}")
    return layer


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                      scaling: float, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with explicit probabilities, K/V at their own head count (no repeat).

    ``query [B, H, T, D]``, ``key``/``value [B, Hkv, S, D]``, ``allowed`` bool
    broadcastable to ``[B, Hkv, T, S]``. Returns the output ``[B, T, H, D]`` and
    the probabilities ``[B, Hkv, H // Hkv, T, S]`` (float32).
    """
    bsz, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    # A group's queries as rows of one matrix per K/V head: a broadcast over a size-1 group dim of K/V
    # would make matmul materialise K and V once per query head (8x slower at 4 heads a group).
    grouped = query.reshape(bsz, kv_heads, group * length, dim)
    logits = torch.matmul(grouped, key.transpose(-1, -2)).float().view(bsz, kv_heads, group, length, -1)
    logits.mul_(scaling)  # in place on the fresh logits: a prefill's are [B, Hkv, G, T, S] floats
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits.masked_fill_(~allowed.unsqueeze(2), torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    output = torch.matmul(probs.to(value.dtype).view(bsz, kv_heads, group * length, -1), value)
    return output.reshape(bsz, heads, length, -1).transpose(1, 2).contiguous(), probs


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def eviction_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    sliding_window: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"kv_eviction"`` attention: exact attention that feeds its probabilities to an evicting cache layer.

    Dropout is not applied: eviction is an inference-time method.
    """
    if scaling is None:
        scaling = module.head_dim**-0.5
    length, total = query.shape[2], key.shape[2]
    layer = _take_pending(getattr(module, "layer_idx", None))
    if attention_mask is None:
        chunk = torch.ones(length, total, dtype=torch.bool, device=query.device).tril(total - length)
        mask = chunk[None, None]
    else:
        mask = _as_bool(attention_mask)
    if layer is None:
        output, probs = grouped_attention(query, key, value, mask, scaling, softcap)
        return output, probs.flatten(1, 2)
    chunk_mask = mask[..., -length:]
    bsz = query.shape[0]
    chunk_mask = chunk_mask.expand(bsz, -1, -1, -1)
    chunk_valid = torch.diagonal(chunk_mask[:, 0], dim1=-2, dim2=-1)
    past = key.shape[2] - length
    allowed = torch.cat([layer.past_visibility(length), chunk_mask.expand(-1, key.shape[1], -1, -1)], dim=-1)
    rows = layer.policy.score_rows(length)
    fast = 1 < length and rows < length and bool(chunk_valid.all())
    if fast:
        heads_equal = past == 0 or key.shape[1] == 1 or bool((allowed == allowed[:, :1]).all())
        fast = softcap is None or (heads_equal and query.dtype == torch.float32)  # one mask for the fused kernel
    if fast:
        # A prompt chunk whose policy reads only the last `rows` queries' probabilities (StreamingLLM none,
        # TOVA the newest, SnapKV its window): the output through SDPA, explicit probabilities for those
        # rows alone (2.3-3.9x faster prefill, benchmarks/eviction_rows.py). Soft-capped logits (Gemma 2)
        # take the fused soft-capped attention instead of SDPA (hfconvert.softcap_attention, the function
        # transformers' eager Gemma 2 attention computes). A one-query decode step gains nothing (measured:
        # 0.95-0.99x for StreamingLLM), so it stays explicit. Every query sees itself (no padding), so no
        # row is empty. Returns no attention weights.
        if softcap is not None:
            additive = torch.zeros(allowed[:, :1].shape, dtype=query.dtype, device=query.device)
            additive.masked_fill_(~allowed[:, :1], torch.finfo(query.dtype).min)
            output, _ = softcap_attention_forward(module, query, key, value, additive, scaling=scaling,
                                                  softcap=softcap, sliding_window=sliding_window)
            output = output.transpose(1, 2)  # back to [B, H, T, D], as SDPA's
        else:
            mask = allowed[:, :1] if heads_equal else allowed.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        if rows:
            _, probs = grouped_attention(query[:, :, length - rows:], key, value, allowed[:, :, length - rows:],
                                         scaling, softcap)
        else:
            probs = query.new_empty((bsz, key.shape[1], query.shape[1] // key.shape[1], 0, key.shape[2]),
                                    dtype=torch.float32)
        layer.observe(probs, chunk_valid, position_ids)
        return output.transpose(1, 2).contiguous(), None
    output, probs = grouped_attention(query, key, value, allowed, scaling, softcap)
    layer.observe(probs, chunk_valid, position_ids)
    return output, probs.flatten(1, 2)


def _chunk_mask(*args, **kwargs):
    # Always materialise the boolean mask (never the is_causal shortcut): padding must be readable.
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_eviction_attention() -> None:
    """Register ``"kv_eviction"`` in transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, eviction_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _chunk_mask)


def enable_eviction_attention(model: nn.Module) -> nn.Module:
    """Switch ``model`` to the ``"kv_eviction"`` attention; returns it. Exact attention without an eviction cache."""
    register_eviction_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    return model


def rope_inv_freq(model: nn.Module) -> torch.Tensor | None:
    """The model's RoPE inverse frequencies (``None`` for models without RoPE, e.g. OPT)."""
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            if 2 * inv_freq.numel() != head_dim:
                raise ValueError("partial-rotary RoPE is not supported by the StreamingLLM repositioning")
            return inv_freq.detach().clone()
    return None


def eviction_cache_factory(model: nn.Module, policy: EvictionPolicy) -> Callable[[], EvictionCache]:
    """Enable the eviction attention on ``model`` and return a function making a fresh cache per call."""
    if any(getattr(layer.self_attn, "kv_source", None) is not None for layer in decoder_layers(model)):
        raise ValueError("token eviction on a CLA model (layers sharing K/V) is not supported")
    enable_eviction_attention(model)
    inv_freq = rope_inv_freq(model)
    config = model.config
    return lambda: EvictionCache(config, policy, inv_freq=inv_freq)


def forward_in_chunks(model: nn.Module, input_ids: torch.Tensor, cache: Cache, chunk_size: int = 1,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for every position, feeding ``input_ids`` through ``cache`` ``chunk_size`` tokens at a time.

    This is how a bounded cache must be scored (perplexity): inside one forward
    pass a chunk sees itself in full, so eviction only bites between chunks.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    logits = []
    for start in range(0, input_ids.shape[1], chunk_size):
        stop = min(start + chunk_size, input_ids.shape[1])
        mask = attention_mask[:, :stop] if attention_mask is not None else None
        out = model(input_ids=input_ids[:, start:stop], attention_mask=mask, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)

"""Token-eviction policies as small classes over one scorer base (after kvpress's ``ScorerPress``).

A policy answers two questions, both pure tensor functions shared by the
baseline cache (``baselines.eviction``) and by eviction stacked on mixSGA
(``mixsga.eviction``):

* :meth:`EvictionPolicy.update_scores`: how one chunk's attention probabilities
  change every stored slot's score (kvpress's ``score``);
* :meth:`EvictionPolicy.rank`: the preference order of the slots. The base class
  ranks by (protection tier, score); a policy only says which slots it protects
  (:meth:`EvictionPolicy.protect`) and, for position-only policies, what to sort by.

``EvictionPolicy("h2o", keep, **fields)`` builds the registered class of that
name (:data:`POLICIES`); every policy carries every field (the params a record
stores), each reads the ones it needs. How much a layer keeps is
:class:`UniformBudget` unless a cache is given layer-wise budgets; how it splits over
K/V heads is :class:`EqualHeads` unless a cache is given head-wise budgets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EvictionPolicy:
    """The scorer base: fields, validation and the shared ranking (see the module docstring)."""

    method: str
    keep: float
    recent_fraction: float = 0.5
    sink_tokens: int = 4
    window: int = 32
    kernel: int = 5
    compress_question: bool = True
    question_tokens: int = 0
    reposition: bool = True

    #: The registered name of the class (``method`` must equal it).
    name: ClassVar[str] = ""
    #: Whether the selection looks at queries (and so at the question, when it is in the prompt).
    query_aware: ClassVar[bool] = True

    def __new__(cls, method: str | None = None, *args, **kwargs):
        # EvictionPolicy("h2o", ...) builds the class registered as "h2o"; copies pass no args.
        if cls is EvictionPolicy and method is not None:
            if method not in POLICIES:
                raise ValueError(f"unknown eviction method {method!r}; known: {', '.join(POLICIES)}")
            cls = POLICIES[method]
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if self.method != self.name:
            raise ValueError(f"{type(self).__name__} is the {self.name!r} policy, not {self.method!r}")
        # a bool is an int to isinstance: keep=True would silently mean keep everything
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise ValueError(f"keep fraction must be a number in (0, 1], got {self.keep!r}")
        if not 0 <= self.recent_fraction <= 1:
            raise ValueError(f"recent_fraction must be in [0, 1], got {self.recent_fraction!r}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens!r}")
        if self.window < 1:
            raise ValueError(f"SnapKV observation window must be >= 1, got {self.window!r}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV pooling kernel must be a positive odd number, got {self.kernel!r}")
        if self.question_tokens < 0:
            raise ValueError(f"question_tokens must be >= 0, got {self.question_tokens!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def repositions(self) -> bool:
        """Whether kept keys are re-rotated onto consecutive RoPE positions after eviction."""
        return False

    def check_context(self, context_len: int) -> None:
        """ValueError when a prompt of ``context_len`` tokens leaves this policy nothing sensible to do."""

    def check_prompt(self, shortest: int) -> None:
        """ValueError when a prefill's shortest prompt (``shortest`` real tokens) is too short for the policy."""

    def score_rows(self, length: int) -> int:
        """How many of a chunk's last queries :meth:`update_scores` reads, of ``length`` (the base: none).

        An eviction cache may hand it the probabilities of those trailing rows only (and ``chunk_valid``
        cut to them); a chunk with padding always gets every row.
        """
        return 0

    def update_scores(self, score: torch.Tensor, probs: torch.Tensor, chunk_valid: torch.Tensor) -> torch.Tensor:
        """Scores after one chunk's attention (the base: scores unchanged).

        ``probs`` ``[B, K, R, T, S]``: the T chunk queries' probabilities over all S
        stored slots (chunk included), for K score rows (K/V heads) of R query heads
        each; ``chunk_valid`` ``[B, T]`` marks real queries; ``score`` ``[B, K, S]``
        (zero for the chunk's new slots). Returns the new ``[B, K, S]`` scores.
        """
        return score

    @staticmethod
    def _weights(probs: torch.Tensor, chunk_valid: torch.Tensor) -> torch.Tensor:
        """``probs`` with padding queries zeroed (``probs`` itself when there is no padding: x * 1 is x)."""
        if bool(chunk_valid.all()):
            return probs
        return probs * chunk_valid.to(probs.dtype)[:, None, None, :, None]

    def protect(self, tier: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, from_start: torch.Tensor,
                from_end: torch.Tensor, cap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tier, value)``: a policy's protected slots (higher tier first) and what ranks within a tier.

        ``from_start`` / ``from_end``: each slot's rank among the valid slots from the
        oldest / newest; the base protects nothing and ranks by score (``value``).
        """
        return tier, value

    def rank(self, score: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor, cap: torch.Tensor,
             prompt_end: int | None) -> torch.Tensor:
        """Preference rank of every slot (0 = kept first); invalid slots rank last.

        ``score``, ``valid``, ``slots`` (absolute token index) are ``[..., S]``; ``cap``
        ``[..., 1]`` is the token budget (it sizes H2O's recent window and bounds the
        protected question); ``prompt_end`` is the token index after the prompt.
        Keeping ``valid & (rank < cap)`` is the policy's selection.
        """
        return self.order(*self.priority(score, valid, slots, cap, prompt_end))

    def priority(self, score: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor, cap: torch.Tensor,
                 prompt_end: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tier, value)`` of every slot (:meth:`rank`'s arguments): higher tier first, then higher value.

        Invalid slots are tier -1. The key is comparable across rows of the same layer, so a
        selection over several K/V heads at once (head-wise budgets) can order them together.
        """
        from_start = valid.long().cumsum(-1) - 1
        from_end = valid.sum(-1, keepdim=True) - 1 - from_start
        tier, value = self.protect(torch.zeros_like(slots), score.clone(), slots, from_start, from_end, cap)
        if not self.compress_question and self.question_tokens and prompt_end is not None:
            question = (slots >= prompt_end - self.question_tokens) & (slots < prompt_end) & valid
            if bool((question.sum(-1, keepdim=True) > cap).any()):
                raise ValueError(
                    f"the protected question ({self.question_tokens} tokens) does not fit the budget of "
                    f"{int(cap.min())} tokens (keep={self.keep})"
                )
            tier = torch.where(question, 3, tier)
        return torch.where(valid, tier, -1), value

    @staticmethod
    def order(tier: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Preference rank (0 = first) along the last dim by (tier, value), best first; ties in storage order."""
        # Rank slots by (tier, value), best first; stable sorts keep ties in storage order.
        by_value = torch.argsort(value, dim=-1, descending=True, stable=True)
        by_tier = torch.argsort(tier.gather(-1, by_value), dim=-1, descending=True, stable=True)
        order = by_value.gather(-1, by_tier)
        positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
        return torch.empty_like(order).scatter_(-1, order, positions)


class H2O(EvictionPolicy):
    """Heavy hitters: attention each key received from every query so far, plus a recent window."""

    name = "h2o"

    def score_rows(self, length: int) -> int:
        return length  # every query's attention accumulates

    def update_scores(self, score, probs, chunk_valid):
        return score + self._weights(probs, chunk_valid).sum(dim=(2, 3))

    def protect(self, tier, value, slots, from_start, from_end, cap):
        recent = from_end < torch.floor(cap * self.recent_fraction + 1e-9).long()
        return torch.where(recent, 1, tier), value


class StreamingLLM(EvictionPolicy):
    """Attention sinks (the first ``sink_tokens`` real tokens) plus the most recent tokens; position only."""

    name = "streamingllm"
    query_aware = False

    @property
    def repositions(self) -> bool:
        return self.reposition

    def check_context(self, context_len: int) -> None:
        kept = int(self.keep * context_len + 1e-9)
        if self.sink_tokens >= kept:
            raise ValueError(f"StreamingLLM keeps {kept} of {context_len} tokens: no room for a recent window "
                             f"after {self.sink_tokens} sink tokens")

    def protect(self, tier, value, slots, from_start, from_end, cap):
        sink = from_start < self.sink_tokens
        # earliest sinks, then newest tokens
        return torch.where(sink, 2, tier), torch.where(sink, -slots, slots).float()


class SnapKV(EvictionPolicy):
    """Attention of an observation window of the last ``window`` queries, pooled with ``kernel``."""

    name = "snapkv"

    def check_context(self, context_len: int) -> None:
        if self.window >= context_len:
            raise ValueError(f"SnapKV observation window ({self.window}) is not shorter than the context "
                             f"({context_len} tokens)")

    def check_prompt(self, shortest: int) -> None:
        if shortest < self.window:
            raise ValueError(
                f"SnapKV observation window ({self.window} tokens) is longer than the prompt ({shortest} tokens)"
            )

    def score_rows(self, length: int) -> int:
        # the observation window; a prompt chunk (> 1 query) is pooled, so a cut chunk keeps at least 2 rows
        return length if self.window < 2 else min(self.window, length)

    def update_scores(self, score, probs, chunk_valid):
        bsz, heads, _, length, total = probs.shape
        weights = self._weights(probs, chunk_valid)
        # Queries among the last `window` real queries of the chunk form the observation window.
        later = chunk_valid.flip(-1).long().cumsum(-1).flip(-1) - chunk_valid.long()
        in_window = chunk_valid & (later < self.window)
        gain = (weights * in_window.to(probs.dtype)[:, None, None, :, None]).sum(dim=(2, 3))
        if length > 1:
            gain = F.avg_pool1d(gain.reshape(bsz * heads, 1, total), self.kernel, stride=1,
                                padding=self.kernel // 2, count_include_pad=False).reshape(bsz, heads, total)
        return score + gain

    def protect(self, tier, value, slots, from_start, from_end, cap):
        return torch.where(from_end < self.window, 1, tier), value


class TOVA(EvictionPolicy):
    """The newest query's attention, averaged over heads; the lowest tokens go."""

    name = "tova"

    def score_rows(self, length: int) -> int:
        return min(1, length)  # the newest query

    def update_scores(self, score, probs, chunk_valid):
        bsz, heads, _, length, total = probs.shape
        weights = self._weights(probs, chunk_valid)
        steps = torch.arange(1, length + 1, device=probs.device)
        last = (chunk_valid.long() * steps).argmax(-1)  # newest real query of each sample
        rows = weights[torch.arange(bsz, device=probs.device), :, :, last, :]  # [B, K, R, S]
        return rows.mean(dim=(1, 2))[:, None, :].expand(bsz, heads, total).contiguous()


#: Every policy by name; ``EvictionPolicy(name, ...)`` builds one.
POLICIES: dict[str, type[EvictionPolicy]] = {cls.name: cls for cls in (H2O, StreamingLLM, SnapKV, TOVA)}
METHODS = tuple(POLICIES)
#: Whether a policy's selection looks at queries (and so at the question, when it is in the prompt).
QUERY_AWARE = {name: cls.query_aware for name, cls in POLICIES.items()}


def capacity(keep: float, seen: torch.Tensor) -> torch.Tensor:
    """Tokens a sample may keep after seeing ``seen`` real tokens: ``floor(keep * seen)``."""
    return torch.floor(seen.double() * keep + 1e-9).long()


class UniformBudget:
    """Every layer keeps ``floor(keep * stored)`` of what the base model stores of a sample's ``seen`` real tokens.

    ``stored`` is ``seen``, or ``min(seen, windows[layer])`` on a sliding-window layer
    (``windows``: per layer the tokens the base keeps there, ``kvledger.layer_windows``;
    None: every token). Layer-wise budgets (PyramidKV) subclass this and answer per
    layer; the total over layers is what the method's analytic bytes count.
    """

    def __init__(self, keep: float, windows: Sequence[int | None] | None = None):
        self.keep = float(keep)
        self.windows = tuple(windows or ())

    def stored(self, layer_idx: int, seen: torch.Tensor) -> torch.Tensor:
        """What the base model stores of ``seen`` (``[B]``) on layer ``layer_idx``."""
        window = self.windows[layer_idx] if layer_idx < len(self.windows) else None
        return seen if window is None else seen.clamp_max(window)

    def tokens(self, layer_idx: int, seen: torch.Tensor) -> torch.Tensor:
        """Tokens layer ``layer_idx`` keeps per sample (``seen``: real tokens per sample, ``[B]``)."""
        return capacity(self.keep, self.stored(layer_idx, seen))


class EqualHeads:
    """Every K/V head keeps its own ``cap`` best-ranked slots: the baselines' split of a layer's budget.

    Head-wise allocations (AdaKV, ``harness.methods.adakv``) answer :meth:`select` with the
    same layer total, ``kv_heads x cap`` per sample, split across heads by score; they set
    ``ragged`` so the cache stores heads of different lengths packed (``baselines.eviction``).
    """

    #: Whether heads of one sample may keep different numbers of tokens.
    ragged = False

    def select(self, policy: EvictionPolicy, score: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor,
               cap: torch.Tensor, prompt_end: int | None) -> torch.Tensor:
        """Keep mask ``[B, kv_heads, S]``; ``cap`` ``[B, 1, 1]``: tokens per head (the layer keeps heads x cap)."""
        return valid & (policy.rank(score, valid, slots, cap, prompt_end) < cap)

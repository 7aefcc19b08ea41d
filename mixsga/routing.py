"""The router and the two routing rules (paper Eqs. 1-5).

* ``MixSGARouter``: one linear layer per attention layer, ``S(x) = sigmoid(x W + b)``
  over E experts; weight He-initialised, bias zero. Its input is the normed hidden
  state that feeds the layer's K/V projections.
* ``expert_choice``: progressive expert-choice top-⌈ρ_e·n⌉ per sequence over the
  real tokens only (padding is excluded from the ranking and from n). Vectorised
  over batch and tokens; the only Python loop is over the E experts. Ties are
  broken by position (stable sort), so routing is deterministic.
* ``argmax_route``: each token picks its own expert at decode (context-free);
  switched-off experts (ratio 0) are never chosen.
* ``aux_loss``: trains argmax to agree with the expert-choice index. Masks are
  hard, so the LM loss sends no gradient to the router; only this loss trains it.
* ``straight_through_gate``: the ``router_grad="straight_through"`` variant's
  per-token K/V multiplier, exactly 1 forward, whose gradient lets the LM loss
  train the router too.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class MixSGARouter(nn.Linear):
    """``hidden -> E`` router logits; scores are ``sigmoid(logits)``."""

    def __init__(self, hidden_size: int, num_experts: int, *, device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, bias=True, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # He (Kaiming) normal over fan-in, zero bias, as the paper states.
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.bias)


def expert_capacities(ratios: Sequence[float], n_real: torch.Tensor) -> torch.Tensor:
    """``ceil(ρ_e · n)`` per sample and expert, as a ``[B, E]`` long tensor.

    The tiny slack keeps float ratios such as 0.3 × 10 = 3.0000000000000004 from
    rounding up to 4.
    """
    rho = torch.tensor(ratios, dtype=torch.float64, device=n_real.device)
    return torch.ceil(n_real.to(torch.float64)[:, None] * rho[None, :] - 1e-9).clamp_min(0).long()


def expert_choice(
    scores: torch.Tensor, real: torch.Tensor, ratios: Sequence[float]
) -> torch.Tensor:
    """Progressive expert-choice routing of one chunk.

    ``scores`` ``[B, L, E]`` router scores, ``real`` ``[B, L]`` bool (False = padding).
    Returns ``[B, L]`` expert ids; padding gets the last active expert (never stored,
    masked out of attention).
    """
    batch, length, num_experts = scores.shape
    active = [e for e, r in enumerate(ratios) if r > 0]
    last = active[-1]
    caps = expert_capacities(ratios, real.sum(dim=1))
    expert = torch.full((batch, length), last, dtype=torch.long, device=scores.device)
    taken = ~real
    positions = torch.arange(length, device=scores.device).expand(batch, length)
    for e in active[:-1]:
        masked = scores[..., e].masked_fill(taken, -math.inf)
        order = masked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        pick = (rank < caps[:, e : e + 1]) & ~taken
        expert = torch.where(pick, e, expert)
        taken = taken | pick
    return expert


def argmax_route(logits: torch.Tensor, active: Sequence[bool]) -> torch.Tensor:
    """Decode-time routing: ``argmax_e S(x)`` over the active experts, ``[B, L]``."""
    if all(active):
        return logits.argmax(dim=-1)
    return logits.masked_fill(_switched_off(tuple(bool(a) for a in active), logits.device), -math.inf).argmax(dim=-1)


@functools.lru_cache(maxsize=64)
def _switched_off(active: tuple[bool, ...], device: torch.device) -> torch.Tensor:
    """Mask of the experts with ratio 0, made once per device (decode calls this every layer and step)."""
    return torch.tensor([not a for a in active], device=device)


def random_route(
    shape: tuple[int, int], ratios: Sequence[float], generator: torch.Generator, device
) -> torch.Tensor:
    """Random-router ablation at decode: an expert drawn from the ratios, ``[B, L]``."""
    probs = torch.tensor(ratios, dtype=torch.float64)
    draw = torch.multinomial(probs, shape[0] * shape[1], replacement=True, generator=generator)
    return draw.view(shape).to(device)


def aux_loss(logits: torch.Tensor, target: torch.Tensor, real: torch.Tensor, kind: str) -> torch.Tensor:
    """Prefill-decode consistency loss of one layer, averaged over real tokens.

    ``"softmax"``: cross-entropy of the E logits against the expert-choice index.
    ``"sigmoid"``: binary cross-entropy of each sigmoid score against the one-hot
    target, summed over experts.
    """
    z = logits[real].float()
    t = target[real]
    if z.numel() == 0:
        return logits.sum() * 0.0
    if kind == "softmax":
        return F.cross_entropy(z, t)
    if kind == "sigmoid":
        onehot = F.one_hot(t, z.shape[-1]).to(z.dtype)
        return F.binary_cross_entropy_with_logits(z, onehot, reduction="sum") / z.shape[0]
    raise ValueError(f"unknown aux loss {kind!r}; expected 'softmax' or 'sigmoid'")


def straight_through_gate(
    logits: torch.Tensor, expert: torch.Tensor, real: torch.Tensor | None
) -> torch.Tensor:
    """``[B, L]`` gate ``g = 1 + s - stopgrad(s)``, ``s = sigmoid(logit of the token's own expert)``.

    Forward, ``s - stopgrad(s)`` is exactly 0.0 (``s`` is finite), so ``g`` is exactly 1.0 and
    multiplying a token's K and V by it changes no bit. Backward, ``dg/ds = 1``: scaling the
    routed K/V ``(K_t, V_t)`` by ``g_t`` gives ``dL/ds_t = <dL/dK_t, K_t> + <dL/dV_t, V_t>``,
    the gradient a soft gate ``s_t · (K_t, V_t)`` (a Switch-style MoE gate) would get at ``s_t = 1``:
    whether the LM loss wants this token's keys and values weighted up or down. Padding
    (``real`` False) gets a constant 1.
    """
    scores = torch.sigmoid(logits.float().gather(-1, expert.unsqueeze(-1)).squeeze(-1))
    gate = 1.0 + (scores - scores.detach())
    if real is not None:
        gate = torch.where(real, gate, torch.ones_like(gate))
    return gate


class RoutingStats:
    """Per-layer routing counts, accumulated across forwards until ``reset()``.

    * ``prefill``: tokens per expert under expert-choice routing (training / prefill).
    * ``decode``: tokens per expert under argmax routing (decode).
    * ``agree`` / ``compared``: expert-choice tokens whose argmax pick agrees.
    """

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.reset()

    def reset(self) -> None:
        self.prefill = [[0] * self.num_experts for _ in range(self.num_layers)]
        self._decode = [[0] * self.num_experts for _ in range(self.num_layers)]
        # Decode expert ids not yet counted: (layer, expert, real) device tensors, folded into
        # ``decode`` when read, so that decoding never waits on a host read of expert ids.
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        self.agree = [0] * self.num_layers
        self.compared = [0] * self.num_layers

    def add_expert_choice(
        self, layer: int, expert: torch.Tensor, argmax: torch.Tensor | None, real: torch.Tensor
    ) -> None:
        """Count one expert-choice pass; ``argmax`` None (random or forced routing) skips agreement."""
        ids = expert[real]
        counts = torch.bincount(ids, minlength=self.num_experts).tolist()
        row = self.prefill[layer]
        for e, c in enumerate(counts):
            row[e] += c
        if argmax is not None:
            self.agree[layer] += int((argmax[real] == ids).sum())
            self.compared[layer] += int(ids.numel())

    def add_decode(self, layer: int, ids: Sequence[int]) -> None:
        """Count decode tokens by expert id; negative ids (padding) are skipped."""
        row = self.decode[layer]
        for e in ids:
            if e >= 0:
                row[e] += 1

    def add_decode_tensor(self, layer: int, expert: torch.Tensor, real: torch.Tensor | None) -> None:
        """Count decode tokens without a host read: ``expert`` ``[B, q]`` ids, ``real`` ``[B, q]`` or None.

        The tensors are kept (no op on the hot path) and counted when ``decode`` is read, or
        every ``PENDING_LIMIT`` entries so that a long generation does not pile them up.
        """
        self._pending.append((layer, expert, real))
        if len(self._pending) >= self.PENDING_LIMIT:
            self._fold()

    PENDING_LIMIT = 4096

    def _fold(self) -> None:
        pending, self._pending = self._pending, []
        by_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
        for layer, expert, real in pending:
            by_layer.setdefault(layer, []).append((expert, real))
        for layer, items in by_layer.items():
            ids = torch.cat([(e if r is None else e.masked_fill(~r, -1)).reshape(-1) for e, r in items])
            counts = torch.bincount(ids[ids >= 0], minlength=self.num_experts).tolist()
            row = self._decode[layer]
            for e, c in enumerate(counts):
                row[e] += c

    @property
    def decode(self) -> list[list[int]]:
        """Tokens per layer and expert under argmax routing (pending device counts folded in)."""
        if self._pending:
            self._fold()
        return self._decode

    @staticmethod
    def _fractions(rows: list[list[int]]) -> list[float]:
        totals = [sum(col) for col in zip(*rows)]
        n = sum(totals)
        return [t / n for t in totals] if n else [0.0] * len(totals)

    def summary(self) -> dict:
        """Fractions per expert (all layers pooled and per layer) and agreement."""
        compared = sum(self.compared)
        return {
            "prefill_fractions": self._fractions(self.prefill),
            "decode_fractions": self._fractions(self.decode),
            "agreement": sum(self.agree) / compared if compared else float("nan"),
            "prefill_tokens": sum(map(sum, self.prefill)),
            "decode_tokens": sum(map(sum, self.decode)),
            "per_layer": [
                {
                    "prefill_fractions": self._fractions([p]),
                    "decode_fractions": self._fractions([d]),
                    "agreement": a / c if c else float("nan"),
                }
                for p, d, a, c in zip(self.prefill, self.decode, self.agree, self.compared)
            ],
        }

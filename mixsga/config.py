"""`MixSGAConfig`: the validated knobs of one mixSGA conversion.

Choices the paper leaves open, made here and kept configurable:

* ``aux_loss_weight`` (the paper's α) defaults to **0.1** and ``aux_loss`` to
  **"sigmoid"**: binary cross-entropy of each sigmoid score against the one-hot
  expert-choice target (summed over experts, averaged over real tokens), the
  reading that matches the paper's sigmoid router. ``"softmax"`` (cross-entropy
  over the E logits) is the other reading of "L_sce". Evidence, from the agreement
  run of ``tests/test_mixsga_training.py`` (tiny Llama, batches of 4 x 128
  random tokens, AdamW lr 1e-2, ratios 3:1:6; held-out agreement after
  10 / 20 / 30 / 40 steps, mean of 3 seeds):
  sigmoid α=0.1: 0.91 / 0.93 / 0.93 / 0.94;  softmax α=0.1: 0.84 / 0.92 / 0.94 / 0.94;
  sigmoid α=1:   0.83 / 0.88 / 0.93 / 0.92;  softmax α=1:   0.80 / 0.91 / 0.92 / 0.93;
  no aux loss: about 0.5. Sigmoid at α=0.1 gets there fastest and α=1 is no
  better while it weighs the auxiliary term like the LM loss. The aux
  loss back-propagates into the backbone too (the paper's joint objective).
* ``router="random"`` is the paper's random-router ablation: random scores at
  expert-choice time (so the ratios still hold) and a draw from the ratios at
  decode; ``aux_loss_weight=0`` is the no-auxiliary-loss ablation.
* ``router_grad`` says what the LM loss sends to the router. ``"none"`` is the
  paper as published: masks are hard, so only the auxiliary loss trains the
  router (paper §2.4). ``"straight_through"`` (an open question of the paper,
  not its method) scales each token's K and V, in training only, by the gate
  ``g = 1 + s - stopgrad(s)``, ``s`` the sigmoid score of the token's own expert:
  ``g`` is exactly 1 in the forward pass, so logits, routing, decode and the cache
  are unchanged bit for bit, while ``dL/ds = <dL/dK, K> + <dL/dV, V>`` lets the
  LM loss train the router (``routing.straight_through_gate``). The scores are
  taken from the detached router input, so every other weight's gradient is the
  default's exactly and the variant differs from it in the router alone. It needs
  ``router="learned"`` (a random router has no score to train).
* Experts are listed from the most to the least expensive (strictly increasing
  group sizes), because expert-choice routing lets earlier experts pick first.
  An expert whose ratio is 0 is switched off: it never receives a token, not even
  from argmax routing at decode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from kvledger import check_group_sizes, kv_budget, kv_shape, normalise_ratios

AUX_LOSSES = ("softmax", "sigmoid")
ROUTERS = ("learned", "random")
ROUTER_GRADS = ("none", "straight_through")


@dataclass(frozen=True)
class MixSGAConfig:
    """Capacity ratios, expert group sizes, auxiliary loss and router switches.

    ``ratios`` are normalised on construction: ``MixSGAConfig((3, 1, 6)).ratios == (0.3, 0.1, 0.6)``.
    """

    ratios: tuple[float, ...] = (3, 1, 6)
    group_sizes: tuple[int, ...] = (1, 2, 4)
    aux_loss_weight: float = 0.1
    aux_loss: str = "sigmoid"
    router: str = "learned"
    router_grad: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = tuple(self.group_sizes)
        if not sizes:
            raise ValueError("group_sizes must not be empty")
        if any(isinstance(g, bool) or int(g) != g or int(g) < 1 for g in sizes):
            raise ValueError(f"group sizes must be positive integers, got {sizes}")
        sizes = tuple(int(g) for g in sizes)
        if any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(
                f"group sizes must be strictly increasing (most expensive expert first), got {sizes}"
            )
        if isinstance(self.ratios, (str, bytes)) or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) for r in self.ratios):
            # tuple("316") would be ("3", "1", "6"): a string is never a ratio list
            raise ValueError(f"ratios must be a sequence of numbers, got {self.ratios!r}")
        ratios = tuple(self.ratios)
        if len(ratios) != len(sizes):
            raise ValueError(
                f"need one ratio per group size: {len(ratios)} ratios {ratios} for group sizes {sizes}"
            )
        object.__setattr__(self, "group_sizes", sizes)
        object.__setattr__(self, "ratios", normalise_ratios(ratios))
        weight = float(self.aux_loss_weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"aux_loss_weight must be finite and non-negative, got {self.aux_loss_weight!r}")
        object.__setattr__(self, "aux_loss_weight", weight)
        if self.aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {self.aux_loss!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if self.router_grad not in ROUTER_GRADS:
            raise ValueError(f"router_grad must be one of {ROUTER_GRADS}, got {self.router_grad!r}")
        if self.router_grad != "none" and self.router != "learned":
            raise ValueError(f"router_grad={self.router_grad!r} trains a learned router's scores; "
                             f"router={self.router!r} has none (use router_grad='none')")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def num_experts(self) -> int:
        return len(self.group_sizes)

    @property
    def active(self) -> tuple[bool, ...]:
        """Which experts take tokens at all (ratio > 0)."""
        return tuple(r > 0 for r in self.ratios)

    @property
    def budget(self) -> float:
        """Nominal KV budget: stored KV / full KV at these ratios."""
        return kv_budget(self.ratios, self.group_sizes)

    def validate_for(self, model_config) -> None:
        """Raise ValueError unless every group size divides the model's KV heads."""
        check_group_sizes(kv_shape(model_config).num_kv_heads, self.group_sizes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stored in the model config as ``config.mixsga``)."""
        out = asdict(self)
        out["ratios"] = list(self.ratios)
        out["group_sizes"] = list(self.group_sizes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MixSGAConfig":
        known = {"ratios", "group_sizes", "aux_loss_weight", "aux_loss", "router", "router_grad", "seed"}
        unknown = set(data) - known - {"base_attn_implementation"}
        if unknown:
            raise ValueError(f"unknown MixSGAConfig fields {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})


def coerce_config(cfg: MixSGAConfig | dict | Sequence[float]) -> MixSGAConfig:
    """Accept a config, its dict, or bare ratios."""
    if isinstance(cfg, MixSGAConfig):
        return cfg
    if isinstance(cfg, dict):
        return MixSGAConfig.from_dict(cfg)
    return MixSGAConfig(ratios=tuple(cfg))

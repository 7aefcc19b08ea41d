"""Training recipes: the paper's, and scaled-down offline ones in proportion to them.

A :class:`Recipe` fixes everything that decides what a training run does apart from the
model and the data (pretraining a base model from scratch, CPT or SFT; one loop,
``harness.training.train.train``, runs them all): optimiser (AdamW), schedule (linear warm-up, cosine decay to
``min_lr_ratio * lr``, zero in every paper recipe),
clipping, batch size, sequence length, how long to train, precision. Every method in a
comparison is trained with the same recipe, seed and data, so it sees the same tokens.

Paper recipes (``docs/mixsga-paper.md`` §4):

* ``CPT_PAPER``: continued pretraining, Table 7: lr 2e-4 cosine, AdamW (0.9, 0.95),
  warm-up ratio 0.015, weight decay 0.1, clipping 1.0, bf16, 256K-token batches
  (128 sequences of TinyLlama's 2048 tokens), one epoch of MiniPile.
* ``SFT_PAPER_OPT``: supervised fine-tuning of OPT: lr 5e-5 cosine, batch 32, 40 epochs.
  The paper gives no optimiser, warm-up, decay, clipping or length for SFT; we use
  AdamW with the CPT betas, no warm-up (none stated), no decay, clipping 1.0 and
  MiniLLM's maximum length of 512 tokens, and say so in ``notes``. OPT ran in fp32 on
  V100s; ``precision="auto"`` gives bf16 on a GPU that has it, as the other models used.

Offline recipes keep the paper's *shape* (AdamW betas, warm-up fraction, weight decay,
clipping, cosine schedule) and scale what a CPU cannot afford:

* ``CPT_OFFLINE``: the peak lr is half the offline pretraining peak (2e-3 -> 1e-3), as
  2e-4 is half of TinyLlama's 4e-4 pretraining peak; batches are 16 x 256 tokens (the
  offline pretraining batch) and the budget is 64 steps (262,144 tokens, about 43 % of
  the offline pretraining tokens; the paper's 1.6B MiniPile tokens are 0.05 % of
  TinyLlama's 3T, but a tiny model trained for 150 steps is far from converged, and
  Ainslie et al. find most of the uptraining recovery by ~5 % of pretraining, so the
  offline budget errs on the generous side).
* ``SFT_OFFLINE``: lr in the paper's ratio to pretraining (5e-5 / OPT's 6e-4 ~ 1/12 of
  2e-3 -> 1.7e-4), batch 16, 3 epochs instead of 40 (the offline set is small and a CPU
  run must finish in minutes), length 512.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

KINDS = ("pretrain", "cpt", "sft")  # pretraining from scratch, continued pretraining, fine-tuning
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    """One training recipe. Exactly one of ``epochs`` / ``total_tokens`` / ``max_steps`` sets the length.

    ``batch_size`` counts sequences per optimiser step over all processes;
    ``micro_batch_size`` counts sequences per forward of one process (gradient
    accumulation makes up the difference). ``total_tokens`` counts input tokens
    (``steps * batch_size * seq_len``), the unit of "same training tokens" for CPT.
    """

    name: str
    kind: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_ratio: float = 0.015
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    batch_size: int = 16
    micro_batch_size: int = 16
    seq_len: int = 256
    epochs: float | None = None
    total_tokens: int | None = None
    max_steps: int | None = None
    precision: str = "auto"
    checkpoint_every: int = 50
    log_every: int = 1
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"recipe kind must be one of {KINDS}, got {self.kind!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"recipe precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"recipe lr must be a positive number, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"recipe betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.weight_decay < 0:
            raise ValueError(f"recipe weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"recipe warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"recipe min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"recipe grad_clip must be > 0 or None, got {self.grad_clip!r}")
        for name in ("batch_size", "micro_batch_size", "seq_len", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"recipe {name} must be a positive integer, got {value!r}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"recipe batch_size {self.batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}"
            )
        lengths = {k: getattr(self, k) for k in ("epochs", "total_tokens", "max_steps") if getattr(self, k) is not None}
        if len(lengths) != 1:
            raise ValueError(f"recipe needs exactly one of epochs / total_tokens / max_steps, got {lengths or 'none'}")
        (key, value), = lengths.items()
        if not value > 0:
            raise ValueError(f"recipe {key} must be > 0, got {value!r}")

    @property
    def tokens_per_step(self) -> int:
        """Input tokens per optimiser step at full length (CPT sequences are always full)."""
        return self.batch_size * self.seq_len

    def num_steps(self, num_examples: int) -> int:
        """Optimiser steps over a dataset of ``num_examples`` sequences (incomplete last batch dropped)."""
        if num_examples < 1:
            raise ValueError(f"no training examples (got {num_examples})")
        if self.max_steps is not None:
            steps = self.max_steps
        elif self.total_tokens is not None:
            steps = self.total_tokens // self.tokens_per_step
        else:
            steps = math.floor(self.epochs * num_examples / self.batch_size)
        if steps < 1:
            raise ValueError(
                f"recipe {self.name!r} gives 0 optimiser steps for {num_examples} examples "
                f"(batch_size {self.batch_size}); lower batch_size or raise the length"
            )
        return steps

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up steps: ``ceil(warmup_ratio * total_steps)`` (as transformers' Trainer rounds).

        Pretraining rounds to nearest, at least one step (``max(1, round(...))``): the rule the
        offline base models were trained with, kept so that they stay bit-identical.
        """
        if self.kind == "pretrain":
            return max(1, round(self.warmup_ratio * total_steps))
        return math.ceil(self.warmup_ratio * total_steps)

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes`` (validated again); changing the length clears the other length keys."""
        length_keys = {"epochs", "total_tokens", "max_steps"}
        if length_keys & changes.keys():
            changes = {**{k: None for k in length_keys}, **changes}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recipe keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


CPT_PAPER = Recipe(
    name="cpt_paper",
    kind="cpt",
    lr=2e-4,
    betas=(0.9, 0.95),
    weight_decay=0.1,
    warmup_ratio=0.015,
    grad_clip=1.0,
    batch_size=128,            # 128 x 2048 = 262,144 tokens = 256K
    micro_batch_size=8,
    seq_len=2048,
    epochs=1.0,                # one epoch of MiniPile (~1.6B tokens, ~6.1k steps)
    precision="bf16",
    checkpoint_every=200,
    log_every=10,
    notes="Table 7 of the paper (TinyLlama-1.1B on MiniPile); micro_batch_size is ours (memory only).",
)

SFT_PAPER_OPT = Recipe(
    name="sft_paper_opt",
    kind="sft",
    lr=5e-5,
    betas=(0.9, 0.95),
    weight_decay=0.0,
    warmup_ratio=0.0,
    grad_clip=1.0,
    batch_size=32,
    micro_batch_size=8,
    seq_len=512,
    epochs=40.0,
    precision="auto",
    checkpoint_every=500,
    log_every=10,
    notes="Paper §4.1 (OPT, Dolly-15k): lr 5e-5 cosine, batch 32, 40 epochs. Not stated, ours: AdamW with the "
          "CPT betas, no warm-up, no weight decay, clipping 1.0, MiniLLM's max length 512.",
)

CPT_OFFLINE = Recipe(
    name="cpt_offline",
    kind="cpt",
    lr=1e-3,
    betas=CPT_PAPER.betas,
    weight_decay=CPT_PAPER.weight_decay,
    warmup_ratio=CPT_PAPER.warmup_ratio,
    grad_clip=CPT_PAPER.grad_clip,
    batch_size=16,
    micro_batch_size=8,
    seq_len=256,
    total_tokens=64 * 16 * 256,
    precision="auto",
    checkpoint_every=16,
    log_every=1,
    notes="CPT_PAPER's shape at CPU scale: lr = half the offline pretraining peak, 16 x 256-token batches, "
          "64 steps (262,144 tokens).",
)

SFT_OFFLINE = Recipe(
    name="sft_offline",
    kind="sft",
    lr=1.7e-4,
    betas=SFT_PAPER_OPT.betas,
    weight_decay=SFT_PAPER_OPT.weight_decay,
    warmup_ratio=SFT_PAPER_OPT.warmup_ratio,
    grad_clip=SFT_PAPER_OPT.grad_clip,
    batch_size=16,
    micro_batch_size=8,
    seq_len=512,
    epochs=3.0,
    precision="auto",
    checkpoint_every=25,
    log_every=1,
    notes="SFT_PAPER_OPT's shape at CPU scale: lr in the paper's ratio to the pretraining peak, batch 16, 3 epochs.",
)

# Pretraining a zoo model from scratch (harness.training.pretrain, the offline base models): the shape
# every family shares. Steps, batch, length and lr are per family (pretrain.OFFLINE_RECIPES) or the config's.
PRETRAIN = Recipe(
    name="pretrain",
    kind="pretrain",
    lr=2e-3,
    betas=(0.9, 0.95),
    eps=1e-8,
    weight_decay=0.1,
    warmup_ratio=0.05,
    min_lr_ratio=0.1,
    grad_clip=1.0,
    batch_size=2,
    micro_batch_size=2,
    seq_len=256,
    max_steps=720,
    precision="auto",
    checkpoint_every=100,
    log_every=10,
    notes="Offline base models: AdamW (0.9, 0.95), 5 % warm-up, cosine to 0.1 x lr, clipping 1.0.",
)

# The recipes a training spec (CPT / SFT) can name; pretraining has its own job.
RECIPES: dict[str, Recipe] = {r.name: r for r in (CPT_PAPER, SFT_PAPER_OPT, CPT_OFFLINE, SFT_OFFLINE)}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """The recipe called ``name`` with ``overrides``; ValueError naming the known recipes otherwise."""
    try:
        recipe = RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}") from None
    return recipe.replace(**overrides) if overrides else recipe

"""One trainer for pretraining from scratch, continued pretraining (CPT) and fine-tuning (SFT).

:func:`train` is the loop (it reads top to bottom: plan, seed, optimiser and schedule, resume,
then per step forward / backward / clip / step, checkpoint, result); a *data source* and a
:class:`~harness.training.recipes.Recipe` say what it trains on and how.

* Data sources: :func:`cpt_data` cuts the ``<bos> doc <eos>`` stream (the perplexity protocol's
  format) into ``seq_len`` blocks; :func:`sft_data` turns ``{"prompt", "references"}`` rows
  into ``prompt + first reference + <eos>`` with the prompt tokens masked (-100) in the
  labels; both give a :class:`TrainData`. :func:`stream_data` gives the pretraining source,
  a :class:`TokenStream` of random ``seq_len + 1``-token windows with next-token ``targets``.
  Each has a content fingerprint, a ``plan`` and a ``collate``.
* Same tokens for every method: a source's plan orders the examples from the seed and the
  recipe alone, never from the model (:func:`plan_batches`: per-epoch permutations, incomplete
  last batch dropped; a stream: window offsets from a generator seeded by ``(seed, step)``).
  ``token_hash`` (sha256 of the data fingerprint and the plan) identifies the token stream;
  two runs with equal hashes trained on the same tokens in the same order.
* Optimisation: AdamW (weight decay on matrices only, :func:`make_optimizer`), linear warm-up
  then cosine decay (:func:`lr_multiplier`, the one schedule), gradient clipping, gradient
  accumulation (``batch_size / micro_batch_size``), bf16 autocast on a GPU with bf16 and fp32
  on CPU. The loss of a step is the mean over all of its target tokens (micro-batches weighted
  by their target-token counts, so padding and prompt lengths don't skew SFT).
* mixSGA: a converted model adds its weighted aux loss into ``out.loss``. Through the
  model's ``mixsga_runtime`` the trainer logs the (unweighted, layer-mean) aux loss of each
  step, token-weighted like the loss, and the routing statistics of each logged step
  (statistics are reset every step). Plain models train without either.
* Several GPUs: ``accelerate`` (DDP) on the same code path; each process takes every
  ``world_size``-th micro-batch of the global batch, so the plan and the loss are the
  same for any number of processes. On one CPU the accelerator is a pass-through.
* Held-out curve (:class:`Curve`, optional): a small fixed validation slice (:func:`cpt_data` /
  :func:`sft_data` of the validation split, same for every method of a seed) scored in eval
  mode without gradients at step 0 (the untrained, converted model) and at ``points`` evenly
  spaced steps (:func:`curve_steps`); each point is ``{step, tokens, loss, ppl}`` in the
  result's ``curve``. The scoring leaves every RNG as it found it, so a run trains on the same
  batches with or without a curve, and the points so far are saved with the resume state.
* Resume: every ``checkpoint_every`` steps (and when stopped) ``checkpoint.pt`` holds the
  model, optimiser, scheduler, RNG states, step and history, written atomically
  (:mod:`harness.atomic`). A rerun with the same data, recipe and seed continues from it;
  on CPU the resumed run is bit-identical to an uninterrupted one. A finished run's
  checkpoint makes a rerun load the trained weights and return the stored result. The
  checkpoint of another run is refused, or (``restart_stale``, pretraining) started over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from harness.atomic import torch_save_atomic, write_json_atomic
from harness.evaluation.perplexity import token_stream
from harness.training.recipes import Recipe

IGNORE_INDEX = -100
CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "train.json"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainData:
    """Tokenised training examples: ``input_ids[i]`` and ``labels[i]`` (1-D long tensors, same length)."""

    kind: str
    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pad_token_id: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input sequences but {len(self.labels)} label sequences")
        for i, (x, y) in enumerate(zip(self.input_ids, self.labels)):
            if x.shape != y.shape or x.dim() != 1:
                raise ValueError(f"example {i}: input_ids {tuple(x.shape)} and labels {tuple(y.shape)} differ")
        digest = hashlib.sha256(f"{self.kind}:{self.pad_token_id}:".encode())
        for x, y in zip(self.input_ids, self.labels):
            digest.update(len(x).to_bytes(4, "little"))
            digest.update(x.to(torch.int32).numpy().tobytes())
            digest.update(y.to(torch.int32).numpy().tobytes())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.input_ids)

    def plan(self, recipe: Recipe, seed: int) -> list[list[int]]:
        """Example indices of every optimiser step (:func:`plan_batches`); an example over ``seq_len`` is refused."""
        too_long = max(len(x) for x in self.input_ids)
        if too_long > recipe.seq_len:
            raise ValueError(f"an example has {too_long} tokens, more than the recipe's seq_len {recipe.seq_len}")
        return plan_batches(len(self), recipe, seed)

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """One micro-batch of these examples (:func:`collate`)."""
        return collate(self, indices)


def cpt_data(tokenizer, texts: Sequence[str], seq_len: int, *, max_tokens: int | None = None,
             spread: bool = False) -> TrainData:
    """Continued-pretraining blocks: the ``<bos> doc <eos>`` stream cut into ``seq_len``-token blocks.

    Labels equal the inputs (the model shifts them); the incomplete last block is dropped. With
    ``max_tokens`` the data is that many tokens' worth of blocks: the stream's first ones, or with
    ``spread`` blocks evenly spaced over the whole stream. Spread matters where the texts come in an
    order (the corpus: modules by name): the first 131k tokens of the stdlib are a few dozen modules,
    and continued pretraining on them alone made the base model's held-out perplexity worse (236 ->
    242 / 251 / 273 at lr 1e-4 / 2e-4 / 5e-4, TinyLlama tiny, 128 steps of 1,024 tokens).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len!r}")
    ids, _ = token_stream(tokenizer, texts, max_tokens=None if spread else max_tokens)
    n_blocks = len(ids) // seq_len
    if n_blocks < 1:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than one block of seq_len {seq_len}")
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    meta = {"stream_tokens": len(ids), "blocks": n_blocks, "seq_len": seq_len}
    if spread and max_tokens is not None:
        want = min(n_blocks, -(-max_tokens // seq_len))
        picks = [i * n_blocks // want for i in range(want)]  # evenly spaced, deterministic
        blocks = blocks[picks]
        meta.update(blocks=want, spread_over_blocks=n_blocks)
    rows = list(blocks.unbind(0))
    return TrainData("cpt", rows, [r.clone() for r in rows], _pad_id(tokenizer), meta=meta)


def sft_data(tokenizer, rows: Sequence[Mapping[str, Any]], seq_len: int) -> TrainData:
    """Fine-tuning examples ``prompt + first reference + <eos>``, prompt tokens masked in the labels.

    The prompt is encoded with the tokenizer's special tokens (``<bos>``), the response without,
    as generation will see them. Sequences longer than ``seq_len`` lose their response tail; a
    row whose prompt alone fills ``seq_len`` has nothing to learn and is skipped (counted in
    ``meta["skipped"]``).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs an eos token to end responses")
    inputs, labels, skipped, truncated = [], [], 0, 0
    for i, row in enumerate(rows):
        prompt, response = _prompt_and_response(row, i)
        p = tokenizer(prompt, verbose=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (p + r)[:seq_len]
        if len(p) >= len(ids):
            skipped += 1
            continue
        truncated += len(p) + len(r) > seq_len
        x = torch.tensor(ids, dtype=torch.long)
        y = x.clone()
        y[: len(p)] = IGNORE_INDEX
        inputs.append(x)
        labels.append(y)
    if not inputs:
        raise ValueError(f"no usable SFT example: all {len(rows)} prompts fill seq_len {seq_len}")
    return TrainData("sft", inputs, labels, _pad_id(tokenizer),
                     meta={"rows": len(rows), "examples": len(inputs), "skipped": skipped,
                           "truncated": truncated, "seq_len": seq_len})


def _prompt_and_response(row: Mapping[str, Any], index: int) -> tuple[str, str]:
    if not isinstance(row, Mapping) or "prompt" not in row or "references" not in row:
        raise ValueError(f"SFT row {index} needs 'prompt' and 'references' keys, got {row!r:.200}")
    refs = row["references"]
    if isinstance(refs, str) or not refs or not isinstance(refs[0], str):
        raise ValueError(f"SFT row {index}: 'references' must be a non-empty list of strings, got {refs!r:.200}")
    return row["prompt"], refs[0]


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad batches with")
    return int(pad)


@dataclass
class TokenStream:
    """Pretraining data: one token stream (1-D long tensor ``ids``), trained on in random windows.

    Step ``s`` draws ``batch_size`` windows of ``seq_len + 1`` tokens at offsets from a generator
    seeded by ``(seed, s)`` alone (:func:`window_starts`), so a resumed run sees exactly the
    batches of an uninterrupted one. A window gives ``input_ids`` (its first ``seq_len`` tokens)
    and ``targets`` (its last ``seq_len``: the next tokens, already shifted, nothing masked).
    """

    ids: torch.Tensor
    seq_len: int
    meta: dict = field(default_factory=dict)
    kind: str = "pretrain"

    def __post_init__(self) -> None:
        if self.ids.dim() != 1:
            raise ValueError(f"the token stream must be 1-D, got shape {tuple(self.ids.shape)}")
        if len(self.ids) <= self.seq_len + 1:
            raise ValueError(f"training stream has {len(self.ids)} tokens, fewer than seq_len + 2 = "
                             f"{self.seq_len + 2}")
        digest = hashlib.sha256(f"{self.kind}:{self.seq_len}:".encode())
        digest.update(self.ids.to(torch.int32).numpy().tobytes())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        """Windows that fit side by side: an epoch's worth (the unit of ``Recipe.epochs``)."""
        return len(self.ids) // self.seq_len

    def plan(self, recipe: Recipe, seed: int) -> list[list[int]]:
        """Window offsets of every optimiser step."""
        if self.seq_len > recipe.seq_len:
            raise ValueError(f"the stream's windows have {self.seq_len} tokens, more than the recipe's seq_len "
                             f"{recipe.seq_len}")
        return [window_starts(len(self.ids), step, seed=seed, batch_size=recipe.batch_size, seq_len=self.seq_len)
                for step in range(recipe.num_steps(len(self)))]

    def collate(self, starts: Sequence[int]) -> dict[str, torch.Tensor]:
        """The windows at ``starts``: ``input_ids`` and next-token ``targets``, ``(len(starts), seq_len)`` each."""
        windows = torch.stack([self.ids[s : s + self.seq_len + 1] for s in starts])
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}


def stream_data(tokenizer, texts: Sequence[str], seq_len: int) -> TokenStream:
    """The pretraining source: ``texts`` as one ``<bos> doc <eos>`` stream, trained on in ``seq_len`` windows."""
    ids, _ = token_stream(tokenizer, texts)
    return TokenStream(torch.tensor(ids, dtype=torch.long), seq_len, meta={"stream_tokens": len(ids),
                                                                           "seq_len": seq_len})


@dataclass
class Curve:
    """What the held-out curve scores: ``data`` (a :class:`TrainData` of the validation slice) at ``points``
    evenly spaced steps plus step 0, in micro-batches of ``batch_size`` examples."""

    data: TrainData
    points: int
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.points, int) or self.points < 1:
            raise ValueError(f"curve points must be a positive integer, got {self.points!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"curve batch_size must be a positive integer, got {self.batch_size!r}")
        if sum(target_tokens(y.unsqueeze(0)) for y in self.data.labels) == 0:
            raise ValueError("the held-out curve's slice has no target tokens")

    def identity(self) -> dict:
        """What a resumed run's curve must share with the checkpoint's (slice, points, batching)."""
        return {"data": self.data.fingerprint, "points": self.points, "batch_size": self.batch_size}


def curve_steps(total: int, points: int) -> list[int]:
    """Steps after which the curve is scored: 0 and ``ceil(i * total / points)`` for i = 1..points (deduplicated)."""
    if total < 1 or points < 1:
        raise ValueError(f"need total >= 1 and points >= 1, got total={total!r}, points={points!r}")
    return sorted({0} | {math.ceil(i * total / points) for i in range(1, points + 1)})


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, data: TrainData, *, batch_size: int, device: torch.device,
                  autocast: Callable[[], Any] = nullcontext) -> tuple[float, int]:
    """``(mean next-token loss, scored tokens)`` of ``data`` in eval mode (no dropout), token-weighted.

    The loss is computed from the logits, not ``out.loss``: a mixSGA model adds its aux loss there.
    The model's train / eval mode is restored.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in data.collate(range(i, min(i + batch_size, len(data)))).items()}
            labels = batch.pop("labels")
            with autocast():
                logits = model(**batch, use_cache=False).logits
            targets = labels[:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="sum").double())
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / count, count


def window_starts(n_tokens: int, step: int, *, seed: int, batch_size: int, seq_len: int) -> list[int]:
    """Offsets of the ``batch_size`` windows of step ``step`` in an ``n_tokens`` stream; depend only on (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - seq_len - 1, (batch_size,), generator=gen).tolist()


def plan_batches(num_examples: int, recipe: Recipe, seed: int) -> list[list[int]]:
    """Example indices of every optimiser step: per-epoch permutations seeded by ``(seed, epoch)``."""
    steps = recipe.num_steps(num_examples)
    needed = steps * recipe.batch_size
    order: list[int] = []
    epoch = 0
    while len(order) < needed:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order.extend(torch.randperm(num_examples, generator=gen).tolist())
        epoch += 1
    b = recipe.batch_size
    return [order[s * b : (s + 1) * b] for s in range(steps)]


def token_hash(data: TrainData | TokenStream, plan: Sequence[Sequence[int]]) -> str:
    """sha256 of the training token stream: the data's fingerprint and the order of the plan."""
    digest = hashlib.sha256(data.fingerprint.encode())
    digest.update(np.asarray(plan, dtype=np.int64).tobytes())
    return digest.hexdigest()


def collate(data: TrainData, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (-100 on padding)."""
    length = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), length), data.pad_token_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        ids[row, :n] = data.input_ids[i]
        labels[row, :n] = data.labels[i]
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss scores: labels after the shift that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def scored_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens the loss of a micro-batch scores: its next-token ``targets``, or its ``labels`` after the shift."""
    if "targets" in batch:
        return int((batch["targets"] != IGNORE_INDEX).sum())
    return target_tokens(batch["labels"])


def input_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Non-padding input tokens of a micro-batch (a stream's windows have no padding)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (computed in fp32) against already-shifted ``targets`` (-100 ignored)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def lr_multiplier(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """LR factor of optimiser step ``step`` (0-based): linear warm-up, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (>= 2-D) only: biases and norm weights are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)


def resolve_precision(recipe: Recipe, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: bf16 autocast on a GPU with bf16 (``auto`` / ``bf16``), fp32 otherwise.

    CPU always trains in fp32 (the offline profile's precision), whatever the recipe says.
    """
    if recipe.precision == "fp32" or device.type != "cuda":
        return "fp32"
    if torch.cuda.is_bf16_supported():
        return "bf16"
    if recipe.precision == "bf16":
        raise ValueError(f"recipe {recipe.name!r} asks for bf16 but {torch.cuda.get_device_name(device)} lacks it")
    return "fp32"


def mixsga_runtime(model: torch.nn.Module):
    """The ``mixsga_runtime`` of a mixSGA-converted model (aux loss, routing statistics), or None."""
    return getattr(model, "mixsga_runtime", None)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _make_accelerator(device: str | torch.device):
    from accelerate import Accelerator

    dev = torch.device(device)
    try:
        # Precision is applied by our own autocast (the recipe decides it), so the accelerator's
        # process-wide state never has to change between runs in one process.
        return Accelerator(cpu=dev.type == "cpu", mixed_precision="no")
    except ValueError as exc:
        raise ValueError(f"cannot train on {str(dev)!r} in this process: accelerate is already set up "
                         f"for another device ({exc})") from exc


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def load_checkpoint(path: Path, identity: Mapping[str, Any], *, restart_stale: bool = False) -> dict | None:
    """The resumable state at ``path`` if it belongs to the run ``identity``, None if there is none.

    A checkpoint of another run (data, recipe, seed or ``identity`` extras differ) raises, since a
    training job's directory holding another run's state is a mix-up; with ``restart_stale`` it is
    ignored instead (a pretraining job whose settings changed starts over; the next save replaces it).
    """
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") == CHECKPOINT_FORMAT and state.get("identity") == json.loads(json.dumps(identity)):
        return state
    if restart_stale:
        return None
    raise ValueError(f"{path} was written by a different run (data, recipe or seed differ); "
                     f"remove it or pass resume=False")


def train(
    model: torch.nn.Module,
    data: TrainData | TokenStream,
    recipe: Recipe,
    out_dir: str | os.PathLike,
    *,
    seed: int,
    device: str | torch.device = "cpu",
    resume: bool = True,
    restart_stale: bool = False,
    identity: Mapping[str, Any] | None = None,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    curve: Curve | None = None,
) -> dict:
    """Train ``model`` in place on ``data`` with ``recipe``; return the result (also ``out_dir/train.json``).

    The result holds ``final_loss`` (last step), ``final_loss_avg`` (mean of the last 10),
    ``steps``, ``tokens_seen`` (non-padding input tokens), ``target_tokens``, ``token_hash``,
    ``wall_time_s`` and ``cpu_time_s`` (summed over resumed runs) and the per-step ``history``
    (loss, lr, grad norm, aux loss, routing statistics where the model has them). ``stop_after``
    stops after that many steps *in this call* with a checkpoint (to bound a job's time, or to
    simulate a crash); the result then has ``"completed": False``. ``log`` receives each logged
    history entry. ``identity`` adds what else a checkpoint must match to be resumed (pretraining:
    the model's settings); ``restart_stale`` starts over from a checkpoint of another run instead
    of refusing it (see :func:`load_checkpoint`). ``curve``: score a held-out slice during training
    (:class:`Curve`); the result's ``curve`` lists the points (empty without one) and ``curve_time_s``
    the seconds they took.
    """
    if data.kind != recipe.kind:
        raise ValueError(f"recipe {recipe.name!r} is for {recipe.kind!r} but the data are {data.kind!r}")
    if stop_after is not None and stop_after < 0:
        raise ValueError(f"stop_after must be >= 0, got {stop_after!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = _make_accelerator(device)
    dev = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    n_micro = recipe.batch_size // recipe.micro_batch_size
    if n_micro % world:
        raise ValueError(f"batch_size / micro_batch_size = {n_micro} micro-batches per step do not split over "
                         f"{world} processes")

    # What each step trains on, fixed by the data, the recipe and the seed alone.
    plan = data.plan(recipe, seed)
    total = len(plan)
    stream_hash = token_hash(data, plan)
    precision = resolve_precision(recipe, dev)
    warmup = recipe.warmup_steps(total)
    # What must match for a checkpoint to be resumed; how often to save or log and the notes may change.
    trained_by = {k: v for k, v in recipe.to_dict().items() if k not in ("checkpoint_every", "log_every", "notes")}
    run_identity = {"recipe": trained_by, "seed": seed, "token_hash": stream_hash, "steps": total}
    if identity:
        run_identity["extra"] = dict(identity)
    if curve is not None:  # absent without a curve: checkpoints of runs without one stay resumable
        run_identity["curve"] = curve.identity()
    scored_at = set(curve_steps(total, curve.points)) if curve is not None else set()

    # Seed, optimiser, schedule; then continue from a checkpoint of this run if there is one.
    seed_everything(seed)
    model.to(dev)
    optimizer = make_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total=total, warmup=warmup, min_ratio=recipe.min_lr_ratio))
    start, history, wall_before, cpu_before, resumed_from = 0, [], 0.0, 0.0, None
    points: list[dict] = []  # the held-out curve so far
    curve_before = 0.0
    ckpt_path = out / CHECKPOINT_FILE
    if not resume:
        ckpt_path.unlink(missing_ok=True)
    state = load_checkpoint(ckpt_path, run_identity, restart_stale=restart_stale)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, history, wall_before = state["step"], state["history"], state["wall_time_s"]
        cpu_before = state.get("cpu_time_s", 0.0)
        points, curve_before = list(state.get("curve", [])), state.get("curve_time_s", 0.0)
        resumed_from = start

    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    runtime = mixsga_runtime(inner)
    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    was_training = inner.training
    model.train()

    def save(step: int) -> None:
        if accelerator.is_main_process:
            torch_save_atomic(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "identity": run_identity, "step": step,
                "model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "history": history,
                "wall_time_s": wall_before + time.perf_counter() - t0,
                "cpu_time_s": cpu_before + time.process_time() - c0,
                "curve": points, "curve_time_s": curve_before + curve_time})
        accelerator.wait_for_everyone()

    curve_time = 0.0

    def score(step: int) -> None:
        """Append the held-out point after ``step`` steps; every RNG is left as it was (dropout, random routers)."""
        nonlocal curve_time
        t = time.perf_counter()
        rng = _rng_state()
        generator = getattr(runtime, "generator", None)
        gen_state = generator.get_state() if isinstance(generator, torch.Generator) else None
        loss, _ = held_out_loss(inner, curve.data, batch_size=curve.batch_size, device=dev, autocast=autocast)
        _set_rng_state(rng)
        if gen_state is not None:
            generator.set_state(gen_state)
        seen = sum(h["tokens"] for h in history[:step])
        points.append({"step": step, "tokens": seen, "loss": loss, "ppl": math.exp(min(loss, 700.0))})
        curve_time += time.perf_counter() - t

    t0, c0 = time.perf_counter(), time.process_time()  # CPU seconds (all threads) show the cost on a shared machine
    end = total if stop_after is None else min(total, start + stop_after)
    if 0 in scored_at and not any(p["step"] == 0 for p in points):
        score(0)  # the converted model before any update: where the recovery starts
    bar = tqdm(total=total, initial=start, desc=f"train {recipe.name}", dynamic_ncols=True, mininterval=2.0,
               disable=not progress or not accelerator.is_main_process)
    for step in range(start, end):
        global_batch = plan[step]
        micro = [global_batch[i : i + recipe.micro_batch_size]
                 for i in range(0, len(global_batch), recipe.micro_batch_size)]
        batches = [data.collate(m) for m in micro]
        n_targets = sum(scored_tokens(b) for b in batches)
        if n_targets == 0:
            raise ValueError(f"step {step}: the batch has no target tokens")
        mine = batches[rank::world]
        if runtime is not None:
            runtime.reset_stats()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        aux_sum = torch.zeros((), dtype=torch.float64, device=dev)
        has_aux = False
        for i, batch in enumerate(mine):
            batch = {k: v.to(dev) for k, v in batch.items()}
            weight = scored_tokens(batch) / n_targets
            targets = batch.pop("targets", None)
            sync = accelerator.no_sync(model) if i < len(mine) - 1 else nullcontext()
            if runtime is not None:
                runtime.last_aux_loss = None  # so that a forward without routing cannot report a stale value
            with sync:
                with autocast():
                    out_ = model(**batch, use_cache=False)
                # The model's own loss shifts ``labels``; a stream's ``targets`` are already the next tokens.
                loss = out_.loss if targets is None else next_token_loss(out_.logits, targets)
                # DDP averages gradients over processes, so scale by world to get the global token mean.
                accelerator.backward(loss * (weight * world))
            loss_sum += loss.detach().double() * weight
            aux = runtime.last_aux_loss if runtime is not None else None
            if aux is not None:
                has_aux = True
                aux_sum += aux.detach().double() * weight
        grad_norm = accelerator.clip_grad_norm_(
            model.parameters(), recipe.grad_clip if recipe.grad_clip is not None else float("inf"))
        lr_used = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(accelerator.reduce(loss_sum, reduction="sum"))
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at step {step} "
                                     f"(recipe {recipe.name!r}, lr {recipe.lr})")
        entry: dict[str, Any] = {
            "step": step + 1,
            "loss": loss_value,
            "lr": lr_used,
            "grad_norm": _finite(float(grad_norm)),
            "target_tokens": n_targets,
            "tokens": int(sum(input_tokens(b) for b in batches)),
        }
        if has_aux:
            entry["aux_loss"] = float(accelerator.reduce(aux_sum, reduction="sum"))
        if runtime is not None and ((step + 1) % recipe.log_every == 0 or step + 1 == total):
            entry["routing"] = _jsonable(runtime.routing_stats())
        history.append(entry)
        if log is not None and accelerator.is_main_process and (
                (step + 1) % recipe.log_every == 0 or step + 1 == total):
            log(entry)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{entry['lr']:.2e}", refresh=False)
        bar.update(1)
        done = step + 1
        if done in scored_at:
            score(done)
        if done % recipe.checkpoint_every == 0 or done == end:
            save(done)
    bar.close()
    inner.train(was_training)
    done = len(history)
    losses = [h["loss"] for h in history]
    result = {
        "completed": done == total,
        "recipe": recipe.to_dict(),
        "kind": recipe.kind,
        "seed": seed,
        "steps": done,
        "total_steps": total,
        "warmup_steps": warmup,
        "accumulation": n_micro // world,
        "world_size": world,
        "device": str(dev),
        "precision": precision,
        "token_hash": stream_hash,
        "data_fingerprint": data.fingerprint,
        "data_meta": data.meta,
        "tokens_seen": sum(h["tokens"] for h in history),
        "target_tokens": sum(h["target_tokens"] for h in history),
        "final_loss": losses[-1] if losses else None,
        "final_loss_avg": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "aux_loss_history": [h["aux_loss"] for h in history if "aux_loss" in h],
        "routing_history": [{"step": h["step"], **h["routing"]} for h in history if "routing" in h],
        "history": history,
        "resumed_from": resumed_from,
        "curve": points,
        "curve_time_s": curve_before + curve_time,
        "wall_time_s": wall_before + time.perf_counter() - t0,
        "cpu_time_s": cpu_before + time.process_time() - c0,
    }
    if result["completed"] and accelerator.is_main_process:
        write_json_atomic(out / RESULT_FILE, result)
    return result


def _jsonable(value: Any) -> Any:
    """Routing summaries as JSON-safe values (NaN agreement before any comparison becomes None)."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value

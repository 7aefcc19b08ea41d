"""Pretrain a zoo model from scratch on the corpus (the offline profile's base models).

Pretraining is a data source and a recipe for the one training loop (:func:`harness.training.train.train`):

* Data: the training split as one ``<bos> doc <eos>`` stream (:func:`~harness.training.train.stream_data`);
  each step draws ``batch_size`` windows of ``seq_len + 1`` tokens at offsets from a generator
  seeded by ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would.
* Recipe: :data:`~harness.training.recipes.PRETRAIN` with this model's steps, batch, length and
  lr: AdamW (betas 0.9 / 0.95, weight decay on matrices only), linear warm-up then cosine decay
  to ``min_lr_ratio * lr``, gradient clipping; fp32 on CPU, bf16 autocast on a GPU with bf16.
* Resume: the loop's checkpoint lives under ``<out_dir>.partial/`` (every ``checkpoint_every``
  steps); a restarted job with the same settings continues from there and produces the same
  weights (CPU); one with other settings starts over. The final directory appears atomically
  (temp dir, then rename) with ``save_pretrained`` model + tokenizer + ``pretrain.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from harness.atomic import atomic_directory
from harness.data.corpus import read_fingerprint, read_split
from harness.evaluation.perplexity import perplexity, unigram_perplexity
from harness.data.tokenizer import load_tokenizer
from harness.models.zoo import build_config, count_parameters
from harness.training.recipes import PRETRAIN, Recipe
from harness.training.train import lr_multiplier, seed_everything, stream_data, train
from hfconvert import save_converted

RESULT_FILE = "pretrain.json"

# Offline-default recipes for the ``tiny`` sizes. The learning rates come from a learning-rate x
# batch sweep at a fixed token budget (~370k tokens, 720 steps of 2 x 256): at this scale the
# number of optimiser steps matters more than the batch, so batches are small. The windows are
# 1,024 tokens (as evaluated, so positions past 256 are trained; 1 x 1,024 = 737k tokens over the
# same 720 steps); the rates were not swept again at that length.
OFFLINE_RECIPES: dict[str, dict] = {
    "llama3": {"steps": 720, "batch_size": 1, "seq_len": 1024, "lr": 1e-3},
    "tinyllama": {"steps": 720, "batch_size": 1, "seq_len": 1024, "lr": 2e-3},
    "opt": {"steps": 720, "batch_size": 1, "seq_len": 1024, "lr": 5e-4},
    "gemma2": {"steps": 720, "batch_size": 1, "seq_len": 1024, "lr": 2e-3},
}


def pretrain_recipe(family: str, size: str, *, steps: int, batch_size: int, seq_len: int, lr: float,
                    warmup_ratio: float = PRETRAIN.warmup_ratio, min_lr_ratio: float = PRETRAIN.min_lr_ratio,
                    weight_decay: float = PRETRAIN.weight_decay, grad_clip: float | None = PRETRAIN.grad_clip,
                    checkpoint_every: int = PRETRAIN.checkpoint_every,
                    log_every: int = PRETRAIN.log_every) -> Recipe:
    """:data:`PRETRAIN` with one model's settings (one forward per step; ``grad_clip`` 0 = no clipping)."""
    return PRETRAIN.replace(name=f"pretrain_{family}_{size}", lr=lr, warmup_ratio=warmup_ratio,
                            min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip or None,
                            batch_size=batch_size, micro_batch_size=batch_size, seq_len=seq_len, max_steps=steps,
                            checkpoint_every=checkpoint_every, log_every=log_every)


def logged_history(run: dict, recipe: Recipe) -> list[dict]:
    """``pretrain.json``'s history from the loop's per-step one (``run``, the loop's result): every
    ``log_every`` steps (and at the last) the mean loss of the last ``log_every`` steps and the lr
    that the next step uses."""
    total, warmup, every, history = run["total_steps"], run["warmup_steps"], recipe.log_every, run["history"]
    logged = []
    for i, entry in enumerate(history):
        step = entry["step"]
        if step % every == 0 or step == total:
            recent = [h["loss"] for h in history[max(0, i + 1 - every) : i + 1]]
            next_lr = recipe.lr * lr_multiplier(step, total=total, warmup=warmup, min_ratio=recipe.min_lr_ratio)
            logged.append({"step": step, "loss": sum(recent) / len(recent), "lr": next_lr})
    return logged


def pretrain(
    family: str,
    size: str,
    tokenizer_dir: str | os.PathLike,
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    warmup_ratio: float = PRETRAIN.warmup_ratio,
    min_lr_ratio: float = PRETRAIN.min_lr_ratio,
    weight_decay: float = PRETRAIN.weight_decay,
    grad_clip: float | None = PRETRAIN.grad_clip,
    eval_tokens: int | None = 131072,
    eval_batch_size: int = 8,
    checkpoint_every: int = PRETRAIN.checkpoint_every,
    log_every: int = PRETRAIN.log_every,
    progress: bool = True,
    stop_after: int | None = None,
    model_overrides: dict | None = None,
) -> dict:
    """Train ``family``/``size`` from scratch and save it to ``out_dir``; return the ``pretrain.json`` dict.

    ``eval_tokens`` caps the held-out evaluation (first tokens of the validation stream, same
    cut for the model and the unigram baseline; None = whole split). ``stop_after`` ends this
    call after that many steps, leaving only the resumable checkpoint (it simulates a killed
    job; the return value then has ``"status": "partial"``). ``model_overrides`` replace config
    fields of the zoo size (recorded in ``pretrain.json``).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads!r}")
        torch.set_num_threads(threads)
    dev = torch.device(device)
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    tokenizer = load_tokenizer(tokenizer_dir)
    fingerprint = read_fingerprint(corpus_dir)
    config = build_config(family, size, tokenizer, **(model_overrides or {}))
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len {seq_len} exceeds {family}/{size} max_position_embeddings {max_pos}")
    recipe = pretrain_recipe(family, size, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                             warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                             grad_clip=grad_clip, checkpoint_every=checkpoint_every, log_every=log_every)
    train_texts = read_split(corpus_dir, "train")
    data = stream_data(tokenizer, train_texts, seq_len)

    seed_everything(seed)  # the initial weights come from the seed
    model = AutoModelForCausalLM.from_config(config)
    # Beyond the recipe, seed and tokens (which the loop checks), a checkpoint must be of this model.
    model_identity = {"family": family, "size": size, "model_overrides": model_overrides or {},
                      "vocab_size": len(tokenizer), "device_type": dev.type}
    run = train(model, data, recipe, partial, seed=seed, device=dev, identity=model_identity, restart_stale=True,
                progress=progress, stop_after=stop_after)
    if not run["completed"]:
        return {"status": "partial", "step": run["steps"], "checkpoint": str(partial)}
    history = logged_history(run, recipe)

    t_eval = time.perf_counter()
    val_texts = read_split(corpus_dir, "validation")
    model.eval()
    bf16 = run["precision"] == "bf16"
    with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else nullcontext():
        val = perplexity(model, tokenizer, val_texts, seq_len=seq_len, batch_size=eval_batch_size,
                         device=next(model.parameters()).device, max_tokens=eval_tokens)
    train_counts = Counter(data.ids.tolist())
    train_counts.pop(tokenizer.bos_token_id, None)
    unigram = unigram_perplexity(tokenizer, train_texts, val_texts, max_tokens=eval_tokens,
                                 train_counts=train_counts)
    eval_seconds = time.perf_counter() - t_eval
    result = {
        "family": family,
        "size": size,
        "model_type": config.model_type,
        "params": count_parameters(model),
        "model_overrides": model_overrides or {},
        "config": {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_")},
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "seed": seed,
        "warmup_steps": run["warmup_steps"],
        "min_lr_ratio": min_lr_ratio,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "optimizer": "AdamW(0.9, 0.95)",
        "schedule": "linear warm-up + cosine",
        "tokens_seen": run["tokens_seen"],
        "train_stream_tokens": len(data.ids),
        "final_train_loss": history[-1]["loss"] if history else float("nan"),
        "history": history,
        "val_ppl_token": val["ppl_token"],
        "val_ppl_word": val["ppl_word"],
        "val_tokens": val["tokens"],
        "val_words": val["words"],
        "unigram_ppl_token": unigram,
        "ppl_ratio_to_unigram": val["ppl_token"] / unigram,
        "eval_protocol": val["protocol"],
        "eval_tokens_cap": eval_tokens,
        "wall_seconds_train": run["wall_time_s"],
        # CPU seconds of the loop (all threads): on a shared machine this, not wall time, shows the cost.
        "cpu_seconds_train": run["cpu_time_s"],
        "wall_seconds_eval": eval_seconds,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "dtype": "bfloat16-autocast" if bf16 else "float32",
        "torch": torch.__version__,
        "corpus_fingerprint": fingerprint["sha256"],
        "tokenizer_dir": str(tokenizer_dir),
    }
    with atomic_directory(out) as tmp:
        save_converted(model, tmp, tokenizer)  # config.json records the attention kernel (Gemma 2: eager)
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return result


def read_pretrain_result(model_dir: str | os.PathLike) -> dict:
    """The ``pretrain.json`` of a pretrained model directory."""
    path = Path(model_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULT_FILE} in {str(model_dir)!r} (not a pretrained base model dir)")
    return json.loads(path.read_text())

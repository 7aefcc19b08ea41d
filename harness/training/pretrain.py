"""Pretrain a zoo model from scratch on the corpus (the offline profile's base models).

* Data: the training split as one ``<bos> doc <eos>`` stream; each step draws ``batch_size``
  windows of ``seq_len + 1`` tokens at offsets from a generator seeded by ``(seed, step)``,
  so a resumed run sees exactly the batches an uninterrupted run would.
* Optimisation: AdamW (betas 0.9 / 0.95, weight decay on matrices only), linear warm-up then
  cosine decay to ``min_lr_ratio * lr``, gradient clipping; fp32 on CPU, bf16 autocast on CUDA.
* Resume: every ``checkpoint_every`` steps the model, optimiser and step are saved under
  ``<out_dir>.partial/``; a restarted job with the same settings continues from there and
  produces the same weights (CPU). The final directory appears atomically (temp dir, then
  rename) with ``save_pretrained`` model + tokenizer + ``pretrain.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from harness.data.corpus import atomic_directory, read_fingerprint, read_split
from harness.evaluation.perplexity import perplexity, token_stream, unigram_perplexity
from harness.data.tokenizer import load_tokenizer
from harness.models.zoo import build_config, count_parameters

RESULT_FILE = "pretrain.json"
STATE_FILE = "state.pt"

# Offline-default recipes for the ``tiny`` sizes, tuned by a learning-rate x batch sweep at a
# fixed token budget (~370k tokens): at this scale the number of optimiser steps matters
# more than the batch, so batches are small. Each takes ~3-4 min single-threaded on CPU.
OFFLINE_RECIPES: dict[str, dict] = {
    "llama3": {"steps": 720, "batch_size": 2, "seq_len": 256, "lr": 1e-3},
    "tinyllama": {"steps": 720, "batch_size": 2, "seq_len": 256, "lr": 2e-3},
    "opt": {"steps": 720, "batch_size": 2, "seq_len": 256, "lr": 5e-4},
    "gemma2": {"steps": 720, "batch_size": 2, "seq_len": 256, "lr": 2e-3},
}


def lr_lambda(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_at(stream: torch.Tensor, step: int, *, seed: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """The ``(batch_size, seq_len + 1)`` token windows of one step; depends only on (seed, step)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No decay on biases, norms and embeddings' 1-D parameters (standard GPT / Llama recipe).
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8,
    )


def _settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
    warmup_ratio: float = 0.05,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
    eval_tokens: int | None = 131072,
    eval_batch_size: int = 8,
    checkpoint_every: int = 100,
    log_every: int = 10,
    progress: bool = True,
    stop_after: int | None = None,
    model_overrides: dict | None = None,
) -> dict:
    """Train ``family``/``size`` from scratch and save it to ``out_dir``; return the ``pretrain.json`` dict.

    ``eval_tokens`` caps the held-out evaluation (first tokens of the validation stream, same
    cut for the model and the unigram baseline; None = whole split). ``stop_after`` ends the
    run after that many steps, leaving only the resumable checkpoint (it simulates a killed
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
    warmup_steps = max(1, round(warmup_ratio * steps))
    settings = {"family": family, "size": size, "steps": steps, "batch_size": batch_size, "seq_len": seq_len,
                "lr": lr, "seed": seed, "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                "weight_decay": weight_decay, "grad_clip": grad_clip, "corpus_sha256": fingerprint["sha256"],
                "vocab_size": len(tokenizer), "device_type": dev.type, "model_overrides": model_overrides or {}}

    train_texts = read_split(corpus_dir, "train")
    ids, _ = token_stream(tokenizer, train_texts)
    stream = torch.tensor(ids, dtype=torch.long)
    if len(stream) <= seq_len + 1:
        raise ValueError(f"training stream has {len(stream)} tokens, fewer than seq_len + 2 = {seq_len + 2}")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dev)
    model.train()
    optimizer = _optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    )
    start_step, elapsed_before, cpu_before, history, recent = 0, 0.0, 0.0, [], []
    state_path = partial / STATE_FILE
    if state_path.is_file():
        state = torch.load(state_path, map_location=dev, weights_only=False)
        if state.get("settings_hash") == _settings_hash(settings):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_step, elapsed_before, cpu_before = state["step"], state["elapsed"], state.get("cpu", 0.0)
            history, recent = state["history"], state.get("recent", [])
        # A checkpoint from other settings is stale: ignored here, replaced at the next save.

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(total=steps, initial=start_step, desc=f"pretrain {family}/{size}", disable=not progress,
               mininterval=2.0, dynamic_ncols=True)
    last = stop_after if stop_after is not None else steps
    for step in range(start_step, min(steps, last)):
        batch = batch_at(stream, step, seed=seed, batch_size=batch_size, seq_len=seq_len).to(dev)
        with autocast:
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step} ({family}/{size}, lr={lr})")
        recent = (recent + [value])[-log_every:]
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": sum(recent) / len(recent),
                            "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        bar.update(1)
        done = step + 1
        if done < steps and (done % checkpoint_every == 0 or done == last):
            _save_state(partial, model, optimizer, scheduler, settings, step=done, history=history, recent=recent,
                        elapsed=elapsed_before + time.perf_counter() - t0,
                        cpu=cpu_before + time.process_time() - c0)
    bar.close()
    if stop_after is not None and stop_after < steps:
        return {"status": "partial", "step": min(steps, stop_after), "checkpoint": str(partial)}

    train_seconds = elapsed_before + time.perf_counter() - t0
    # CPU seconds of the loop (all threads): on a shared machine this, not wall time, shows the cost.
    train_cpu_seconds = cpu_before + time.process_time() - c0
    t_eval = time.perf_counter()
    val_texts = read_split(corpus_dir, "validation")
    model.eval()
    with autocast:
        val = perplexity(model, tokenizer, val_texts, seq_len=seq_len, batch_size=eval_batch_size,
                         device=dev, max_tokens=eval_tokens)
    train_counts = Counter(ids)
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
        **{k: settings[k] for k in ("steps", "batch_size", "seq_len", "lr", "seed", "warmup_steps",
                                    "min_lr_ratio", "weight_decay", "grad_clip")},
        "optimizer": "AdamW(0.9, 0.95)",
        "schedule": "linear warm-up + cosine",
        "tokens_seen": steps * batch_size * seq_len,
        "train_stream_tokens": len(stream),
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
        "wall_seconds_train": train_seconds,
        "cpu_seconds_train": train_cpu_seconds,
        "wall_seconds_eval": eval_seconds,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "dtype": "bfloat16-autocast" if dev.type == "cuda" else "float32",
        "torch": torch.__version__,
        "corpus_fingerprint": fingerprint["sha256"],
        "tokenizer_dir": str(tokenizer_dir),
    }
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return result


def _save_state(partial: Path, model, optimizer, scheduler, settings: dict, **progress) -> None:
    """Resumable state (atomic replace): weights, optimiser, schedule and the loop's progress."""
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / (STATE_FILE + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "settings_hash": _settings_hash(settings), **progress}, tmp)
    os.replace(tmp, partial / STATE_FILE)


def read_pretrain_result(model_dir: str | os.PathLike) -> dict:
    """The ``pretrain.json`` of a pretrained model directory."""
    path = Path(model_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULT_FILE} in {str(model_dir)!r} (not a pretrained base model dir)")
    return json.loads(path.read_text())

"""Gemma 2 tiny on transformers' eager attention vs the fused soft-capped kernel (CPU).

Interleaved rounds in one process (the machine may be shared), median per kernel:

* training step (forward + backward + AdamW) at ``--train-batch`` x ``--seq`` tokens;
* forward only (eval, no grad) at ``--eval-batch`` x ``--seq`` tokens.

Both models are the same random-init zoo Gemma 2 tiny (same weights), so the losses are
printed too: they agree to fp32 rounding.

``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/softcap_attention.py [--rounds 5]``

Measured 2026-12-01 on the shared 2-core CPU machine (1 thread, load ~1, medians of 5 interleaved
rounds): training step 1 x 1,024 eager 2.225 s, fused 0.963 s (2.31x); eval forward 16 x 1,024
eager 14.93 s, fused 6.05 s (2.47x); losses equal to the printed 5 decimals. Query blocks of 128
rows beat 64 and 256 (0.81 s vs 0.87 s / 0.95 s a step).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from hfconvert.softcap_attention import ATTN_NAME
from harness.measurement.overheads import VocabOnly
from harness.models.zoo import build_config


def _model(kernel: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = build_config("gemma2", "tiny", VocabOnly(vocab, bos_token_id=2, eos_token_id=1),
                          attn_implementation=kernel)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args()
    models = {"eager": _model("eager", args.vocab)}
    models["fused"] = copy.deepcopy(models["eager"])
    models["fused"].set_attn_implementation(ATTN_NAME)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.train_batch, args.seq), generator=gen)
    eval_ids = torch.randint(3, args.vocab, (args.eval_batch, args.seq), generator=gen)

    def train_step(name: str) -> float:
        model, opt = models[name], opts[name]
        model.train()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses[name].append(float(loss.detach()))
        return elapsed

    def eval_pass(name: str) -> float:
        model = models[name].eval()
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=eval_ids)
        return time.perf_counter() - start

    losses = {k: [] for k in models}
    train = {k: [] for k in models}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for name in models:
            train[name].append(train_step(name))
    med = {k: statistics.median(v[1:]) for k, v in train.items()}
    print(f"threads={torch.get_num_threads()} train {args.train_batch}x{args.seq}: eager {med['eager']:.3f}s "
          f"fused {med['fused']:.3f}s ratio {med['eager'] / med['fused']:.2f}x (median of {args.rounds})")
    print("losses per step (eager / fused):", [f"{a:.5f}/{b:.5f}" for a, b in zip(losses["eager"], losses["fused"])])
    if args.skip_eval:
        return
    evals = {k: [] for k in models}
    for _ in range(args.rounds + 1):
        for name in models:
            evals[name].append(eval_pass(name))
    med = {k: statistics.median(v[1:]) for k, v in evals.items()}
    print(f"eval forward {args.eval_batch}x{args.seq}: eager {med['eager']:.3f}s fused {med['fused']:.3f}s "
          f"ratio {med['eager'] / med['fused']:.2f}x (median of {args.rounds})")


if __name__ == "__main__":
    main()

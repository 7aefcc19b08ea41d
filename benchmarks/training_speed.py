"""How to spend 2 CPU cores on the offline training jobs: threads per job, batch shape, ``torch.compile``.

Issue 10 item 7 asks where the default's training time could be saved. Every variant trains
the same random-init zoo model (``--family``, ``tiny``) on the same 1,024 tokens a step
(forward + backward + AdamW), interleaved round by round in one process, and reports the
median step time and its ratio to the default layout (one thread, ``1 x 1,024``):

* ``2 threads``: one job using both cores (the workflow instead runs two one-thread jobs side
  by side, so a 2-thread job pays off only if it is more than 2x faster);
* ``2 x 512``: the same tokens as two shorter windows (attention is quadratic in the window;
  the evaluation needs 1,024-token windows, so this is the price of that choice, not an option);
* ``compiled``: ``torch.compile`` of the model (inductor, C++ backend); its first-step compile
  time is reported separately (each training job is a new process and would pay it again).

``OMP_NUM_THREADS=2 PYTHONPATH=. python -m benchmarks.training_speed [--family llama3] [--rounds 5]``

Measured 2026-12-01 (Llama 3 tiny, idle 2-core Intel Xeon, 3 rounds;
``results/training_speed/llama3.json``): 1 thread 0.643 s a step, 2 threads 0.350 s (1.84x, under
the 2x of two jobs side by side), 2 x 512 0.482 s, compiled 0.636 s + 6.5 s compiling (warm
inductor cache; 39.9 s cold). The default layout stays.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from harness.measurement.overheads import VocabOnly
from harness.models.zoo import build_config


def make_model(family: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(build_config(family, "tiny", VocabOnly(vocab)))


def stepper(model: torch.nn.Module, batch: torch.Tensor, threads: int):
    """One optimizer step on ``batch`` ([b, t + 1] token ids) at ``threads`` torch threads."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llama3")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()

    base = make_model(args.family, args.vocab)
    tokens = torch.randint(3, args.vocab, (1, 1025), generator=torch.Generator().manual_seed(0))
    halves = torch.cat([tokens[:, :513], tokens[:, 512:]], dim=0)  # 2 x 512 predictions, the same tokens
    variants = {
        "1 thread, 1 x 1,024 (default)": stepper(copy.deepcopy(base), tokens, 1),
        "2 threads, 1 x 1,024": stepper(copy.deepcopy(base), tokens, 2),
        "1 thread, 2 x 512": stepper(copy.deepcopy(base), halves, 1),
    }
    compile_s = None
    if not args.no_compile:
        compiled = torch.compile(copy.deepcopy(base))
        step = stepper(compiled, tokens, 1)
        start = time.perf_counter()
        step()  # compiles forward and backward
        compile_s = time.perf_counter() - start
        variants["1 thread, 1 x 1,024, torch.compile"] = step
    for step in variants.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(variants[name]())
    ref = statistics.median(times["1 thread, 1 x 1,024 (default)"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({"variant": name, "median_s": median, "speedup": ref / median})
        print(f"{name:40s} {median:7.3f} s/step  {ref / median:5.2f}x")
    if compile_s is not None:
        print(f"torch.compile: first step (compile) {compile_s:.1f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"family": args.family, "rounds": args.rounds, "torch": torch.__version__,
                       "rows": rows, "compile_first_step_s": compile_s}, fh, indent=1)


if __name__ == "__main__":
    main()

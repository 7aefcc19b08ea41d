"""Eviction caches: probabilities for the rows a policy reads vs for every row (CPU, one process).

``baselines.eviction.eviction_attention`` computes explicit probabilities only for the queries
the policy reads (``EvictionPolicy.score_rows``) and the output through SDPA; forcing
``score_rows`` to every row gives the previous path (explicit attention for the whole chunk).
Interleaved rounds in one process, median per path, on random-init zoo models (decode cost
follows the architecture and the cache, not the weights):

* prefill of a ``--context``-token prompt through a fresh eviction cache (the cost benchmark's);
* ``--steps`` cached decode steps at batch 16 (StreamingLLM, which reads no row): since decode
  steps were measured to gain nothing (0.95-0.99x), they always take the explicit path and this
  case is the same code twice, a check of the noise floor.

Measured 2026-12-01 (shared 2-core Intel Xeon VM, 1 thread, medians of 7 interleaved rounds, 1,024-token
prompt): prefill Llama 3 tiny StreamingLLM 2.49x, SnapKV 3.35x, TOVA 2.28x; TinyLlama tiny (32 query
heads) 3.16x, 3.88x, 3.26x; the decode case (same code twice) 0.98x / 1.03x. ``results/bench/eviction_rows.json``.

``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eviction_rows.py [--rounds 7] [--out results/bench/eviction_rows.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from baselines.eviction import EvictionPolicy, eviction_cache_factory
from baselines.policies import POLICIES
from harness.atomic import write_json_atomic
from harness.measurement.overheads import VocabOnly
from harness.models.zoo import build_config

POLICY_NAMES = ("streamingllm", "snapkv", "tova")


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = build_config(family, "tiny", VocabOnly(4096, bos_token_id=2, eos_token_id=1))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _prefill(model, policy, ids) -> float:
    cache = eviction_cache_factory(model, policy)()
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return time.perf_counter() - start


def _decode(model, policy, ids, steps: int) -> float:
    cache = eviction_cache_factory(model, policy)()
    with torch.no_grad():
        model(input_ids=ids[:, :64], past_key_values=cache, use_cache=True)
        start = time.perf_counter()
        for t in range(64, 64 + steps):
            pos = torch.full((ids.shape[0], 1), t, dtype=torch.long)
            model(input_ids=ids[:, t : t + 1], position_ids=pos, past_key_values=cache, use_cache=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["llama3", "tinyllama"])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="results/bench/eviction_rows.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for family in args.families:
        model = _model(family)
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, 4096, (1, args.context), generator=gen)
        batch = torch.randint(3, 4096, (16, 64 + args.steps), generator=gen)
        for name in POLICY_NAMES:
            policy = EvictionPolicy(name, 0.25)
            cls, rows_of = POLICIES[name], POLICIES[name].score_rows
            cases = {"prefill": lambda p=policy: _prefill(model, p, prompt)}
            if name == "streamingllm":
                cases["decode"] = lambda p=policy: _decode(model, p, batch, args.steps)
            for case, fn in cases.items():
                times = {"rows read": [], "every row": []}
                fn()  # warm-up
                for _ in range(args.rounds):
                    for path in times:  # interleaved, the same process
                        cls.score_rows = rows_of if path == "rows read" else (lambda self, length: length)
                        try:
                            times[path].append(fn())
                        finally:
                            cls.score_rows = rows_of
                new, old = statistics.median(times["rows read"]), statistics.median(times["every row"])
                rows.append({"family": family, "policy": name, "case": case, "median_s_rows_read": new,
                             "median_s_every_row": old, "speedup": old / new})
                print(f"{family:10s} {name:13s} {case:8s} every row {old * 1000:8.1f} ms  rows read "
                      f"{new * 1000:8.1f} ms  {old / new:.2f}x", flush=True)
    write_json_atomic(args.out, {"context": args.context, "decode_steps": args.steps, "decode_batch": 16,
                                 "rounds": args.rounds, "threads": 1, "torch": torch.__version__,
                                 "rows": rows})


if __name__ == "__main__":
    main()

"""Eviction stacked on mixSGA, decode: one batched step per layer vs one observer call per sample (CPU).

``mixsga.eviction.MixSGAEvictionCache`` scores and compacts a decode step for the whole batch
at once (``MixSGALayer.batch_observer`` + ``keep_tokens_batch``); clearing ``batch_observer``
gives the per-sample path it replaced in the decode loop (one token-order gather, policy call,
byte selection and store compaction per sample and layer). The workload is the one the
``table3_eviction_stack`` runs spend their time in: ``bounded_cache_perplexity`` decoding
``--tokens``-token windows token by token from an empty cache at ``--batch`` 8, here on the
random-init zoo models at their ``tiny`` architecture (decode cost follows the architecture
and the cache, not the weights), H2O keeping 0.5 of a 3:1:6 mixSGA (the 25 % cell). Both paths
run interleaved in one process (``harness.measurement.measure.interleaved``); the logits of the
two paths are checked equal first.

``OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/eviction_decode.py [--rounds 5] [--out results/bench/eviction_decode.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from harness.atomic import write_json_atomic
from harness.measurement.measure import interleaved
from harness.measurement.overheads import VocabOnly
from harness.methods import get_method
from harness.models.zoo import build_config
from harness.orchestration.provenance import device_info


def _setup(family: str, budget: float):
    torch.manual_seed(0)
    config = build_config(family, "tiny", VocabOnly(4096, bos_token_id=2, eos_token_id=1))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    method = get_method("h2o+mixsga")
    params = method.params_for_budget(copy.deepcopy(model.config), budget, inner_budget=0.5)
    return method, method.apply(model, params), params


def _decode(method, model, params, ids: torch.Tensor, batched: bool) -> tuple[float, torch.Tensor]:
    cache = method.new_cache(model, params)
    if not batched:
        for layer in cache.layers:
            layer.batch_observer = None
    logits = []
    start = time.perf_counter()
    with torch.no_grad():
        for t in range(ids.shape[1]):
            pos = torch.full((ids.shape[0], 1), t, dtype=torch.long)
            logits.append(model(input_ids=ids[:, t : t + 1], position_ids=pos, past_key_values=cache,
                                use_cache=True).logits)
    return time.perf_counter() - start, torch.cat(logits, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="llama3,gemma2")
    parser.add_argument("--tokens", type=int, default=256, help="window length decoded token by token")
    parser.add_argument("--batch", type=int, default=8, help="windows decoded in lockstep (the evaluation's)")
    parser.add_argument("--budget", type=float, default=0.25, help="h2o+mixsga budget (keep 0.5 of 3:1:6)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for family in args.families.split(","):
        method, model, params = _setup(family, args.budget)
        ids = torch.randint(3, 4096, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
        a, b = _decode(method, model, params, ids, True)[1], _decode(method, model, params, ids, False)[1]
        if not torch.equal(a, b):
            raise SystemExit(f"{family}: the batched and per-sample paths disagree (max |diff| "
                             f"{float((a - b).abs().max()):.3g})")
        times = interleaved({"batched": lambda: _decode(method, model, params, ids, True)[0],
                             "per_sample": lambda: _decode(method, model, params, ids, False)[0]},
                            repeats=args.rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"family": family, "tokens": args.tokens, "batch": args.batch, "budget": args.budget,
                     "seconds": times, "median_s": med, "speedup": med["per_sample"] / med["batched"]})
        print(f"{family}: per-sample {med['per_sample']:.2f} s, batched {med['batched']:.2f} s "
              f"-> {rows[-1]['speedup']:.2f}x (logits identical)", flush=True)
    out = {"benchmark": "eviction_decode", "device": device_info("cpu"), "torch": torch.__version__,
           "rounds": args.rounds, "rows": rows}
    if args.out:
        write_json_atomic(args.out, out)
    else:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

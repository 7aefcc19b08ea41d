"""Measure what 1,024-token windows cost on this machine (issue 10 item 3): pretraining steps, full-forward
and bounded-cache (eviction, token by token) perplexity, per zoo family, on freshly initialised tiny models.

Pretrain steps at seq_len 1024 and 256 are timed in alternation in one process at equal tokens per step
(ratios, not absolute times, are what carries over). Evaluations are timed once each (they take seconds
to minutes; their order is fixed). Usage:

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/longctx_costs.py --tokenizer work/tokenizer --corpus work/corpus \
        [--families llama3 opt gemma2 tinyllama] [--eval-families llama3] [--max-tokens 16384] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def pretrain_steps(family: str, tokenizer, stream: torch.Tensor, tokens_per_step: int, lengths: list[int],
                   repeats: int, warmup: int) -> dict[int, list[float]]:
    from harness.models.zoo import build_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[int, list[float]] = {n: [] for n in lengths}
    gen = torch.Generator().manual_seed(0)
    for r in range(warmup + repeats):
        for n in lengths:  # interleaved: the lengths share whatever else the machine does
            b = tokens_per_step // n
            starts = torch.randint(0, len(stream) - n - 1, (b,), generator=gen)
            batch = torch.stack([stream[s : s + n + 1] for s in starts])
            t0 = time.perf_counter()
            loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous()).loss  # shifted inside too; cost only
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def interleaved_evals(family: str, tok, texts, seq_len: int, max_tokens: int, rounds: int, min_distance: int,
                      prefix_tokens: int) -> dict[str, list[float]]:
    """Seconds of each evaluation, timed in alternation ``rounds`` times (a shared machine's load hits all alike)."""
    from baselines.eviction import eviction_cache_factory
    from baselines.policies import EvictionPolicy
    from harness.evaluation.evaluate import bounded_cache_perplexity
    from harness.evaluation.perplexity import perplexity
    from harness.models.zoo import build_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tok)).eval()
    full_model = AutoModelForCausalLM.from_config(model.config).eval()
    full_model.load_state_dict(model.state_dict())
    factories = {m: eviction_cache_factory(model, EvictionPolicy(m, 0.25)) for m in ("h2o", "snapkv")}
    def bounded(method: str, batch: int, chunk: int = 1, tokens: int = max_tokens):
        return lambda: bounded_cache_perplexity(model, tok, texts, seq_len=seq_len, batch_size=batch,
                                                cache_factory=factories[method], max_tokens=tokens,
                                                min_distance=min_distance, chunk=chunk)

    def full(batch: int):
        return lambda: perplexity(full_model, tok, texts, seq_len=seq_len, batch_size=batch, max_tokens=max_tokens,
                                  min_distance=min_distance)

    jobs = {
        "full forward, batch 8": full(8),
        "full forward, batch 16": full(16),
        "h2o 25 %, token by token, batch 16": bounded("h2o", 16),
        "h2o 25 %, token by token, batch 8": bounded("h2o", 8),
        "h2o 25 %, 8-token chunks, batch 16": bounded("h2o", 16, 8),
        "snapkv 25 %, token by token, batch 16": bounded("snapkv", 16),
        f"h2o 25 %, token by token, batch 8, first {prefix_tokens} tokens": bounded("h2o", 8, 1, prefix_tokens),
    }
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            # CPU seconds of this (one-thread) process: what the job costs, much less inflated than wall
            # time by other processes on a shared machine; wall time printed beside it
            t0, c0 = time.perf_counter(), time.process_time()
            got = job()
            times[name].append(round(time.process_time() - c0, 2))
            print(f"round {r}: {name}: {times[name][-1]} s CPU, {time.perf_counter() - t0:.1f} s wall "
                  f"(ppl {got['ppl_token']:.3f}, long-range {got['longrange']['tokens']} tokens)", flush=True)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--families", nargs="*", default=["llama3", "tinyllama", "opt", "gemma2"])
    p.add_argument("--eval-families", nargs="*", default=["llama3"])
    p.add_argument("--methods", nargs="*", default=["h2o", "snapkv"])
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[8, 16])
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-pretrain", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--interleaved", type=int, default=0, help="rounds of the interleaved evaluation timing (0: off)")
    p.add_argument("--prefix-tokens", type=int, default=8192)
    args = p.parse_args()
    torch.set_num_threads(1)
    from baselines.eviction import eviction_cache_factory
    from baselines.policies import EvictionPolicy
    from harness.data.corpus import read_split
    from harness.data.tokenizer import load_tokenizer
    from harness.evaluation.evaluate import bounded_cache_perplexity
    from harness.evaluation.perplexity import perplexity, token_stream
    from harness.models.zoo import build_config

    tok = load_tokenizer(args.tokenizer)
    out: dict = {"threads": 1, "max_tokens": args.max_tokens, "seq_len": args.seq_len}
    if not args.skip_pretrain:
        ids, _ = token_stream(tok, read_split(args.corpus, "train")[:40])
        stream = torch.tensor(ids)
        for family in args.families:
            times = pretrain_steps(family, tok, stream, args.tokens_per_step, [args.seq_len, 256], args.repeats, 2)
            med = {n: statistics.median(v) for n, v in times.items()}
            out[f"pretrain_step_s/{family}"] = {str(n): round(v, 4) for n, v in med.items()}
            out[f"pretrain_ratio/{family}"] = round(med[args.seq_len] / med[256], 3)
            print(family, "pretrain step (s, median of", args.repeats, ", ", args.tokens_per_step, "tokens):", med,
                  "ratio", out[f"pretrain_ratio/{family}"], flush=True)
    if args.interleaved:
        texts = read_split(args.corpus, "test")
        for family in args.eval_families:
            times = interleaved_evals(family, tok, texts, args.seq_len, args.max_tokens, args.interleaved, 128,
                                      args.prefix_tokens)
            out[f"interleaved/{family}"] = {k: {"runs_s": v, "median_s": statistics.median(v)} for k, v in times.items()}
        print(json.dumps(out, indent=1))
        return
    if args.skip_eval:
        print(json.dumps(out, indent=1))
        return
    texts = read_split(args.corpus, "test")
    for family in args.eval_families:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tok)).eval()
        t0 = time.perf_counter()
        full = perplexity(model, tok, texts, seq_len=args.seq_len, batch_size=8, max_tokens=args.max_tokens,
                          min_distance=256)
        out[f"full_forward_s/{family}"] = round(time.perf_counter() - t0, 2)
        print(family, "full forward", out[f"full_forward_s/{family}"], "s", full["tokens"], "tokens", flush=True)
        for method in args.methods:
            for bs in args.batch_sizes:
                torch.manual_seed(0)
                model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tok)).eval()
                factory = eviction_cache_factory(model, EvictionPolicy(method, 0.25))
                t0 = time.perf_counter()
                got = bounded_cache_perplexity(model, tok, texts, seq_len=args.seq_len, batch_size=bs,
                                               cache_factory=factory, max_tokens=args.max_tokens, min_distance=256)
                key = f"bounded_cache_s/{family}/{method}/batch{bs}"
                out[key] = round(time.perf_counter() - t0, 2)
                print(key, out[key], "s; ppl", round(got["ppl_token"], 3), "vs full", round(full["ppl_token"], 3),
                      flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

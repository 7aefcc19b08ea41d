"""Where a decode step's CPU time goes: torch.profiler op counts and self-CPU time, mixSGA vs GQA.

For each zoo family (``tiny`` architecture, random weights, as ``benchmarks.decode``
builds them) at one context and batch 1: prefill ``context - 1`` tokens, then profile
``--steps`` single-token forward passes (``model(input_ids=[[t]], past_key_values=cache)``,
no ``generate`` around them) of transformers' GQA (SDPA + ``DynamicCache``), the static
GQA (``benchmarks.fast_gqa``) and mixSGA, after ``--warmup`` unprofiled steps. Reported
per layer and step: the top-level aten ops (called from Python, not from inside another
aten op: the dispatches a step pays for), every aten op (nested ones included), the aten
self-CPU microseconds, and the step's wall time (profiled, so inflated). Op counts are
deterministic; times are one sample on a shared machine.

``python -m benchmarks.decode_profile --out results/bench/decode-profile.json``
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import decode as bench


def profile_steps(entry: bench.Entry, token: torch.Tensor, steps: int, warmup: int) -> dict:
    """Profile ``steps`` decode forwards of ``entry`` from a copy of its prefilled cache."""
    model = entry.model
    cache = copy.deepcopy(entry.prefilled)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    with torch.inference_mode():
        for _ in range(warmup):
            model(input_ids=token, past_key_values=cache, use_cache=True)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                model(input_ids=token, past_key_values=cache, use_cache=True)
        wall = time.perf_counter() - start
    counts: Counter = Counter()
    top: Counter = Counter()
    self_us: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if not evt.name.startswith("aten::"):
            continue
        counts[evt.name] += 1
        self_us[evt.name] += evt.self_cpu_time_total
        parent = evt.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            top[evt.name] += 1
    per = steps * layers
    ops = {name: {"top_level_per_layer_step": top[name] / per, "all_per_layer_step": counts[name] / per,
                  "self_us_per_layer_step": self_us[name] / per}
           for name in sorted(counts, key=lambda n: -self_us[n])}
    return {
        "label": entry.spec.label,
        "layers": layers,
        "steps": steps,
        "wall_ms_per_step_profiled": 1000 * wall / steps,
        "top_level_aten_ops_per_layer_step": sum(top.values()) / per,
        "aten_ops_per_layer_step": sum(counts.values()) / per,
        "aten_self_us_per_layer_step": sum(self_us.values()) / per,
        "ops": ops,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="tinyllama,llama3")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mixsga-backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.context < 2:
        parser.error("--steps must be >= 1, --warmup >= 0 and --context >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    bench.RUNTIME["mixsga_backend"] = args.mixsga_backend
    device = torch.device("cpu")
    zoo = argparse.Namespace(zoo="work/models", zoo_families=args.families, zoo_vocab=8192, seed=args.seed)
    report = {"protocol": {k: v for k, v in vars(args).items() if k != "out"},
              "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "load_average_start": bench.load_average()},
              "models": []}
    for label, base in bench.zoo_models(zoo, torch.float32, device):
        ids = bench.context_ids(base.config.vocab_size, 1, args.context, args.seed, device)
        token = ids[:, -1:]
        rows = []
        for spec in bench.HEADLINE[1:]:
            entry = bench.prepare(spec, base, ids, prefill_repeats=1, chunk=512, seed=args.seed, device=device,
                                  new_tokens=args.steps + args.warmup)
            rows.append(profile_steps(entry, token, args.steps, args.warmup))
            row = rows[-1]
            print(f"{label} {spec.label}: {row['top_level_aten_ops_per_layer_step']:.1f} top-level / "
                  f"{row['aten_ops_per_layer_step']:.1f} all aten ops per layer-step, "
                  f"{row['aten_self_us_per_layer_step']:.0f} us self-CPU / layer-step, "
                  f"{row['wall_ms_per_step_profiled']:.2f} ms / step (profiled)")
        report["models"].append({"model": label, "context": args.context, "batch": 1, "rows": rows})
    report["environment"]["load_average_end"] = bench.load_average()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

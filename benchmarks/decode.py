"""Decode / prefill benchmark: base model vs GQA vs mixSGA at matched KV budgets.

Measures, in one process and side by side, prefill time, decode tokens/s and
stored KV bytes for each method at several context lengths, and writes one
JSON under ``results/bench/`` with medians and ratios against GQA and the base
model. Random weights are fine for timing; shapes follow the real checkpoints
with fewer layers (``--layers``). The offline zoo models (``work/models``) are
measured too when present.

Run ``python -m benchmarks.decode --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from harness.measure import PeakMemory, Timer, summarise

log = logging.getLogger("bench.decode")

#: Real layer shapes (layer count is set by --layers).
SHAPES: dict[str, dict] = {
    "llama3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
        head_dim=64, vocab_size=32000, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}

#: Methods at their budget: name -> (nominal budget, builder description).
METHODS = ("base", "gqa", "mixsga")
MIXSGA_RATIOS = (3, 1, 6)


def build_shape(name: str, layers: int, max_len: int) -> LlamaForCausalLM:
    """A random-weight Llama of one of the real shapes, with ``layers`` layers."""
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max_len, **SHAPES[name])
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def apply_method(base, method: str, seed: int):
    """Return a converted deep copy of ``base`` for ``method`` (the base itself for 'base')."""
    if method == "base":
        return base
    model = copy.deepcopy(base)
    if method == "gqa":
        from baselines import convert_to_gqa

        return convert_to_gqa(model, num_key_value_heads=model.config.num_key_value_heads // 2).eval()
    if method == "mixsga":
        from mixsga import MixSGAConfig, convert_to_mixsga

        torch.manual_seed(seed)
        return convert_to_mixsga(model, MixSGAConfig(ratios=MIXSGA_RATIOS)).eval()
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def cache_bytes(cache) -> int:
    """Bytes a live cache holds: the method's own count where it has one, else summed K/V nbytes."""
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def measure(model, ids: torch.Tensor, *, new_tokens: int, repeats: int, prefill_repeats: int, device) -> dict:
    """Prefill timing (forward over the context) and decode timing (generate from a prefilled cache)."""
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    with torch.inference_mode():
        prefill_ms = []
        for _ in range(prefill_repeats):
            with PeakMemory(device) as prefill_mem, Timer(device) as t:
                out = model(ids[:, :-1], use_cache=True)
            prefill_ms.append(t.seconds * 1000)
        prefilled = out.past_key_values
        stored_context = cache_bytes(prefilled)
        del out

        def run() -> object:
            return model.generate(
                ids, past_key_values=copy.deepcopy(prefilled), return_dict_in_generate=True, **kwargs
            )

        run()  # warm-up
        tps = []
        for _ in range(repeats):
            cache_copy = copy.deepcopy(prefilled)
            with PeakMemory(device) as decode_mem, Timer(device) as t:
                gen = model.generate(ids, past_key_values=cache_copy, return_dict_in_generate=True, **kwargs)
            tps.append(new_tokens / t.seconds)
        stored_final = cache_bytes(gen.past_key_values)
    tokens_final = ids.shape[1] - 1 + new_tokens
    result = {
        "prefill_ms": summarise(prefill_ms),
        "decode_tokens_per_s": summarise(tps),
        "kv_bytes_after_prefill": stored_context,
        "kv_bytes_final": stored_final,
        "kv_bytes_per_token_final": stored_final / (tokens_final * ids.shape[0]),
        "peak_memory": {"prefill": prefill_mem.as_dict(), "decode": decode_mem.as_dict()},
    }
    if getattr(model, "mixsga_runtime", None) is not None:
        from mixsga import routing_stats

        result["routing"] = routing_stats(model)
    return result


def bench_model(label: str, base, *, contexts, new_tokens, repeats, prefill_repeats, batch, seed, device) -> dict:
    """All methods on one base model at every context length."""
    base = base.to(device)
    models = {m: apply_method(base, m, seed).to(device) for m in METHODS}
    rows: dict[str, dict] = {}
    vocab = base.config.vocab_size
    for ctx in contexts:
        gen = torch.Generator().manual_seed(seed + ctx)
        ids = torch.randint(3, vocab, (batch, ctx + 1), generator=gen).to(device)
        rows[str(ctx)] = {}
        for method, model in models.items():
            log.info("%s ctx=%d %s", label, ctx, method)
            rows[str(ctx)][method] = measure(
                model, ids, new_tokens=new_tokens, repeats=repeats, prefill_repeats=prefill_repeats, device=device
            )
            gc.collect()
        rows[str(ctx)]["ratios"] = ratios(rows[str(ctx)])
    return {"label": label, "config": base.config.to_dict(), "contexts": rows}


def ratios(by_method: dict[str, dict]) -> dict[str, float]:
    """Median-based ratios: mixSGA decode vs GQA and vs base, prefill, and stored bytes vs base."""
    def med(m: str, key: str) -> float:
        return by_method[m][key]["p50"]

    return {
        "mixsga_vs_gqa_decode_tps": med("mixsga", "decode_tokens_per_s") / med("gqa", "decode_tokens_per_s"),
        "mixsga_vs_base_decode_tps": med("mixsga", "decode_tokens_per_s") / med("base", "decode_tokens_per_s"),
        "gqa_vs_base_decode_tps": med("gqa", "decode_tokens_per_s") / med("base", "decode_tokens_per_s"),
        "mixsga_vs_gqa_prefill_ms": med("mixsga", "prefill_ms") / med("gqa", "prefill_ms"),
        "mixsga_kv_fraction": by_method["mixsga"]["kv_bytes_final"] / by_method["base"]["kv_bytes_final"],
        "gqa_kv_fraction": by_method["gqa"]["kv_bytes_final"] / by_method["base"]["kv_bytes_final"],
    }


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3.2-1b,tinyllama-1.1b",
                        help=f"comma-separated real shapes to build with random weights; known: {', '.join(SHAPES)}")
    parser.add_argument("--layers", type=int, default=2, help="layers per shaped model (default 2)")
    parser.add_argument("--zoo", default="work/models",
                        help="directory of offline zoo models ({family}/base); skipped when absent")
    parser.add_argument("--contexts", default="512,2048,8192", help="context lengths (default 512,2048,8192)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode repeats (>= 5 recommended)")
    parser.add_argument("--prefill-repeats", type=int, default=3, help="timed prefill repeats")
    parser.add_argument("--batch", type=int, default=1, help="batch size (the paper's Table 10 uses 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output JSON path, e.g. results/bench/decode-cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    common = dict(contexts=contexts, new_tokens=args.new_tokens, repeats=args.repeats,
                  prefill_repeats=args.prefill_repeats, batch=args.batch, seed=args.seed, device=device)

    results = []
    for shape in [s for s in args.shapes.split(",") if s]:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        torch.manual_seed(args.seed)
        base = build_shape(shape, args.layers, max(contexts) + args.new_tokens + 8).to(dtype)
        results.append(bench_model(f"{shape} ({args.layers} layers, random weights)", base, **common))
        del base
        gc.collect()
    zoo = Path(args.zoo)
    for family_dir in sorted(zoo.glob("*/base")) if zoo.is_dir() else []:
        base = AutoModelForCausalLM.from_pretrained(family_dir, dtype=dtype).eval()
        usable = [c for c in contexts if c + args.new_tokens < base.config.max_position_embeddings]
        if not usable:
            log.warning("skipping %s: no context fits its %d positions", family_dir,
                        base.config.max_position_embeddings)
            continue
        results.append(bench_model(f"zoo:{family_dir.parent.name}", base, **{**common, "contexts": usable}))

    payload = {
        "benchmark": "decode",
        "methods": {"base": "100 % KV", "gqa": "KV heads halved, mean-pooled, transformers' own attention (50 %)",
                    "mixsga": f"ratios {MIXSGA_RATIOS}, group sizes (1, 2, 4), nominal 50 %"},
        "protocol": {"prefill": "forward over context[:-1], timed", "decode":
                     "generate(new_tokens) from a copy of the prefilled cache, timed; tokens/s = new_tokens / time",
                     "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "prefill_repeats": args.prefill_repeats, "batch": args.batch, "dtype": args.dtype},
        "environment": environment(device),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out)
    for r in results:
        for ctx, row in r["contexts"].items():
            print(f"{r['label']:<45} ctx={ctx:>5}  " + "  ".join(f"{k}={v:.3f}" for k, v in row["ratios"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

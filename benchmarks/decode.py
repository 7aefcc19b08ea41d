"""Decode / prefill benchmark: mixSGA and every baseline at matched KV budgets.

Three tables, measured in one process and written to one JSON (fields in
``results/bench/README.md``):

* ``headline`` (``--batches``, default 1 and 8): base, GQA (KV heads halved) run
  two ways -- through transformers' own SDPA attention and ``DynamicCache``, as a
  user would run it (``gqa@50%``), and through the fastest GQA we can write here,
  a preallocated cache read by SDPA (``gqa-static@50%``, ``benchmarks.fast_gqa``)
  -- and mixSGA 3:1:6 (50 %) at every ``--contexts`` length on each ``--shapes``
  model and on the zoo models (``work/models/{family}/base`` when present, else
  the zoo's ``tiny`` architectures with random weights).
* ``all_methods`` (batch 1, ``--all-methods SHAPE:CONTEXT``): every registry
  method at 50 % and 25 % budgets (GQA, MQA at its own 1/H_kv budget, CLA, mixSGA
  3:1:6 and 0:0:1, H2O / StreamingLLM / SnapKV / TOVA at keep 0.5 / 0.25,
  H2O on GQA and on mixSGA at 25 % total), each timed against the base model.
* ``batched`` (``--batched SHAPE:CONTEXT:BATCH``, off by default now that the
  headline covers batch 8): the headline methods at one extra batch size.

Batch > 1 caches are the batch-1 prefill repeated ``batch`` times
(``Cache.batch_repeat_interleave``): decode cost depends on the cache's shape, not
its content, and prefilling 8 x 8k tokens per method would take minutes on a CPU.
Prefill times are those of the batch-1 prefill.

Protocol: prefill the context minus its last token once per method (timed;
``logits_to_keep=1``, as ``generate`` does; eviction methods prefill in
``--prefill-chunk`` chunks so that they compress between chunks, as they must),
then time ``generate`` of ``--new-tokens`` greedy tokens from a fresh copy of the
prefilled cache (``harness.measurement.generation.generate_exactly``). Methods
compared with each other are timed interleaved (``harness.measurement.measure.interleaved``:
one warm-up each, then rounds in alternating order), so that load drift on a shared
machine hits them alike; ratios are of medians. ``--compile`` compiles mixSGA's
decode attention (backend ``"compiled"``) and the static GQA's SDPA attention
the same way (``torch.compile``, dynamic shapes). Stored K/V bytes are
measured on the live cache with the registry's ``live_bytes`` and recorded next to
the registry's analytic figure. Random weights are fine for timing; shapes follow
the real checkpoints with fewer layers (``--layers``).

Run ``python -m benchmarks.decode --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from benchmarks.fast_gqa import StaticViewCache
from harness.measurement.generation import generate_exactly
from harness.measurement.measure import PeakMemory, Timer, interleaved, summarise
from harness.measurement.overheads import VocabOnly
from harness.methods import Eviction, Method, Stacked, get_method
from mixsga import MixSGACache
from mixsga.budget import full_kv_bytes_per_token, kv_shape

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


@dataclass(frozen=True)
class Spec:
    """One method at one budget, built through the registry."""

    label: str
    method: str
    budget: float
    explicit: dict = field(default_factory=dict)
    cache: str = "default"  # "static": benchmarks.fast_gqa.StaticViewCache instead of the method's own


HEADLINE = (
    Spec("base", "base", 1.0),
    Spec("gqa@50%", "gqa", 0.5),
    Spec("gqa-static@50%", "gqa", 0.5, cache="static"),
    Spec("mixsga-3:1:6@50%", "mixsga", 0.5),
)

#: Runtime knobs shared by every ``prepare`` (set from the command line in ``main``).
RUNTIME = {"mixsga_backend": "auto", "compile": False}


def all_specs(config) -> list[Spec]:
    """Every method at 50 % and 25 % (MQA at its own budget, 1 / H_kv)."""
    heads = kv_shape(config).num_kv_heads
    specs = [Spec("base", "base", 1.0)]
    for budget in (0.5, 0.25):
        pct = f"{budget:.0%}"
        specs += [Spec(f"gqa@{pct}", "gqa", budget), Spec(f"cla@{pct}", "cla", budget)]
        ratios = "3:1:6" if budget == 0.5 else "0:0:1"
        specs.append(Spec(f"mixsga-{ratios}@{pct}", "mixsga", budget))
        specs += [Spec(f"{name}@{pct}", name, budget) for name in ("h2o", "streamingllm", "snapkv", "tova")]
    specs.insert(3, Spec(f"mqa@{1 / heads:.1%}", "mqa", 1 / heads))
    specs += [Spec("h2o+gqa@25%", "h2o+gqa", 0.25), Spec("h2o+mixsga@25%", "h2o+mixsga", 0.25)]
    return specs


def build_shape(name: str, layers: int, max_len: int) -> LlamaForCausalLM:
    """A random-weight Llama of one of the real shapes, with ``layers`` layers."""
    cfg = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max_len, **SHAPES[name])
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def evicts(method: Method) -> bool:
    return isinstance(method, (Eviction, Stacked))


@dataclass
class Entry:
    """A built method on one context: model, prefilled cache, and its measurements."""

    spec: Spec
    method: Method
    params: dict
    model: torch.nn.Module
    prefilled: object
    result: dict
    base_config: object  # analytic bytes are always relative to the unconverted model
    seconds: list[float] = field(default_factory=list)


def new_cache(spec: Spec, method: Method, model, params: dict, max_len: int):
    """The cache a spec decodes with: the static GQA cache, mixSGA's with the chosen backend, or the method's."""
    if spec.cache == "static":
        return StaticViewCache(model.config, max_len)
    if spec.method == "mixsga":
        return MixSGACache(model.config, decode_backend=RUNTIME["mixsga_backend"])
    return method.new_cache(model, params)


def compile_sdpa(model) -> None:
    """Give ``model`` a ``torch.compile``d copy of transformers' SDPA attention (``--compile``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if "sdpa_compiled" not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register("sdpa_compiled", torch.compile(ALL_ATTENTION_FUNCTIONS["sdpa"], dynamic=True))
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register("sdpa_compiled", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation("sdpa_compiled")


def prepare(spec: Spec, base, ids: torch.Tensor, *, prefill_repeats: int, chunk: int, seed: int,
            device: torch.device, new_tokens: int = 0) -> Entry | dict:
    """Build ``spec`` on a copy of ``base`` and prefill ``ids[:, :-1]``; a dict with the reason when infeasible.

    For a batch > 1 the first row is prefilled and its cache repeated (see the module docstring).
    """
    method = get_method(spec.method)
    context = ids.shape[1] - 1
    kwargs = dict(spec.explicit)
    if isinstance(method, Eviction):
        kwargs["context_len"] = context
    try:
        params = method.params_for_budget(base.config, spec.budget, **kwargs)
    except ValueError as err:
        return {"label": spec.label, "method": spec.method, "budget": spec.budget, "infeasible": str(err)}
    torch.manual_seed(seed)
    model = base if spec.method == "base" else method.apply(copy.deepcopy(base), params).to(device).eval()
    if spec.cache == "static" and RUNTIME["compile"]:
        compile_sdpa(model)
    batch = ids.shape[0]
    prompt = ids[:1, :-1]
    mode = f"chunked({chunk})" if evicts(method) else "full"
    times, cache = [], None
    with torch.inference_mode():
        for _ in range(max(1, prefill_repeats)):
            cache = new_cache(spec, method, model, params, ids.shape[1] + new_tokens + 1)
            with PeakMemory(device) as mem, Timer(device) as timer:
                if evicts(method):
                    for start in range(0, context, chunk):
                        model(input_ids=prompt[:, start : start + chunk], past_key_values=cache, use_cache=True,
                              logits_to_keep=1)
                else:
                    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    cache = out.past_key_values
                    del out
            times.append(timer.seconds * 1000)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    dtype = next(model.parameters()).dtype
    result = {
        "label": spec.label,
        "method": spec.method,
        "budget": spec.budget,
        "params": params,
        "cache": spec.cache,
        "prefill_mode": mode,
        "prefill_batch": 1,
        "prefill_ms": summarise(times),
        "peak_memory": {"prefill": mem.as_dict()},
        "kv_bytes": {
            "after_prefill": int(method.live_bytes(cache)),
            "analytic_after_prefill": method.analytic_bytes_per_token(base.config, params, dtype) * context * batch,
            "base_after_prefill": full_kv_bytes_per_token(base.config, dtype) * context * batch,
        },
    }
    if hasattr(cache, "reserved_bytes"):
        result["kv_bytes"]["reserved_after_prefill"] = int(cache.reserved_bytes())
    return Entry(spec, method, params, model, cache, result, base.config)


def decode_once(entry: Entry, ids: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, object]:
    """Seconds for ``generate`` of ``new_tokens`` tokens from a copy of the prefilled cache, and that cache."""
    cache = copy.deepcopy(entry.prefilled)
    if getattr(entry.model, "mixsga_runtime", None) is not None:
        entry.model.mixsga_runtime.reset_stats()
    with PeakMemory(device) as mem, Timer(device) as timer:
        gen = generate_exactly(entry.model, ids, new_tokens, cache=cache, pad_token_id=0)
    entry.result["peak_memory"]["decode"] = mem.as_dict()
    return timer.seconds, gen.past_key_values


def time_interleaved(entries: list[Entry], ids: torch.Tensor, *, new_tokens: int, repeats: int,
                     device: torch.device) -> None:
    """Time the entries with the shared interleaving protocol (one warm-up each, alternating rounds)."""
    finals: dict[int, object] = {}

    def trial(entry: Entry):
        def run() -> float:
            seconds, finals[id(entry)] = decode_once(entry, ids, new_tokens, device)
            return seconds
        return run

    samples = interleaved({str(i): trial(e) for i, e in enumerate(entries)}, repeats=repeats, warmup=1)
    for i, entry in enumerate(entries):
        entry.seconds.extend(samples[str(i)])
    batch = ids.shape[0]
    tokens = ids.shape[1] - 1 + new_tokens
    for entry in entries:
        res = entry.result
        res["decode_tokens_per_s"] = summarise([new_tokens / s for s in entry.seconds])
        res["decode_tokens_per_s_all_sequences"] = summarise([batch * new_tokens / s for s in entry.seconds])
        cache = finals[id(entry)]
        dtype = next(entry.model.parameters()).dtype
        kv = res["kv_bytes"]
        kv["final"] = int(entry.method.live_bytes(cache))
        kv["analytic_final"] = entry.method.analytic_bytes_per_token(entry.base_config, entry.params, dtype) \
            * tokens * batch
        kv["base_final"] = full_kv_bytes_per_token(entry.base_config, dtype) * tokens * batch
        kv["fraction_of_base_final"] = kv["final"] / kv["base_final"]
        if hasattr(cache, "reserved_bytes"):
            kv["reserved_final"] = int(cache.reserved_bytes())
        if hasattr(cache, "metadata_bytes"):
            kv["eviction_metadata_final"] = int(cache.metadata_bytes())
        if hasattr(cache, "uncompressed_bytes"):  # eviction on mixSGA: its bound is keep x this
            kv["mixsga_bytes_same_routing_final"] = int(cache.uncompressed_bytes())
        if getattr(entry.model, "mixsga_runtime", None) is not None:
            from mixsga import routing_stats

            stats = routing_stats(entry.model)
            res["decode_routing_fractions"] = stats["decode_fractions"]


def release(entries: list[Entry]) -> None:
    for entry in entries:
        entry.prefilled = None
        entry.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def med(row: dict, key: str = "decode_tokens_per_s") -> float:
    return row[key]["p50"]


def run_group(base, specs, ids, *, new_tokens, repeats, prefill_repeats, chunk, seed, device) -> list[dict]:
    """Prepare ``specs`` together and time them interleaved."""
    entries, rows = [], []
    for spec in specs:
        log.info("  prepare %s (ctx=%d, batch=%d)", spec.label, ids.shape[1] - 1, ids.shape[0])
        got = prepare(spec, base, ids, prefill_repeats=prefill_repeats, chunk=chunk, seed=seed, device=device,
                      new_tokens=new_tokens)
        if isinstance(got, dict):
            log.info("  %s infeasible: %s", spec.label, got["infeasible"])
            rows.append(got)
        else:
            entries.append(got)
            rows.append(got.result)
    time_interleaved(entries, ids, new_tokens=new_tokens, repeats=repeats, device=device)
    release(entries)
    return rows


def context_ids(vocab: int, batch: int, context: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + context)
    return torch.randint(3, vocab, (batch, context + 1), generator=gen).to(device)


def repeat_entry(entry: Entry, batch: int) -> Entry:
    """The entry at ``batch``: its batch-1 prefilled cache repeated ``batch`` times (see the module docstring)."""
    cache = copy.deepcopy(entry.prefilled)
    cache.batch_repeat_interleave(batch)
    result = copy.deepcopy(entry.result)
    kv = result["kv_bytes"]
    kv["after_prefill"] = int(entry.method.live_bytes(cache))
    kv["analytic_after_prefill"] *= batch
    kv["base_after_prefill"] *= batch
    if hasattr(cache, "reserved_bytes"):
        kv["reserved_after_prefill"] = int(cache.reserved_bytes())
    return Entry(entry.spec, entry.method, entry.params, entry.model, cache, result, entry.base_config)


def ratios(rows: list[dict]) -> dict:
    """The headline ratios of one (model, batch, context) group."""
    by = {r["label"]: r for r in rows}
    mix, gqa, full, static = by["mixsga-3:1:6@50%"], by["gqa@50%"], by["base"], by["gqa-static@50%"]
    fastest = max(med(gqa), med(static))
    return {
        "mixsga_vs_gqa_decode_tps": med(mix) / med(gqa),
        "mixsga_vs_gqa_static_decode_tps": med(mix) / med(static),
        "mixsga_vs_fastest_gqa_decode_tps": med(mix) / fastest,
        "gqa_static_vs_gqa_decode_tps": med(static) / med(gqa),
        "mixsga_vs_base_decode_tps": med(mix) / med(full),
        "gqa_vs_base_decode_tps": med(gqa) / med(full),
        "mixsga_vs_gqa_prefill_ms": med(mix, "prefill_ms") / med(gqa, "prefill_ms"),
        "mixsga_kv_fraction_final": mix["kv_bytes"]["fraction_of_base_final"],
        "gqa_kv_fraction_final": gqa["kv_bytes"]["fraction_of_base_final"],
    }


def headline(label: str, base, contexts, batches, opts: dict) -> list[dict]:
    """Base / GQA (two ways) / mixSGA on one model at every context and batch, interleaved.

    Each context is prefilled once per method (batch 1); larger batches repeat that cache.
    Returns one block per batch size.
    """
    blocks = {batch: {"model": label, "batch": batch, "contexts": {}} for batch in batches}
    prep = {k: opts[k] for k in ("prefill_repeats", "chunk", "seed", "device", "new_tokens")}
    for ctx in contexts:
        ids = context_ids(base.config.vocab_size, 1, ctx, opts["seed"], opts["device"])
        entries = []
        for spec in HEADLINE:
            log.info("%s ctx=%d: prepare %s", label, ctx, spec.label)
            got = prepare(spec, base, ids, **prep)
            if isinstance(got, dict):
                raise RuntimeError(f"{spec.label} infeasible on {label}: {got['infeasible']}")
            entries.append(got)
        for batch in batches:
            log.info("%s ctx=%d batch=%d: decode", label, ctx, batch)
            group = entries if batch == 1 else [repeat_entry(e, batch) for e in entries]
            time_interleaved(group, ids.repeat(batch, 1), new_tokens=opts["new_tokens"], repeats=opts["repeats"],
                             device=opts["device"])
            rows = [e.result for e in group]
            blocks[batch]["contexts"][str(ctx)] = {"rows": rows, "ratios": ratios(rows)}
            if batch != 1:
                release(group)
        release(entries)
    return [blocks[b] for b in batches]


def all_methods(label: str, base, context: int, opts: dict) -> dict:
    """Every method on one model and context, each timed interleaved with the base model (prefilled once)."""
    ids = context_ids(base.config.vocab_size, 1, context, opts["seed"], opts["device"])
    prep = {k: opts[k] for k in ("prefill_repeats", "chunk", "seed", "device")}
    base_spec, *others = all_specs(base.config)
    reference = prepare(base_spec, base, ids, **prep)
    rows = []
    for spec in others:
        log.info("%s ctx=%d all-methods: %s vs base", label, context, spec.label)
        entry = prepare(spec, base, ids, **prep)
        if isinstance(entry, dict):
            log.info("  %s infeasible: %s", spec.label, entry["infeasible"])
            rows.append(entry)
            continue
        reference.seconds = []
        time_interleaved([reference, entry], ids, new_tokens=opts["new_tokens"], repeats=opts["repeats"],
                         device=opts["device"])
        entry.result["base_decode_tokens_per_s"] = reference.result["decode_tokens_per_s"]
        entry.result["vs_base_decode_tps"] = med(entry.result) / med(reference.result)
        rows.append(entry.result)
        release([entry])
    release([reference])
    return {"model": label, "context": context, "batch": 1, "base": reference.result, "rows": rows}


def zoo_models(args, dtype: torch.dtype, device: torch.device):
    """``(label, model)`` for each zoo family: the offline model when present, else random weights."""
    from harness.models.zoo import build_config, get_family

    families = [f for f in args.zoo_families.split(",") if f]
    zoo = Path(args.zoo)
    for family in families:
        path = zoo / family / "base"
        if path.is_dir():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            label = f"zoo:{family} (pretrained here)"
        else:
            config = build_config(family, "tiny", VocabOnly(args.zoo_vocab, bos_token_id=2, eos_token_id=1))
            if get_family(family).attn_implementation is None:
                config._attn_implementation = "sdpa"
            torch.manual_seed(args.seed)
            model = AutoModelForCausalLM.from_config(config)
            label = f"zoo:{family} (tiny architecture, random weights)"
        yield label, model.to(device=device, dtype=dtype).eval()


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``), for the record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def parse_target(text: str, parts: int, name: str) -> tuple | None:
    """``SHAPE:CONTEXT[:BATCH]`` -> tuple, ``""`` -> None."""
    if not text:
        return None
    fields = text.split(":")
    if len(fields) != parts or fields[0] not in SHAPES:
        raise ValueError(f"--{name} wants {'SHAPE:CONTEXT:BATCH' if parts == 3 else 'SHAPE:CONTEXT'} with SHAPE in "
                         f"{', '.join(SHAPES)}; got {text!r}")
    return (fields[0], *[int(f) for f in fields[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3.2-1b,tinyllama-1.1b",
                        help=f"headline: comma-separated real shapes with random weights; known: {', '.join(SHAPES)}")
    parser.add_argument("--layers", type=int, default=2, help="layers per shaped model (default 2)")
    parser.add_argument("--zoo", default="work/models",
                        help="directory of offline zoo models ({family}/base); when absent, the zoo's tiny "
                             "architectures with random weights (--zoo-vocab tokens) are benchmarked instead")
    parser.add_argument("--zoo-families", default="gemma2,llama3,opt,tinyllama",
                        help="zoo families to benchmark ('' skips the zoo)")
    parser.add_argument("--zoo-vocab", type=int, default=8192, help="vocabulary of random-weight zoo models")
    parser.add_argument("--zoo-contexts", default="512,2048", help="zoo context lengths (those that fit)")
    parser.add_argument("--contexts", default="512,2048,8192", help="headline context lengths")
    parser.add_argument("--batches", default="1,8", help="headline batch sizes")
    parser.add_argument("--mixsga-backend", default="auto", choices=("auto", "torch", "compiled", "triton"),
                        help="mixSGA decode attention (auto: Triton kernel on CUDA when installed, else torch)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile mixSGA's decode attention and the static GQA's SDPA alike")
    parser.add_argument("--all-methods", default="tinyllama-1.1b:2048",
                        help="SHAPE:CONTEXT for the every-method table ('' skips it)")
    parser.add_argument("--batched", default="",
                        help="SHAPE:CONTEXT:BATCH for the batched headline table ('' skips it)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per timed decode run")
    parser.add_argument("--repeats", type=int, default=5, help="timed decode repeats per method (after a warm-up)")
    parser.add_argument("--prefill-repeats", type=int, default=1, help="timed prefill repeats")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk for eviction methods")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (bfloat16 on GPU)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output JSON path, e.g. results/bench/decode-cpu.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        all_target = parse_target(args.all_methods, 2, "all-methods")
        batched_target = parse_target(args.batched, 3, "batched")
    except ValueError as err:
        parser.error(str(err))
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if args.repeats < 1 or args.new_tokens < 1:
        parser.error("--repeats and --new-tokens must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    batches = [int(b) for b in args.batches.split(",") if b]
    zoo_contexts = [int(c) for c in args.zoo_contexts.split(",") if c]
    if not batches or min(batches) < 1:
        parser.error("--batches must list batch sizes >= 1")
    RUNTIME["mixsga_backend"] = "compiled" if args.compile else args.mixsga_backend
    RUNTIME["compile"] = args.compile
    opts = dict(new_tokens=args.new_tokens, repeats=args.repeats, prefill_repeats=args.prefill_repeats,
                chunk=args.prefill_chunk, seed=args.seed, device=device)
    load_start, t0 = load_average(), time.perf_counter()

    def shaped(name: str, max_ctx: int):
        torch.manual_seed(args.seed)
        model = build_shape(name, args.layers, max_ctx + args.new_tokens + 8).to(device=device, dtype=dtype)
        return model, f"{name} ({args.layers} layers, random weights)"

    tables: dict[str, list] = {"headline": [], "all_methods": [], "batched": []}
    for shape in shapes:
        base, label = shaped(shape, max(contexts))
        tables["headline"].extend(headline(label, base, contexts, batches, opts))
        del base
        gc.collect()
    for label, base in zoo_models(args, dtype, device):
        usable = [c for c in zoo_contexts if c + args.new_tokens + 1 < base.config.max_position_embeddings]
        if not usable:
            log.warning("skipping %s: no context fits its %d positions", label, base.config.max_position_embeddings)
            continue
        tables["headline"].extend(headline(label, base, usable, batches, opts))
        del base
        gc.collect()
    if all_target:
        shape, ctx = all_target
        base, label = shaped(shape, ctx)
        tables["all_methods"].append(all_methods(label, base, ctx, opts))
        del base
        gc.collect()
    if batched_target:
        shape, ctx, batch = batched_target
        base, label = shaped(shape, ctx)
        tables["batched"].extend(headline(label, base, [ctx], [batch], opts))
        del base
        gc.collect()

    payload = {
        "benchmark": "decode",
        "protocol": {
            "prefill": "one forward over context[:-1] (logits_to_keep=1); eviction methods in chunks",
            "decode": "generate_exactly(new_tokens, greedy) from a deep copy of the prefilled cache; tokens/s per "
                      "sequence = new_tokens / seconds (all_sequences: x batch); methods of one group interleaved "
                      "(harness.measurement.measure.interleaved: one warm-up each, alternating order); ratios are "
                      "of medians; batch > 1 caches are the batch-1 prefill repeated (batch_repeat_interleave)",
            "references": "gqa@50%: transformers SDPA + DynamicCache; gqa-static@50%: SDPA over a preallocated "
                          "cache (benchmarks.fast_gqa.StaticViewCache); fastest GQA = the faster of the two",
            "mixsga_backend": RUNTIME["mixsga_backend"], "compile": RUNTIME["compile"],
            "kv_bytes": "method.live_bytes(cache) (the filled K/V, mixSGA's expert index included) next to "
                        "method.analytic_bytes_per_token x tokens; base = full K/V; reserved_* = the preallocated "
                        "buffers (mixSGA, static GQA)",
            "new_tokens": args.new_tokens, "repeats": args.repeats, "prefill_repeats": args.prefill_repeats,
            "prefill_chunk": args.prefill_chunk, "dtype": args.dtype, "layers": args.layers, "seed": args.seed,
            "command": " ".join(["python -m benchmarks.decode"] + (argv if argv is not None else sys.argv[1:])),
        },
        "environment": {**environment(device), "load_average_start": load_start, "load_average_end": load_average(),
                        "wall_seconds": round(time.perf_counter() - t0, 1)},
        **tables,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(out)
    print(summary(payload))
    return 0


def summary(payload: dict) -> str:
    """A plain-text digest of the headline ratios and the every-method table."""
    lines = []
    for table in ("headline", "batched"):
        for block in payload[table]:
            for ctx, row in block["contexts"].items():
                r = row["ratios"]
                lines.append(f"{table:8s} {block['model'][:40]:<40} b={block['batch']} ctx={ctx:>5}  "
                             f"mix/gqa={r['mixsga_vs_gqa_decode_tps']:.3f} "
                             f"mix/fastest={r['mixsga_vs_fastest_gqa_decode_tps']:.3f} "
                             f"mix/base={r['mixsga_vs_base_decode_tps']:.3f}"
                             f" gqa/base={r['gqa_vs_base_decode_tps']:.3f} kv mix={r['mixsga_kv_fraction_final']:.3f}"
                             f" gqa={r['gqa_kv_fraction_final']:.3f}")
    for block in payload["all_methods"]:
        for row in block["rows"]:
            if "infeasible" in row:
                lines.append(f"all      {row['label']:<22} infeasible: {row['infeasible'][:80]}")
            else:
                lines.append(f"all      {row['label']:<22} tok/s={med(row):8.2f} vs base={row['vs_base_decode_tps']:.3f}"
                             f" kv={row['kv_bytes']['fraction_of_base_final']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

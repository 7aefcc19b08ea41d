"""Tables 9 and 10 of the paper: parameters, KV bytes per token and decode throughput, GQA vs mixSGA.

Both methods at the 50 % KV budget, built through the method registry:
GQA halves the K/V heads (mean-pooled projections); mixSGA 3:1:6 keeps the full
shared K/V projections and adds one router (D x E weights + E biases) per layer.

* **Parameters** of the paper's models (OPT-125m, Llama 3.2-1B, Gemma 2-2B, and the
  Llama 3.2-3B / 3.1-8B of Table 10) are counted on configs built from their public
  hyper-parameters, instantiated on the ``meta`` device (no weights allocated), then
  converted by the registry exactly as a real model would be. The GQA / mixSGA
  difference is split into the K/V projection weights mixSGA keeps and the routers,
  each counted on the converted modules and checked against its closed form.
* **KV bytes per token** come from the registry's analytic ledger at the chosen dtype:
  GQA's grouped K/V; mixSGA's grouped K/V plus its per-layer expert index, both as our
  cache stores it (one uint8) and as the paper counts it (packed, 2 bits for 3 experts).
* **Decode throughput** (tokens/s, batch 1, greedy, a fixed number of new tokens) is
  measured with ``harness.measurement.measure.time_generation`` (decode = the N - 1 cached
  steps of generate(N), timed inside it): one warm-up per method, then GQA and mixSGA timed
  alternately, repeat by repeat, in one process, so load drift hits both alike.
  Models: the offline zoo checkpoints (``{zoo}/{family}/base``) when present, else
  random-weight ``tiny`` configs of ``harness.models.zoo``; optionally the paper-sized
  configs with random weights (a GPU job). Weights do not change the cost of a
  decode step, except that mixSGA's decode cost depends on where its (here
  untrained) router sends tokens; the realised decode expert fractions are recorded.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, OPTConfig, PretrainedConfig

from harness.measurement.generation import generate_exactly
from harness.measurement.measure import interleaved, summarise, time_generation
from harness.methods import get_method
from harness.models.zoo import FAMILIES, build_config, count_parameters
from mixsga.budget import full_kv_bytes_per_token, kv_shape, mixsga_kv_bytes_per_token

METHODS = ("gqa", "mixsga")
ROUTER_MARK = "mixsga_router"

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

#: Public hyper-parameters of the paper's checkpoints (their config.json on the hub).
PAPER_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "opt-125m": (OPTConfig, dict(
        hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=50272,
        max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True, enable_bias=True,
        activation_function="relu", tie_word_embeddings=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
    "llama3.2-1b": (LlamaConfig, dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001)),
    "llama3.2-3b": (LlamaConfig, dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters=_LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001)),
    "llama3.1-8b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001)),
    "gemma2-2b": (Gemma2Config, dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        tie_word_embeddings=True, attn_implementation="eager", pad_token_id=0, bos_token_id=2, eos_token_id=1)),
}

#: The models of the paper's Table 9 (Table 10 times the three Llamas).
TABLE9_MODELS = ("opt-125m", "llama3.2-1b", "gemma2-2b")
TABLE10_MODELS = ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b")

#: What the paper reports (Appendix C.1), for side-by-side display; never used to compute anything.
PAPER_REPORTED = {
    "table9": {
        "params": {"gqa": {"opt-125m": "118m", "llama3.2-1b": "1.22b", "gemma2-2b": "2.55b"},
                   "mixsga": {"opt-125m": "125m", "llama3.2-1b": "1.24b", "gemma2-2b": "2.61b"}},
        "kv_bytes_per_token": {"gqa": {"opt-125m": 36864, "llama3.2-1b": 32768, "gemma2-2b": 106496},
                               "mixsga": {"opt-125m": 36867, "llama3.2-1b": 32772, "gemma2-2b": 106502}},
    },
    "table10_decode_tokens_per_s": {"gqa": {"llama3.2-1b": 59.75, "llama3.2-3b": 40.16, "llama3.1-8b": 26.77},
                                    "mixsga": {"llama3.2-1b": 57.28, "llama3.2-3b": 38.65, "llama3.1-8b": 25.92},
                                    "protocol": "batch 1, 10,000 generated tokens, mean of 5 trials, GPU unstated"},
}


def paper_config(name: str) -> PretrainedConfig:
    """A fresh config of one of the paper's models (``PAPER_CONFIGS``)."""
    if name not in PAPER_CONFIGS:
        raise ValueError(f"unknown paper model {name!r}; known: {sorted(PAPER_CONFIGS)}")
    cls, kwargs = PAPER_CONFIGS[name]
    return cls(**copy.deepcopy(kwargs))


def build_method(config: PretrainedConfig, method: str, *, budget: float = 0.5, device: str | torch.device = "meta",
                 dtype: torch.dtype = torch.float32, seed: int = 0, base=None) -> tuple[torch.nn.Module, dict]:
    """``(model, params)``: ``method`` at ``budget`` on a deep copy of ``base``, or on a fresh model of ``config``.

    A fresh model is built on ``device`` with random weights; ``"meta"`` allocates none
    (parameter counting only).
    """
    entry = get_method(method)
    params = entry.params_for_budget(config, budget)
    torch.manual_seed(seed)
    if base is not None:
        model = copy.deepcopy(base)
    else:
        with torch.device(device):
            # The registry converts in place and edits the config: each model gets its own copy.
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    return entry.apply(model, params).eval(), params


def _is_kv_projection(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ("k_proj", "v_proj")


def parameter_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Distinct parameters in total, in the K/V projections (weights and biases), and in mixSGA routers."""
    unique = {id(p): (n, p) for n, p in model.named_parameters(remove_duplicate=True)}.values()
    return {
        "total": count_parameters(model),
        "kv_projections": sum(p.numel() for n, p in unique if _is_kv_projection(n)),
        "routers": sum(p.numel() for n, p in unique if f".{ROUTER_MARK}." in n),
    }


def parameter_difference(config: PretrainedConfig, *, budget: float = 0.5) -> dict[str, Any]:
    """GQA vs mixSGA parameters of ``config`` (meta device) and the difference, explained.

    ``kept_kv_weights`` = the K/V projection parameters mixSGA has beyond GQA's;
    ``routers`` = mixSGA's router parameters; ``explained`` is True when the two add up
    to the whole difference. The ``*_closed_form`` fields recompute both from the config:
    ``L * 2 * (H_kv - H_gqa) * d * (D + bias)`` and ``L * (D * E + E)``.
    """
    counts, params = {}, {}
    for method in METHODS:
        model, params[method] = build_method(config, method, budget=budget)
        counts[method] = parameter_breakdown(model)
        del model
    gqa, mix = counts["gqa"], counts["mixsga"]
    shape = kv_shape(config)
    layers, hidden = shape.num_layers, int(config.hidden_size)
    dropped_heads = shape.num_kv_heads - int(params["gqa"]["num_key_value_heads"])
    bias = 1 if _has_kv_bias(config) else 0
    experts = len(params["mixsga"]["ratios"])
    difference = mix["total"] - gqa["total"]
    kept = mix["kv_projections"] - gqa["kv_projections"]
    return {
        "gqa": gqa["total"],
        "mixsga": mix["total"],
        "difference": difference,
        "kept_kv_weights": kept,
        "routers": mix["routers"],
        "explained": kept + mix["routers"] == difference,
        "kept_kv_weights_closed_form": layers * 2 * dropped_heads * shape.head_dim * (hidden + bias),
        "routers_closed_form": layers * (hidden * experts + experts),
        "gqa_params": params["gqa"],
        "mixsga_params": params["mixsga"],
    }


def _has_kv_bias(config: PretrainedConfig) -> bool:
    if config.model_type == "opt":
        return bool(getattr(config, "enable_bias", True))
    return bool(getattr(config, "attention_bias", False))


def kv_bytes(config: PretrainedConfig, method: str, params: dict, dtype: torch.dtype | str = torch.float32) -> dict:
    """Stored K/V bytes per token: the registry's (uint8 index for mixSGA) and the paper's (packed index) figures."""
    ours = get_method(method).analytic_bytes_per_token(config, params, dtype)
    paper = ours
    if method == "mixsga":
        paper = mixsga_kv_bytes_per_token(config, params["ratios"], params["group_sizes"], dtype, index_bits=None)
    return {"kv_bytes_per_token": ours, "kv_bytes_per_token_paper_index": paper,
            "base_kv_bytes_per_token": float(full_kv_bytes_per_token(config, dtype))}


def _generator(model, method: str, params: dict, prompt: torch.Tensor):
    """``generate(n, **kwargs)``: exactly ``n`` greedy tokens from ``prompt`` through a fresh cache of ``method``."""
    entry = get_method(method)

    def generate(n: int, **kwargs):
        return generate_exactly(model, prompt, n, cache=entry.new_cache(model, params), **kwargs)

    return generate


def time_decode(
    models: dict[str, tuple[torch.nn.Module, dict]],
    prompt: torch.Tensor,
    *,
    new_tokens: int,
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Decode tokens/s and prefill ms of each ``{method: (model, params)}``, timed alternately.

    Each sample is one ``time_generation`` run of one method (prefill = generate(1), decode = the
    cached steps of generate(new_tokens), timed inside it), interleaved across methods by
    ``harness.measurement.measure.interleaved``. Routing fractions count the warm-up and
    timed generations alike: every one decodes the same prompt greedily, so they route alike.
    """
    if repeats < 5:
        raise ValueError(f"repeats must be >= 5 for a median worth reporting, got {repeats!r}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2, got {new_tokens!r}")
    gens = {m: _generator(model, m, params, prompt) for m, (model, params) in models.items()}
    for model, _ in models.values():
        if getattr(model, "mixsga_runtime", None) is not None:
            model.mixsga_runtime.reset_stats()
    trials = {m: (lambda gen=gen: time_generation(gen, new_tokens=new_tokens, device=device, repeats=1, warmup=0))
              for m, gen in gens.items()}
    samples = interleaved(trials, repeats=repeats, warmup=warmup)
    out = {}
    for m, (model, _) in models.items():
        out[m] = {"decode_tokens_per_s": summarise([s["decode_tokens_per_s"]["mean"] for s in samples[m]]),
                  "prefill_ms": summarise([s["prefill_ms"]["mean"] for s in samples[m]])}
        if getattr(model, "mixsga_runtime", None) is not None:
            out[m]["decode_routing_fractions"] = model.mixsga_runtime.routing_stats()["decode_fractions"]
    return out


class VocabOnly:
    """Stands in for a tokenizer where only the vocabulary size and special ids matter (random-weight timing models).

    What ``harness.models.zoo.build_config`` reads from a tokenizer; the benchmarks use it too.
    """

    def __init__(self, size: int = 4096, *, bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0):
        self.size = size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id

    def __len__(self) -> int:
        return self.size


def timing_models(zoo: str | os.PathLike | None, families: Sequence[str],
                  checkpoints: Mapping[str, str] | None = None) -> Iterator[tuple[str, str, Any]]:
    """``(label, source, base_model)`` to time, one loaded at a time: zoo checkpoints when present, else
    random ``tiny`` configs, for ``families``; then each of ``checkpoints`` (name -> hub name or local
    directory: a profile's own models)."""
    from harness.models.zoo import load_base_model

    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
        path = Path(zoo) / family / "base" if zoo is not None else None
        if path is not None and (path / "config.json").is_file():
            model, _ = load_base_model(path, dtype=torch.float32, device="cpu")
            yield f"zoo:{family}", str(path), model
        else:
            torch.manual_seed(0)
            config = build_config(family, "tiny", VocabOnly())
            yield (f"tiny:{family}", "random weights (harness.models.zoo tiny config)",
                   AutoModelForCausalLM.from_config(config).eval())
    for name, source in (checkpoints or {}).items():
        model, _ = load_base_model(source, dtype=torch.float32, device="cpu")
        yield f"checkpoint:{name}", str(source), model


def _device_label(device: str | torch.device) -> str:
    from harness.orchestration.provenance import device_info

    info = device_info(str(device))
    return f"{info['type']}: {info['name']}"


def _row(model: str, source: str, method: str, params: dict, n_params: int, config, dtype, timing: dict | None,
         device: str | None) -> dict:
    return {
        "model": model,
        "source": source,
        "method": method,
        "method_params": params,
        "params": n_params,
        **kv_bytes(config, method, params, dtype),
        "decode_tokens_per_s": None if timing is None else timing["decode_tokens_per_s"],
        "prefill_ms": None if timing is None else timing["prefill_ms"],
        "decode_routing_fractions": None if timing is None else timing.get("decode_routing_fractions"),
        "device": device,
    }


def _comparison(model: str, timings: dict) -> dict:
    gqa, mix = timings["gqa"]["decode_tokens_per_s"]["p50"], timings["mixsga"]["decode_tokens_per_s"]["p50"]
    return {"model": model, "gqa_p50": gqa, "mixsga_p50": mix, "mixsga_vs_gqa": mix / gqa,
            "overhead_pct": 100.0 * (1.0 - mix / gqa)}


def overheads(
    *,
    zoo: str | os.PathLike | None = "work/models",
    families: Sequence[str] = ("llama3", "tinyllama", "opt", "gemma2"),
    paper_models: Sequence[str] = tuple(PAPER_CONFIGS),
    time_paper_models: Sequence[str] = (),
    checkpoints: Mapping[str, str] | None = None,
    budget: float = 0.5,
    dtype: str = "float32",
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    """The JSON-ready Tables 9 / 10 result.

    ``rows`` has one entry per (model, method): the paper's configs (parameters and
    KV bytes; decode timing only for ``time_paper_models``, random weights, meant for
    a GPU), the zoo / tiny models of ``families`` and the ``checkpoints`` (name -> hub name or
    local directory: the profile's own models) (parameters, KV bytes, timing).
    """
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    unknown = sorted(set(time_paper_models) - set(paper_models))
    if unknown:
        raise ValueError(f"time_paper_models {unknown} are not among paper_models {list(paper_models)}")
    if prompt_tokens < 1:
        raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens!r}")
    bad = sorted(set(families) - set(FAMILIES))
    if bad:
        raise ValueError(f"unknown family {bad}; known: {sorted(FAMILIES)}")
    for name in paper_models:
        paper_config(name)  # unknown names fail before anything is built
    t0 = time.perf_counter()
    device_label = _device_label(device)
    rows, differences, comparisons = [], [], []

    def prompt_for(config) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(3, int(config.vocab_size), (1, prompt_tokens), generator=gen).to(device)

    def timed(label: str, source: str, config, built: dict[str, tuple]) -> None:
        timings = time_decode(built, prompt_for(config), new_tokens=new_tokens, repeats=repeats, warmup=warmup,
                              device=device)
        for m, (model, params) in built.items():
            rows.append(_row(label, source, m, params, count_parameters(model), config, torch_dtype, timings[m],
                             device_label))
        comparisons.append(_comparison(label, timings))

    for name in paper_models:
        config = paper_config(name)
        diff = parameter_difference(config, budget=budget)
        differences.append({"model": name, "in_paper_table9": name in TABLE9_MODELS, **diff})
        if name in time_paper_models:
            built = {m: build_method(config, m, budget=budget, device=device, dtype=torch_dtype, seed=seed)
                     for m in METHODS}
            timed(name, "paper config, random weights", config, built)
            del built
        else:
            for m in METHODS:
                rows.append(_row(name, "paper config, meta device", m, diff[f"{m}_params"], diff[m], config,
                                 torch_dtype, None, None))
    for label, source, base in timing_models(zoo, families, checkpoints):
        base = base.to(device=device, dtype=torch_dtype)
        config = copy.deepcopy(base.config)
        built = {m: build_method(config, m, budget=budget, seed=seed, base=base) for m in METHODS}
        timed(label, source, config, built)
        del built, base
    return {
        "table": "table9_overheads",
        "budget": budget,
        "dtype": dtype,
        "rows": rows,
        "parameter_differences": differences,
        "throughput": comparisons,
        "paper_reported": PAPER_REPORTED,
        "protocol": {
            "params": "distinct parameters of the registry-converted model (tied weights once); paper configs on "
                      "the meta device",
            "kv_bytes_per_token": "registry analytic bytes at dtype; mixSGA with a uint8 expert index per layer "
                                  "(our cache); kv_bytes_per_token_paper_index: packed 2-bit index (the paper)",
            "decode_tokens_per_s": "harness.measurement.measure.time_generation per repeat: (new_tokens - 1) / (seconds from "
                                   "the first token's logits to the last's inside generate(N)); batch 1, greedy, random prompt; one warm-up per method, then GQA "
                                   "and mixSGA alternated for each repeat, order flipped every repeat; ratios of "
                                   "medians",
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
            "seed": seed,
        },
        "environment": _environment(device, time.perf_counter() - t0),
    }


def _environment(device: str, seconds: float) -> dict:
    from harness.orchestration.provenance import device_info, package_versions

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"device": device_info(device), "packages": package_versions(), "load_average": load,
            "wall_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from harness.atomic import write_json_atomic

    parser = argparse.ArgumentParser(prog="python -m harness.measurement.overheads", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="work/models", help="offline zoo directory ({family}/base); '' for none")
    parser.add_argument("--families", default="llama3,tinyllama,opt,gemma2", help="zoo / tiny families to time")
    parser.add_argument("--paper-models", default=",".join(PAPER_CONFIGS), help="paper configs to count")
    parser.add_argument("--time-paper-models", default="", help="paper configs to time with random weights (GPU)")
    parser.add_argument("--checkpoints", default="",
                        help="name=source,... checkpoints to time (hub names or local directories)")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output JSON path")
    args = parser.parse_args(argv)
    from harness.allocator import tune_allocator

    tune_allocator()  # as every harness job (harness.allocator)
    split = lambda text: tuple(s for s in text.split(",") if s)  # noqa: E731
    result = overheads(zoo=args.zoo or None, families=split(args.families), paper_models=split(args.paper_models),
                       time_paper_models=split(args.time_paper_models),
                       checkpoints=dict(item.split("=", 1) for item in split(args.checkpoints)),
                       budget=args.budget, dtype=args.dtype,
                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                       warmup=args.warmup, device=args.device, seed=args.seed)
    write_json_atomic(args.out, result)
    for row in result["rows"]:
        tps = row["decode_tokens_per_s"]
        print(f"{row['model']:<14} {row['method']:<7} params={row['params']:>13,} "
              f"kv/token={row['kv_bytes_per_token']:>10,.1f}"
              f" (paper index {row['kv_bytes_per_token_paper_index']:,.1f})"
              + (f" decode p50={tps['p50']:.1f} tok/s" if tps else ""))
    for c in result["throughput"]:
        print(f"{c['model']:<14} mixSGA / GQA decode = {c['mixsga_vs_gqa']:.3f} (overhead {c['overhead_pct']:.1f} %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

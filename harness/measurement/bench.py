"""The cost benchmark of one model: every method of the ``main`` grid timed against the base, in one process.

``python -m harness.measurement.bench --spec JSON --out PATH`` builds every listed run of one
model (its trained checkpoint through ``Method.load_trained``, as the run job builds it:
``harness.orchestration.run.build``) and times each method *in lockstep* with the base model
(:func:`paired_rounds`): per round, the methods' generations run in groups of ``perf.group``,
each group beside one fresh base generation, prefill after prefill, then one decode step of
each in turn (``harness.measurement.generation.lockstep``); with ``perf.bracket`` a base prefill
alone closes each group's prefills, and prefill ratios are to the two base prefills interpolated
at the method's place. One sample is one generation of ``new_tokens``
(``generate_exactly``) timed from inside by a step clock that runs only while its generation
holds the turn: prefill = to the first token's logits, decode tokens/s = the ``new_tokens - 1``
tokens produced from the cache over their summed step times. Why lockstep: on a shared 2-core
VM the speed of a core wanders by up to 2x over tens of milliseconds (measured: one model's
decode steps run at 3 ms, then 7 ms), so two methods timed even one generation apart differ
by 20-35 %; steps timed milliseconds apart see the same machine.

The output reports, per method and context, the raw summaries with their coefficients of
variation and the ratios to the base sample *of the same lockstep group*: the median of the per-round
ratios, their CV and the relative standard error of their mean (``se_rel``). Peak memory per method is its
weights plus, on a GPU, the allocator peak above the phase's start; on a CPU, where the process'
memory is shared by every model loaded here, plus the live K/V bytes of the decode cache
(``memory_source`` says which). The workflow runs this job alone (``workflow/rules/runs.smk``,
rule ``perf_bench``). Fields: ``results/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from harness.allocator import allocator_settings, tune_allocator
from harness.atomic import write_json_atomic
from harness.measurement.footprint import prompt_ids
from harness.measurement.generation import StepClock, generate_exactly
from harness.measurement.measure import summarise

#: Version of the output layout (bump on incompatible changes; analysis checks it).
SCHEMA = 1
#: The method every ratio is taken against.
REFERENCE = "base"
#: The key of the bracketing reference prefill in a lockstep group (no run id looks like it).
_BRACKET = "<reference prefill>"
#: Tokens a warm-up generation produces (its prefill and cached steps run each code path once; untimed).
WARMUP_TOKENS = 4


def log(message: str) -> None:
    """Progress on stderr (the job's log)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def cv(samples: Sequence[float]) -> float:
    """Coefficient of variation (sample standard deviation over mean); 0 for one sample or a zero mean."""
    if len(samples) < 2:
        return 0.0
    mean = statistics.fmean(samples)
    return statistics.stdev(samples) / mean if mean else 0.0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def resolve_contexts(lengths: Sequence[int | str], *, window: int, positions: int | None, new_tokens: int) -> list[int]:
    """The context lengths to time: integers as given; ``"window"`` is the model's longest configured
    window, cut so that it and the generated tokens fit the model's positions. Sorted, distinct."""
    out = set()
    for n in lengths:
        if n == "window":
            n = window if positions is None else min(window, positions - new_tokens)
        out.add(int(n))
    return sorted(out)


def time_one(model, method, params, prompt: torch.Tensor, new_tokens: int, device: str,
             clock: StepClock | None = None) -> dict[str, float]:
    """One sample, one generation of ``new_tokens``: prefill ms (to the first token's logits), decode tokens/s
    (the ``new_tokens - 1`` cached steps after it, :class:`~harness.measurement.generation.StepClock`), memory.

    ``clock``: the clock to time with (a :class:`~harness.measurement.generation.LockstepClock` in
    :func:`paired_rounds`); a fresh ``StepClock`` by default.
    """
    dev = torch.device(device)
    cache = method.new_cache(model, params)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    clock = (clock or StepClock(dev)).begin()
    out = generate_exactly(model, prompt, new_tokens, cache=cache, logits_processor=clock.processors())
    sample = {"prefill_ms": clock.first_token_seconds * 1000.0,
              "kv_live_bytes": float(method.live_bytes(cache if cache is not None else out.past_key_values))}
    if new_tokens > 1:  # one token: a prefill alone (the bracketing reference prefill of paired_rounds)
        sample["decode_tokens_per_s"] = (new_tokens - 1) / clock.decode_seconds
    if dev.type == "cuda":
        sample["phase_peak_bytes"] = float(torch.cuda.max_memory_allocated(dev) - start)
    return sample


def paired_rounds(trials: Mapping[str, Callable[[StepClock | None], dict[str, float]]], *, repeats: int,
                  warmup: int = 1, device: str = "cpu", group: int = 1,
                  bracket: Callable[[StepClock], dict[str, float]] | None = None,
                  ) -> dict[str, list[tuple[dict[str, float], dict[str, float]]]]:
    """Every method timed in lockstep with the reference: ``{name: [(sample, reference sample), ...]}``.

    Each round splits the other methods into groups of ``group`` and runs each group beside one
    fresh reference generation through :func:`~harness.measurement.generation.lockstep`: prefills
    one after the other, then one decode step of each in turn, so a ratio compares steps taken
    milliseconds apart. On this kind of machine the speed of a core wanders by 2x over tens of
    milliseconds, which no round-level interleaving cancels. ``group`` > 1 shares one reference
    generation among that many methods (fewer reference generations, at ``group + 1`` steps a
    turn instead of 2). Methods are visited in alternating order each round, and whether the
    reference prefills first or last alternates too. ``trials[name](clock)`` returns one sample
    (``time_one``; ``clock`` None = a lone generation, as the warm-up runs). The reference's own
    list holds one (sample, sample) entry per group.

    ``bracket``: a reference prefill alone (``time_one`` of one token), run at the other end of
    each group from the reference generation, so that the group's prefills sit between two
    reference prefills. Each method's reference ``prefill_ms`` is then the linear interpolation
    of the two at the method's place in the group: a prefill is one long call that lockstep
    cannot interleave, and the machine's drift between the first and the last prefill of a group
    would otherwise fall on the methods by their place.
    """
    from harness.measurement.generation import lockstep

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group!r}")
    if REFERENCE not in trials:
        raise ValueError(f"the benchmark needs the {REFERENCE!r} method: ratios are taken against it")
    others = [name for name in trials if name != REFERENCE]
    for name in trials:  # warm-up: each method's own generation, alone (its code paths and allocations)
        for _ in range(warmup):
            trials[name](None)
    pairs: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {name: [] for name in trials}
    for rep in range(repeats):
        order = others if rep % 2 == 0 else others[::-1]
        for start in range(0, len(order), group):
            chunk = order[start:start + group]
            tail = [_BRACKET] if bracket is not None else []
            names = [REFERENCE, *chunk, *tail] if rep % 2 == 0 else [*tail, *chunk, REFERENCE]
            got = dict(zip(names, lockstep([bracket if n == _BRACKET else trials[n] for n in names], device)))
            ref = got[REFERENCE]
            for name in chunk:
                paired_ref = ref
                if bracket is not None:
                    # the reference prefill interpolated to this method's place between the group's two
                    at = abs(names.index(name) - names.index(REFERENCE)) / (len(names) - 1)
                    paired_ref = {**ref, "prefill_ms": (1 - at) * ref["prefill_ms"] + at * got[_BRACKET]["prefill_ms"]}
                pairs[name].append((got[name], paired_ref))
            pairs[REFERENCE].append((ref, ref))
    return pairs


def ratio_rows(pairs: Mapping[str, list[tuple[dict[str, float], dict[str, float]]]],
               entries: Mapping[str, Mapping[str, Any]], *, context_len: int, new_tokens: int,
               device_type: str) -> list[dict[str, Any]]:
    """One row per method at one context: summaries, CVs, and ratios to the reference sample of the same
    pair (:func:`paired_rounds`)."""
    if REFERENCE not in pairs:
        raise ValueError(f"the benchmark needs the {REFERENCE!r} method: ratios are taken against it")
    rows = []
    for run_id, paired in pairs.items():
        got, ref = [p[0] for p in paired], [p[1] for p in paired]
        entry = entries[run_id]
        memory = [entry["weights_bytes"] + (s["phase_peak_bytes"] if device_type == "cuda" else s["kv_live_bytes"])
                  for s in got]
        ref_memory = [entries[REFERENCE]["weights_bytes"]
                      + (s["phase_peak_bytes"] if device_type == "cuda" else s["kv_live_bytes"]) for s in ref]
        row: dict[str, Any] = {
            "run_id": entry["run_id"], "method": entry["method"], "budget_nominal": entry["budget"],
            "params": entry["params"], "context_len": context_len, "new_tokens": new_tokens,
            "weights_bytes": entry["weights_bytes"],
            "memory_source": "weights + allocator peak" if device_type == "cuda" else "weights + live K/V",
        }
        metrics = {"prefill_ms": [s["prefill_ms"] for s in got],
                   "decode_tokens_per_s": [s["decode_tokens_per_s"] for s in got],
                   "peak_memory_bytes": memory}
        refs = {"prefill_ms": [s["prefill_ms"] for s in ref],
                "decode_tokens_per_s": [s["decode_tokens_per_s"] for s in ref],
                "peak_memory_bytes": ref_memory}
        for name, values in metrics.items():
            # the reference sample timed in lockstep with this one: the machine's drift falls on both
            ratios = [v / r for v, r in zip(values, refs[name])]
            row[name] = {**summarise(values), "cv": cv(values)}
            row[f"{name}_ratio"] = {"median": statistics.median(ratios), "mean": statistics.fmean(ratios),
                                    "cv": cv(ratios), "n": len(ratios),
                                    # relative standard error of the mean ratio: the width of what is reported
                                    "se_rel": cv(ratios) / math.sqrt(len(ratios))}
        row["kv_live_bytes"] = statistics.median(s["kv_live_bytes"] for s in got)
        row["decode_ms_per_token"] = 1000.0 / row["decode_tokens_per_s"]["p50"]
        rows.append(row)
    return rows


def run_bench(spec: Mapping[str, Any], out: str | Path, *, model_path: str | Path | None = None,
              corpus_dir: str | Path | None = None, code: str | None = None, threads: int = 1) -> dict:
    """Build every run of ``spec["runs"]`` (one model), time them against the base (:func:`paired_rounds`), write
    the JSON to ``out``."""
    from harness.data.sets import load_eval_texts
    from harness.orchestration.provenance import device_info, resolve_device, utc_now
    from harness.orchestration.run import build
    from harness.training.train import seed_everything

    bench = spec["bench"]
    runs = list(spec["runs"])
    if sum(r["method"] == REFERENCE for r in runs) != 1:
        raise ValueError(f"the benchmark of {spec['model']['name']!r} needs exactly one {REFERENCE!r} run to take "
                         "ratios against (harness.orchestration.config.bench_spec adds it)")
    started, t0 = utc_now(), time.perf_counter()
    torch.set_num_threads(max(1, int(threads)))
    device = resolve_device(spec["device"])
    seed_everything(int(spec["seed"]))
    entries: dict[str, dict[str, Any]] = {}
    models: dict[str, Any] = {}
    tokenizer = positions = None
    for run in runs:
        built = build({**run, "model": spec["model"], "dtype": spec["dtype"]}, device=device,
                      model_path=model_path, trained_dir=run.get("trained"))
        positions = getattr(built.model.config, "max_position_embeddings", None)
        tokenizer = built.tokenizer
        key = REFERENCE if run["method"] == REFERENCE else run["run_id"]
        models[key] = built
        entries[key] = {"run_id": run["run_id"], "method": run["method"], "budget": float(run["budget"]),
                        "params": built.params, "weights_bytes": weight_bytes(built.model)}
        built.base = None  # only the model under test stays in memory
    texts = load_eval_texts(spec["eval"], corpus_dir, spec.get("datasets"))
    # group / bracket: the config schema's defaults are in cfg["perf"] already (bench_spec copies it)
    new_tokens, group, bracketed = int(bench["new_tokens"]), int(bench["group"]), bool(bench["bracket"])
    contexts = resolve_contexts(bench["context_lengths"], window=int(spec["window"]), positions=positions,
                                new_tokens=new_tokens)
    device_type = torch.device(device).type

    def timed(b, prompt: torch.Tensor, tokens: int) -> Callable[[StepClock | None], dict[str, float]]:
        """One generation of ``tokens`` by ``b``; clock None is the warm-up, a lone generation (prefill and
        a few cached steps warm every code path)."""
        return lambda clock: time_one(b.model, b.method, b.params, prompt,
                                      tokens if clock is not None else min(tokens, WARMUP_TOKENS), device, clock)

    rows = []
    for n in contexts:
        prompt = prompt_ids(tokenizer, texts, n).to(device)
        log(f"{spec['model']['name']}: {len(models)} methods at context {n}, {bench['repeats']} rounds")
        trials = {key: timed(b, prompt, new_tokens) for key, b in models.items()}
        bracket = timed(models[REFERENCE], prompt, 1) if bracketed else None  # a reference prefill alone
        pairs = paired_rounds(trials, repeats=int(bench["repeats"]), warmup=int(bench["warmup"]), device=device,
                              group=group, bracket=bracket)
        rows += ratio_rows(pairs, entries, context_len=n, new_tokens=new_tokens, device_type=device_type)
    info = device_info(device)
    result = {
        "schema": SCHEMA,
        "model": spec["model"]["name"],
        "family": spec["model"]["family"],
        "seed": int(spec["seed"]),
        "device": f"{info.get('type')}: {info.get('name')}",
        "threads": int(threads),
        "allocator": allocator_settings(),
        "reference": REFERENCE,
        "protocol": {"contexts": contexts, "new_tokens": new_tokens, "repeats": int(bench["repeats"]),
                     "warmup": int(bench["warmup"]), "group": group, "bracket": bracketed,
                     "order": "each group of `group` methods in lockstep with one reference generation (prefills "
                              "one after the other, then one decode step of each in turn); methods in "
                              "alternating order each round"
                              + ("; a reference prefill alone closes each group's prefills" if bracketed else ""),
                     "ratio": "median over rounds of method / the reference sample of the same lockstep group"
                              + ("; prefill: to the reference prefill interpolated between the group's two at the "
                                 "method's place" if bracketed else "")},
        "code": code,
        "started_at": started,
        "wall_time_s": time.perf_counter() - t0,
        "rows": rows,
    }
    write_json_atomic(out, result)
    worst = max(max(r["decode_tokens_per_s_ratio"]["cv"], r["prefill_ms_ratio"]["cv"]) for r in rows)
    log(f"{len(rows)} rows, largest ratio CV {100 * worst:.1f} %, {result['wall_time_s']:.0f} s -> {out}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--spec`` (JSON: model, runs, bench settings), ``--out``; exit 2 with the reason on bad input."""
    parser = argparse.ArgumentParser(prog="python -m harness.measurement.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="JSON: model, seed, device, dtype, eval, window, bench, runs")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--model", help="base model directory (models pretrained here)")
    parser.add_argument("--corpus", help="corpus directory (offline eval texts: the prompts)")
    parser.add_argument("--code", help="code hash of this job (recorded)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    tune_allocator()  # as every harness job (harness.allocator): prefills do not page-fault their memory afresh
    try:
        run_bench(json.loads(args.spec), args.out, model_path=args.model, corpus_dir=args.corpus, code=args.code,
                  threads=args.threads)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

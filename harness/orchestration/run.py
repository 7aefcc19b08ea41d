"""The per-run pipeline: train (once per checkpoint) -> load, convert -> evaluate -> measure -> record.

``execute_train`` makes one trained checkpoint (``harness train``; Snakemake shares it
between runs that differ only in eviction keep); ``execute_run`` makes one record
(``harness run``). Both are resumable: a finished checkpoint or a valid record made from
the same spec is kept, not recomputed. Each run deep-copies the base model before the
registry converts it (conversion changes the config in place).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from harness.orchestration.config import BASE_METHOD, architecture_of
from harness.orchestration.provenance import collect_provenance, resolve_device, utc_now
from harness.orchestration.records import existing_record, new_record, read_record, write_json_atomic, write_record

MODEL_FILE = "model.pt"
SUMMARY_FILE = "train.json"


def log(message: str) -> None:
    """Progress on stderr (the job's log)."""
    print(f"[harness] {message}", file=sys.stderr, flush=True)


def texts_fingerprint(texts: list[str]) -> str:
    """SHA-256 of the evaluated documents, in order."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def load_eval_texts(eval_cfg: Mapping[str, Any], corpus_dir: str | Path | None,
                    datasets: Mapping[str, Any] | None = None) -> list[str]:
    """The held-out documents to score: the offline corpus split, or a hub text set (``datasets``: its local copy)."""
    if eval_cfg["text_set"] == "corpus":
        if corpus_dir is None:
            raise ValueError("eval.text_set 'corpus' needs --corpus (the directory built by 'harness corpus')")
        from harness.data.corpus import read_split

        texts = read_split(corpus_dir, eval_cfg["split"])
    else:
        from harness.data.hub_data import load_text_set

        source = (datasets or {}).get(eval_cfg["text_set"]) or {}
        texts = load_text_set(eval_cfg["text_set"], path=source.get("path"), split=eval_cfg["split"])
    if not texts:
        raise ValueError(f"no documents in eval set {eval_cfg['text_set']!r} split {eval_cfg['split']!r}")
    return texts


def load_instruction_rows(name: str, split: str, *, instruct_dir: str | Path | None,
                          source: Mapping[str, Any] | None, max_rows: int | None) -> list[dict]:
    """Rows ``{"id", "prompt", "references"}`` of the offline set (``name='offline'``) or a hub set.

    ``source``: the set's ``datasets.<name>`` entry (local path; Dolly's held-out size and seed).
    """
    if name == "offline":
        if instruct_dir is None:
            raise ValueError("the offline instruction set needs --instruct (the directory built by 'harness instruct')")
        from harness.data.instruct import read_instruct

        rows = read_instruct(instruct_dir, split)
    else:
        from harness.data.hub_data import load_instruction_set

        source = dict(source or {})
        split_keys = {"eval_size": source["heldout"], "seed": source["seed"]} if "heldout" in source else {}
        rows = load_instruction_set(name, path=source.get("path"), split=split, **split_keys)
    if not rows:
        raise ValueError(f"instruction set {name!r} split {split!r} has no rows")
    return rows[:max_rows] if max_rows else rows


def _source(spec: Mapping[str, Any], model_path: str | Path | None) -> str:
    source = model_path if model_path is not None else spec["model"].get("hub")
    if source is None:
        raise ValueError(f"model {spec['model']['name']!r} is pretrained here: pass its directory as model_path")
    return str(source)


def resolve_params(method, config, budget: float, explicit: Mapping[str, Any]) -> dict:
    """The registry's params for ``budget`` with the config's explicit params."""
    return method.params_for_budget(config, float(budget), **dict(explicit))


def _routing(model) -> dict | None:
    runtime = getattr(model, "mixsga_runtime", None)
    return None if runtime is None else runtime.routing_stats()


# ---------------------------------------------------------------- training


def training_data(spec: Mapping[str, Any], tokenizer, recipe, *, corpus_dir, instruct_dir):
    """The TrainData of a training spec: CPT blocks of the corpus / a hub text set, or SFT pairs."""
    from harness.training.train import cpt_data, sft_data

    if spec["kind"] == "cpt":
        if spec["data"] == "corpus":
            if corpus_dir is None:
                raise ValueError("CPT on the corpus needs --corpus")
            from harness.data.corpus import read_split

            texts = read_split(corpus_dir, "train")
        else:
            from harness.data.hub_data import load_text_set

            texts = load_text_set(spec["data"], path=(spec.get("dataset") or {}).get("path"), split="train")
        # the stream only needs one pass of the recipe's tokens (plus a block); fewer means epochs
        need = recipe.total_tokens + recipe.seq_len if recipe.total_tokens else None
        return cpt_data(tokenizer, texts, recipe.seq_len, max_tokens=need)
    rows = load_instruction_rows(spec["data"], "train", instruct_dir=instruct_dir, source=spec.get("dataset"),
                                 max_rows=spec["max_rows"])
    return sft_data(tokenizer, rows, recipe.seq_len)


def training_summary(result: Mapping[str, Any], train_id: str) -> dict:
    """The record's ``identity.training_summary`` from a ``harness.training.train.train`` result."""
    aux = result.get("aux_loss_history") or []
    routing = result.get("routing_history") or []
    agreement = routing[-1].get("agreement") if routing else None
    return {
        "train_id": train_id,
        "recipe": result["recipe"]["name"],
        "steps": int(result["steps"]),
        "tokens": int(result["tokens_seen"]),
        "target_tokens": int(result["target_tokens"]),
        "token_hash": result["token_hash"],
        "final_loss": float(result["final_loss"]),
        "final_loss_avg": float(result["final_loss_avg"]),
        "aux_loss_final": float(aux[-1]) if aux else None,
        "agreement_final": float(agreement) if agreement is not None else None,
        "precision": result["precision"],
        "wall_time_s": float(result["wall_time_s"]),
    }


def execute_train(
    spec: Mapping[str, Any],
    out: str | Path,
    *,
    model_path: str | Path | None = None,
    corpus_dir: str | Path | None = None,
    instruct_dir: str | Path | None = None,
    threads: int = 1,
) -> dict:
    """Train one checkpoint (harness.orchestration.config.train_table entry) into ``out/`` (model.pt + train.json).

    The trainer's resumable checkpoint lives beside ``out`` (``.{name}.ckpt``), so a killed job
    continues where it stopped; it is removed once ``out`` is complete.
    """
    from harness.methods import get_method
    from harness.training.recipes import get_recipe
    from harness.training.train import seed_everything, train
    from harness.models.zoo import load_base_model

    out = Path(out)
    if (out / MODEL_FILE).is_file() and (out / SUMMARY_FILE).is_file():
        stored = json.loads((out / SUMMARY_FILE).read_text())
        if stored.get("spec") == json.loads(json.dumps(dict(spec))):
            log(f"{spec['train_id']}: trained checkpoint exists; skipping")
            return stored
    torch.set_num_threads(max(1, int(threads)))
    device = resolve_device(spec["device"])
    seed = int(spec["seed"])
    model, tokenizer = load_base_model(_source(spec, model_path), dtype=torch.float32, device=device)
    arch = spec["architecture"]
    method = get_method(arch["method"])
    seed_everything(seed)  # conversion initialises routers and projections from it
    params = resolve_params(method, model.config, arch["budget"], arch["params"])
    model = method.apply(model, params)
    recipe = get_recipe(spec["recipe"], **spec["overrides"])
    data = training_data(spec, tokenizer, recipe, corpus_dir=corpus_dir, instruct_dir=instruct_dir)
    log(f"{spec['train_id']}: {spec['kind']} with {recipe.name} on {len(data)} examples")
    ckpt = out.parent / f".{out.name}.ckpt"
    result = train(model, data, recipe, ckpt, seed=seed, device=device, progress=True)
    if not result["completed"]:
        raise RuntimeError(f"{spec['train_id']}: training stopped after {result['steps']} steps")
    summary = {"spec": json.loads(json.dumps(dict(spec))), "params": params,
               "summary": training_summary(result, spec["train_id"]), "result": result}
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / MODEL_FILE)
    write_json_atomic(tmp / SUMMARY_FILE, summary)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(ckpt, ignore_errors=True)
    s = summary["summary"]
    log(f"{spec['train_id']}: {s['steps']} steps, {s['tokens']} tokens, final loss {s['final_loss_avg']:.4f}")
    return summary


# ---------------------------------------------------------------- evaluation and measurement


def _prompt_ids(tokenizer, texts: list[str], n: int) -> torch.Tensor:
    from harness.evaluation.perplexity import token_stream

    ids, _ = token_stream(tokenizer, texts, max_tokens=n)
    if len(ids) < n:
        raise ValueError(f"the eval texts give {len(ids)} tokens, fewer than the context length {n}")
    return torch.tensor([ids[:n]], dtype=torch.long)


def _generate(model, prompt: torch.Tensor, n: int, cache=None):
    """Greedy generation of exactly ``n`` tokens; returns the output with its cache."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    extra = {} if cache is None else {"past_key_values": cache}
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=pad, return_dict_in_generate=True, **extra)
    if out.sequences.shape[1] != prompt.shape[1] + n:
        raise RuntimeError(f"generated {out.sequences.shape[1] - prompt.shape[1]} tokens, wanted {n}")
    return out


def measure_cache_bytes(model, method, params, prompt: torch.Tensor, new_tokens: int) -> int:
    """Live K/V bytes after a prompt and ``new_tokens`` generated tokens."""
    cache = method.new_cache(model, params)
    out = _generate(model, prompt, new_tokens, cache)
    return int(method.live_bytes(cache if cache is not None else out.past_key_values))


def measure_latency(model, method, params, prompt: torch.Tensor, measure_cfg: Mapping[str, Any],
                    device: str) -> dict:
    """Prefill ms and decode tokens/s (warm-up, repeats) and peak memory per phase at one context length."""
    from harness.measurement.measure import time_generation

    def generate(n: int):
        return _generate(model, prompt, n, method.new_cache(model, params))

    got = time_generation(generate, new_tokens=int(measure_cfg["new_tokens"]), device=device,
                          repeats=int(measure_cfg["repeats"]), warmup=int(measure_cfg["warmup"]))
    mem = got["peak_memory"]
    return {
        "context_len": int(prompt.shape[1]),
        "new_tokens": int(measure_cfg["new_tokens"]),
        "prefill_ms": got["prefill_ms"],
        "decode_tokens_per_s": got["decode_tokens_per_s"],
        "peak_memory_bytes": {phase: mem[phase]["process"] for phase in ("prefill", "decode")},
        "peak_torch_allocated_bytes": {phase: mem[phase]["torch_max_allocated"] for phase in ("prefill", "decode")},
        "memory_source": mem["prefill"]["process_source"],
    }


def evaluate_zeroshot(model, tokenizer, texts: list[str], zs_cfg: Mapping[str, Any], tasks_dir: Path,
                      seed: int) -> dict[str, float | None]:
    """``{task: accuracy}`` (and ``{task}_norm``) through lm-eval; ``local`` = held-out multiple choice."""
    from harness.evaluation.lm_eval_adapter import LOCAL_MC_TASK, build_local_tasks, evaluate_lm, local_task_config

    tasks: list[Any] = []
    for name in zs_cfg["tasks"]:
        if name == "local":
            configs = build_local_tasks(texts, tasks_dir, seed=0, max_mc_items=zs_cfg["limit"], max_ppl_docs=1)
            tasks += [c for c in configs if c["task"] == LOCAL_MC_TASK]
        elif name in zs_cfg.get("paths", {}):
            tasks.append(local_task_config(name, zs_cfg["paths"][name]))  # a local copy of its dataset
        else:
            tasks.append(name)  # the hub, or the datasets cache under HF_HUB_OFFLINE=1
    got = evaluate_lm(model, tokenizer, tasks, batch_size=zs_cfg["batch_size"], limit=zs_cfg["limit"], seed=seed,
                      allow_hub=any(isinstance(t, str) for t in tasks))
    scores: dict[str, float | None] = {}
    for task, metrics in got["results"].items():
        if "acc" in metrics:
            scores[task] = metrics["acc"]
        if "acc_norm" in metrics:
            scores[f"{task}_norm"] = metrics["acc_norm"]
    return scores


def _refresh_experiments(out: Path, spec: Mapping[str, Any]) -> dict | None:
    """A record that differs from ``spec`` only in the experiments list, relabelled (not recomputed)."""
    if not out.exists():
        return None
    try:
        record = read_record(out)
    except ValueError:
        return None
    wanted = json.loads(json.dumps(dict(spec)))
    have = dict(record["identity"]["config"])
    if {**have, "experiments": None} != {**wanted, "experiments": None}:
        return None
    record["identity"]["config"] = wanted
    record["identity"]["experiments"] = list(wanted["experiments"])
    write_record(out, record)
    return record


def execute_run(
    spec: Mapping[str, Any],
    out: str | Path,
    *,
    model_path: str | Path | None = None,
    trained_dir: str | Path | None = None,
    corpus_dir: str | Path | None = None,
    instruct_dir: str | Path | None = None,
    unigram_path: str | Path | None = None,
    predictions_dir: str | Path | None = None,
    code: str | None = None,
    threads: int = 1,
) -> dict:
    """Run one spec (harness.orchestration.config.run_spec) end to end and write its record atomically to ``out``.

    ``trained_dir``: the checkpoint of ``execute_train`` (required when the spec trains);
    ``predictions_dir``: where ROUGE-L runs save their generations (default: beside ``out``).
    """
    from harness.evaluation.evaluate import as_quality, bounded_cache_perplexity, evaluate_instructions
    from harness.methods import get_method
    from harness.evaluation.perplexity import perplexity
    from harness.training.train import seed_everything
    from harness.models.zoo import load_base_model
    from mixsga.budget import full_kv_bytes_per_token

    out = Path(out)
    previous = existing_record(out, spec) or _refresh_experiments(out, spec)
    if previous is not None and code is not None and previous["provenance"].get("code") != code:
        previous = None  # made by other code: the workflow reruns it (Snakemake removes it first anyway)
    if previous is not None:
        log(f"{spec['run_id']}: valid record for this spec exists at {out}; skipping")
        return previous

    started_at, t0 = utc_now(), time.perf_counter()
    torch.set_num_threads(max(1, int(threads)))
    seed = int(spec["seed"])
    seed_everything(seed)
    device = resolve_device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    training = spec["training"]
    if training["kind"] != "none" and trained_dir is None:
        raise ValueError(f"run {spec['run_id']!r} is {training['kind']}-trained: pass its checkpoint as trained_dir")

    base, tokenizer = load_base_model(_source(spec, model_path), dtype=dtype, device=device)
    base.eval()
    method = get_method(spec["method"])
    params = resolve_params(method, base.config, spec["budget"], spec["params"])
    analytic = method.analytic_bytes_per_token(base.config, params, dtype)
    base_bytes = full_kv_bytes_per_token(base.config, dtype)
    model = method.apply(copy.deepcopy(base), params)
    summary = None
    if trained_dir is not None:
        trained_dir = Path(trained_dir)
        stored = json.loads((trained_dir / SUMMARY_FILE).read_text())
        wanted = json.loads(json.dumps(dict(training)))
        differ = sorted(k for k in wanted if stored["spec"].get(k) != wanted[k])
        if differ:
            raise ValueError(f"{trained_dir} was trained differently from run {spec['run_id']!r} "
                             f"(fields {differ}); retrain it")
        state = torch.load(trained_dir / MODEL_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state)
        model.to(dtype)
        summary = stored["summary"]
    model.eval()
    evicting = architecture_of(spec["method"], spec["budget"], spec["params"])[0] != spec["method"]
    own_cache = method.new_cache(model, params) is not None
    cache_factory = (lambda: method.new_cache(model, params)) if own_cache else None

    eval_cfg = spec["eval"]
    texts = load_eval_texts(eval_cfg, corpus_dir, spec.get("datasets"))
    quality: dict[str, Any] = {"eval_set": f"{eval_cfg['text_set']}:{eval_cfg['split']}"}
    if "ppl" in spec["evaluate"]:
        log(f"{spec['run_id']}: perplexity ({'bounded cache' if evicting else 'full'})")
        if evicting:
            ppl = bounded_cache_perplexity(model, tokenizer, texts, seq_len=eval_cfg["seq_len"],
                                           cache_factory=cache_factory, batch_size=eval_cfg["batch_size"],
                                           device=device, max_tokens=eval_cfg["max_tokens"])
        else:
            ppl = perplexity(model, tokenizer, texts, seq_len=eval_cfg["seq_len"], batch_size=eval_cfg["batch_size"],
                             device=device, max_tokens=eval_cfg["max_tokens"])
        quality.update(as_quality(ppl=ppl), ppl_protocol="bounded_cache" if evicting else "full")
        if unigram_path:
            quality["ppl_unigram"] = json.loads(Path(unigram_path).read_text())["ppl_unigram"]
    if "rouge" in spec["evaluate"]:
        ins = eval_cfg["instruct"]
        pred_dir = Path(predictions_dir) if predictions_dir else out.parent.parent / "predictions"
        by_set = {}
        for name in ins["sets"]:
            rows = load_instruction_rows(name, ins["split"], instruct_dir=instruct_dir,
                                         source=spec.get("datasets", {}).get(name), max_rows=ins["max_rows"])
            log(f"{spec['run_id']}: ROUGE-L on {name} ({len(rows)} rows)")
            got = evaluate_instructions(model, tokenizer, rows, pred_dir / f"{spec['run_id']}.{name}.jsonl",
                                        max_new_tokens=ins["max_new_tokens"], batch_size=ins["batch_size"],
                                        device=device, cache_factory=cache_factory)
            by_set[name] = {"rouge_l": float(got["rouge_l"]), "gen_length": float(got["gen_len"]),
                            "rows": len(rows)}
            if len(by_set) == 1:
                quality.update(as_quality(rouge=got), instruct_set=f"{name}:{ins['split']}",
                               instruct_rows=len(rows))
        quality["rouge_by_set"] = by_set
    if "zeroshot" in spec["evaluate"]:
        if evicting:
            # one forward per choice, no cache between tokens: eviction would never act
            log(f"{spec['run_id']}: zero-shot skipped (eviction acts only through a bounded cache)")
        else:
            log(f"{spec['run_id']}: zero-shot {spec['eval']['zeroshot']['tasks']}")
            tasks_dir = out.parent.parent / "zeroshot_tasks" / spec["run_id"]
            quality["zeroshot"] = evaluate_zeroshot(model, tokenizer, texts, eval_cfg["zeroshot"], tasks_dir, seed)
            shutil.rmtree(tasks_dir, ignore_errors=True)

    measure_cfg = spec["measure"]
    timings = []
    runtime = getattr(model, "mixsga_runtime", None)
    if runtime is not None:
        runtime.reset_stats()
    prompts = {n: _prompt_ids(tokenizer, texts, n).to(device) for n in measure_cfg["context_lengths"]}
    for n, prompt in prompts.items():
        log(f"{spec['run_id']}: latency at context {n}")
        timings.append(measure_latency(model, method, params, prompt, measure_cfg, device))
    routing = _routing(model)
    prompt = prompts[measure_cfg["context_lengths"][0]]
    new_tokens = int(measure_cfg["new_tokens"])
    measured = measure_cache_bytes(model, method, params, prompt, new_tokens)
    base_measured = measure_cache_bytes(base, get_method(BASE_METHOD), {}, prompt, new_tokens)

    fingerprint: dict[str, Any] = {"eval_texts_sha256": texts_fingerprint(texts), "eval_documents": len(texts)}
    if corpus_dir is not None:
        from harness.data.corpus import read_fingerprint

        fingerprint["corpus"] = read_fingerprint(corpus_dir)
    provenance = collect_provenance(seed=seed, device=device, dataset_fingerprint=fingerprint, started_at=started_at)
    provenance["code"] = code
    first = timings[0]
    record = new_record(
        spec=spec,
        provenance=provenance,
        params=params,
        training_summary=summary,
        budget={
            "nominal": float(spec["budget"]),
            "realized": measured / base_measured,
            "analytic_bytes_per_token": float(analytic),
            "base_bytes_per_token": float(base_bytes),
            "measured_bytes": float(measured),
            "base_measured_bytes": float(base_measured),
            # the last generated token is returned, never stored
            "measured_tokens": int(prompt.shape[1] + new_tokens - 1),
            "dtype": spec["dtype"],
            "params": params,
            "prefill_expert_fractions": routing["prefill_fractions"] if routing else None,
            "decode_expert_fractions": routing["decode_fractions"] if routing else None,
        },
        quality=quality,
        performance={
            "device": torch.device(device).type,
            "context_len": first["context_len"],
            "prefill_ms": first["prefill_ms"],
            "decode_tokens_per_s": first["decode_tokens_per_s"],
            "peak_memory_bytes": first["peak_memory_bytes"],
            "by_context": timings,
        },
        flags={"simulated": bool(method.simulated), "query_aware": method.query_aware},
        wall_time_s=time.perf_counter() - t0,
    )
    write_record(out, record)
    q = record["quality"]
    log(f"{spec['run_id']}: ppl {q['ppl_token']}, realized budget {record['budget']['realized']:.3f}, "
        f"decode {first['decode_tokens_per_s']['mean']:.1f} tok/s -> {out}")
    return record

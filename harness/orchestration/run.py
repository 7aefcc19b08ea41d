"""The per-run pipeline: train (once per checkpoint); then build -> evaluate -> measure -> record.

``execute_train`` makes one trained checkpoint (``harness train``; Snakemake shares it
between runs that differ only in eviction keep): a Hugging Face directory written by
``hfconvert.save_converted`` (safetensors, ``config.json`` naming the converted model type,
tokenizer files) plus ``train.json``, so ``AutoModelForCausalLM.from_pretrained`` (and so
lm-eval or a serving engine) opens it as the trained model. ``execute_run`` makes one record
(``harness run``). Both are resumable: a finished checkpoint or a valid record made from
the same spec is kept, not recomputed. An untrained run deep-copies the base model before
the registry converts it (conversion changes the config in place); a trained one loads its
checkpoint, already converted, and only prepares it (``Method.load_trained``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from harness.data.sets import load_eval_texts, load_instruction_rows
from harness.orchestration.config import BASE_METHOD
from harness.orchestration.provenance import collect_provenance, resolve_device, utc_now
from harness.atomic import atomic_directory, write_json_atomic
from harness.orchestration.records import existing_record, new_record, read_record, write_record

#: What a trained checkpoint directory holds besides the Hugging Face files: the training summary.
SUMMARY_FILE = "train.json"
#: The held-out curve beside the checkpoint (also in train.json and the records' training summary).
CURVE_FILE = "curve.json"
#: The weight file of checkpoints written before they were Hugging Face directories.
LEGACY_MODEL_FILE = "model.pt"


def log(message: str) -> None:
    """Progress on stderr (the job's log)."""
    print(f"[harness] {message}", file=sys.stderr, flush=True)


def texts_fingerprint(texts: list[str]) -> str:
    """SHA-256 of the evaluated documents, in order."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def _source(spec: Mapping[str, Any], model_path: str | Path | None) -> str:
    source = model_path if model_path is not None else spec["model"].get("hub")
    if source is None:
        raise ValueError(f"model {spec['model']['name']!r} is pretrained here: pass its directory as model_path")
    return str(source)


def resolve_params(method, config, budget: float, explicit: Mapping[str, Any]) -> dict:
    """The registry's params for ``budget`` with the config's explicit params."""
    return method.params_for_budget(config, float(budget), **dict(explicit))


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
        # the stream only needs one pass of the recipe's tokens (plus a block); fewer means epochs.
        # The corpus lists modules by name, so its blocks are spread over the whole split (a prefix
        # would be a few dozen modules); a hub text set is read as it comes (MiniPile is shuffled).
        need = recipe.total_tokens + recipe.seq_len if recipe.total_tokens else None
        return cpt_data(tokenizer, texts, recipe.seq_len, max_tokens=need, spread=spec["data"] == "corpus")
    rows = load_instruction_rows(spec["data"], "train", instruct_dir=instruct_dir, source=spec.get("dataset"),
                                 max_rows=spec["max_rows"])
    return sft_data(tokenizer, rows, recipe.seq_len)


def curve_data(spec: Mapping[str, Any], tokenizer, recipe, *, corpus_dir, instruct_dir):
    """The held-out curve of a training spec (``spec["curve"]``), or None when ``points`` is 0.

    The slice is the same for every method of a seed: CPT scores the first ``val_tokens`` tokens of
    the validation split (corpus or hub text set) in the recipe's ``seq_len`` windows; SFT the
    response tokens of the first ``val_rows`` validation pairs of the instruction set.
    """
    from harness.training.train import Curve, cpt_data, sft_data

    cfg = spec.get("curve") or {}
    if not cfg.get("points"):
        return None
    if spec["kind"] == "cpt":
        if spec["data"] == "corpus":
            if corpus_dir is None:
                raise ValueError("the CPT curve on the corpus needs --corpus")
            from harness.data.corpus import read_split

            texts = read_split(corpus_dir, "validation")
        else:
            from harness.data.hub_data import load_text_set

            texts = load_text_set(spec["data"], path=(spec.get("dataset") or {}).get("path"), split="validation")
        data = cpt_data(tokenizer, texts, recipe.seq_len, max_tokens=int(cfg["val_tokens"]))
    else:
        rows = load_instruction_rows(spec["data"], "validation", instruct_dir=instruct_dir,
                                     source=spec.get("dataset"), max_rows=int(cfg["val_rows"]))
        data = sft_data(tokenizer, rows, recipe.seq_len)
    return Curve(data, points=int(cfg["points"]), batch_size=recipe.micro_batch_size)


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
        # held-out loss during training ({tokens, step, loss, ppl}; step 0 = the converted, untrained model)
        "curve": [dict(p) for p in result.get("curve") or []],
        "curve_time_s": float(result.get("curve_time_s") or 0.0),
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
    """Train one checkpoint (harness.orchestration.config.train_table entry) into ``out/``.

    ``out`` is a Hugging Face directory (``hfconvert.save_converted``: the converted, trained
    model and the tokenizer) plus ``train.json``. The trainer's resumable state lives beside
    ``out`` (``.{name}.ckpt``), so a killed job continues where it stopped; it is removed once
    ``out`` is complete.
    """
    from hfconvert import save_converted
    from harness.methods import get_method
    from harness.training.recipes import get_recipe
    from harness.training.train import seed_everything, train
    from harness.models.zoo import load_base_model

    out = Path(out)
    if (out / "config.json").is_file() and (out / SUMMARY_FILE).is_file():
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
    # what a checkpoint stores; the runtime setup (Method.prepare) is each run's own
    model = method.convert(model, params)
    recipe = get_recipe(spec["recipe"], **spec["overrides"])
    data = training_data(spec, tokenizer, recipe, corpus_dir=corpus_dir, instruct_dir=instruct_dir)
    curve = curve_data(spec, tokenizer, recipe, corpus_dir=corpus_dir, instruct_dir=instruct_dir)
    log(f"{spec['train_id']}: {spec['kind']} with {recipe.name} on {len(data)} examples"
        + (f", held-out curve on {len(curve.data)} examples at {curve.points} points" if curve else ""))
    ckpt = out.parent / f".{out.name}.ckpt"
    result = train(model, data, recipe, ckpt, seed=seed, device=device, progress=True, curve=curve)
    if not result["completed"]:
        raise RuntimeError(f"{spec['train_id']}: training stopped after {result['steps']} steps")
    summary = {"spec": json.loads(json.dumps(dict(spec))), "params": params,
               "summary": training_summary(result, spec["train_id"]), "result": result}
    with atomic_directory(out) as tmp:
        save_converted(model, tmp, tokenizer)  # refuses a conversion its config would not record
        write_json_atomic(tmp / SUMMARY_FILE, summary)
        write_json_atomic(tmp / CURVE_FILE, {"train_id": spec["train_id"], "curve": result["curve"],
                                             "curve_time_s": result["curve_time_s"],
                                             "slice": curve.data.meta if curve else None})
    shutil.rmtree(ckpt, ignore_errors=True)
    s = summary["summary"]
    log(f"{spec['train_id']}: {s['steps']} steps, {s['tokens']} tokens, final loss {s['final_loss_avg']:.4f}")
    return summary


# ---------------------------------------------------------------- the run: build -> evaluate -> measure -> record


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


def load_trained(method, trained_dir: Path, params: dict, *, dtype: torch.dtype, device: str):
    """The trained model of ``trained_dir`` through ``method``; errors name the directory and say to retrain."""
    if (trained_dir / LEGACY_MODEL_FILE).is_file() and not (trained_dir / "config.json").is_file():
        raise ValueError(f"{trained_dir} is a trained checkpoint of the old {LEGACY_MODEL_FILE} format; "
                         f"delete {trained_dir} to retrain it as a Hugging Face directory")
    retrain = f"cannot load the trained checkpoint {trained_dir} (delete it to retrain)"
    try:
        model, _ = method.load_trained(trained_dir, params, dtype=dtype, device=device)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{retrain}: {exc}") from exc
    except ValueError as exc:
        raise ValueError(f"{retrain}: {exc}") from exc
    return model


def resumable_record(out: Path, spec: Mapping[str, Any], code: str | None) -> dict | None:
    """The record already at ``out`` for this spec and code (relabelled if only its experiments differ), else None."""
    previous = existing_record(out, spec) or _refresh_experiments(out, spec)
    if previous is not None and code is not None and previous["provenance"].get("code") != code:
        return None  # made by other code: the workflow reruns it (Snakemake removes it first anyway)
    return previous


@dataclass
class Built:
    """The build step's result: the base model, the method's model under test, and what the steps after ask of it."""

    base: Any  # the unconverted base model: the denominator of the realized budget
    model: Any  # the converted (and, where the spec trains, trained) model under test
    tokenizer: Any
    method: Any  # the registry entry
    params: dict
    dtype: torch.dtype
    training_summary: dict | None
    evicting: bool  # perplexity through a bounded cache; zero-shot skipped
    cache_factory: Callable[[], Any] | None  # the method's own cache, or None for the model's default


def build(spec: Mapping[str, Any], *, device: str, model_path: str | Path | None = None,
          trained_dir: str | Path | None = None) -> Built:
    """Load the base; then the trained checkpoint through the method, or the method applied to a deep copy."""
    from harness.methods import get_method
    from harness.models.zoo import load_base_model

    dtype = getattr(torch, spec["dtype"])
    base, tokenizer = load_base_model(_source(spec, model_path), dtype=dtype, device=device)
    base.eval()
    method = get_method(spec["method"])
    params = resolve_params(method, base.config, spec["budget"], spec["params"])
    summary = None
    if trained_dir is None:
        model = method.apply(copy.deepcopy(base), params)
    else:
        trained_dir = Path(trained_dir)
        try:
            stored = json.loads((trained_dir / SUMMARY_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {trained_dir / SUMMARY_FILE} (delete {trained_dir} to retrain): {exc}") from exc
        wanted = json.loads(json.dumps(dict(spec["training"])))
        differ = sorted(k for k in wanted if stored["spec"].get(k) != wanted[k])
        if differ:
            raise ValueError(f"{trained_dir} was trained differently from run {spec['run_id']!r} "
                             f"(fields {differ}); retrain it")
        model = load_trained(method, trained_dir, params, dtype=dtype, device=device)
        model.to(dtype)  # buffers too (RoPE frequencies), as the state-dict checkpoints were loaded
        summary = stored["summary"]
    model.eval()
    evicting = method.spec.evicts
    own_cache = method.new_cache(model, params) is not None
    cache_factory = (lambda: method.new_cache(model, params)) if own_cache else None
    return Built(base=base, model=model, tokenizer=tokenizer, method=method, params=params, dtype=dtype,
                 training_summary=summary, evicting=evicting, cache_factory=cache_factory)


def measure(built: Built, spec: Mapping[str, Any], texts: list[str], device: str) -> tuple[dict, dict]:
    """``(budget, performance)``: K/V bytes (analytic and live, against the base), latency and memory, routing.

    Routing statistics count only the measured generations (reset after evaluation); the live
    bytes are taken at the first context length.
    """
    from harness.measurement.footprint import (measure_cache_bytes, measure_latency, prompt_ids,
                                               reset_routing_stats, routing_stats)
    from harness.methods import get_method
    from kvledger import base_kv_bytes, full_kv_bytes_per_token

    model, method, params = built.model, built.method, built.params
    measure_cfg = spec["measure"]
    reset_routing_stats(model)
    prompts = {n: prompt_ids(built.tokenizer, texts, n).to(device) for n in measure_cfg["context_lengths"]}
    timings = []
    for n, prompt in prompts.items():
        log(f"{spec['run_id']}: latency at context {n}")
        timings.append(measure_latency(model, method, params, prompt, measure_cfg, device))
    routing = routing_stats(model)
    prompt = prompts[measure_cfg["context_lengths"][0]]
    new_tokens = int(measure_cfg["new_tokens"])
    measured = measure_cache_bytes(model, method, params, prompt, new_tokens)
    base_measured = measure_cache_bytes(built.base, get_method(BASE_METHOD), {}, prompt, new_tokens)
    tokens = int(prompt.shape[1] + new_tokens - 1)  # the last generated token is returned, never stored
    budget = {
        "nominal": float(spec["budget"]),
        "realized": measured / base_measured,
        "analytic_bytes_per_token": float(method.analytic_bytes_per_token(built.base.config, params, built.dtype)),
        "base_bytes_per_token": float(full_kv_bytes_per_token(built.base.config, built.dtype)),
        "measured_bytes": float(measured),
        "base_measured_bytes": float(base_measured),
        # the ledger's bytes for those tokens: sliding-window layers count only their window
        "analytic_bytes": float(method.analytic_bytes(built.base.config, params, tokens, built.dtype)),
        "base_analytic_bytes": float(base_kv_bytes(built.base.config, tokens, built.dtype)),
        "measured_tokens": tokens,
        "dtype": spec["dtype"],
        "params": params,
        "prefill_expert_fractions": routing["prefill_fractions"] if routing else None,
        "decode_expert_fractions": routing["decode_fractions"] if routing else None,
    }
    first = timings[0]
    performance = {
        "device": torch.device(device).type,
        "context_len": first["context_len"],
        "prefill_ms": first["prefill_ms"],
        "decode_tokens_per_s": first["decode_tokens_per_s"],
        "peak_memory_bytes": first["peak_memory_bytes"],
        "by_context": timings,
    }
    return budget, performance


def write_run_record(out: Path, spec: Mapping[str, Any], built: Built, *, quality: dict, budget: dict,
                     performance: dict, texts: list[str], corpus_dir: str | Path | None, device: str,
                     code: str | None, started_at: str, wall_time_s: float) -> dict:
    """Provenance (data fingerprint, environment, code hash), then the validated record, written atomically."""
    fingerprint: dict[str, Any] = {"eval_texts_sha256": texts_fingerprint(texts), "eval_documents": len(texts)}
    if corpus_dir is not None:
        from harness.data.corpus import read_fingerprint

        fingerprint["corpus"] = read_fingerprint(corpus_dir)
    provenance = collect_provenance(seed=int(spec["seed"]), device=device, dataset_fingerprint=fingerprint,
                                    started_at=started_at)
    provenance["code"] = code
    record = new_record(
        spec=spec,
        provenance=provenance,
        params=built.params,
        training_summary=built.training_summary,
        budget=budget,
        quality=quality,
        performance=performance,
        flags={"simulated": bool(built.method.simulated), "query_aware": built.method.query_aware_for(built.params)},
        method_fields=built.method.spec.fields(built.params),
        wall_time_s=wall_time_s,
    )
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
    from harness.evaluation.evaluators import EvalContext, evaluate, get_evaluators
    from harness.training.train import seed_everything

    out = Path(out)
    previous = resumable_record(out, spec, code)
    if previous is not None:
        log(f"{spec['run_id']}: valid record for this spec exists at {out}; skipping")
        return previous
    # bad input fails before any model is loaded
    get_evaluators(spec["evaluate"])
    if spec["training"]["kind"] != "none" and trained_dir is None:
        raise ValueError(f"run {spec['run_id']!r} is {spec['training']['kind']}-trained: "
                         "pass its checkpoint as trained_dir")

    started_at, t0 = utc_now(), time.perf_counter()
    torch.set_num_threads(max(1, int(threads)))
    seed = int(spec["seed"])
    seed_everything(seed)
    device = resolve_device(spec["device"])
    built = build(spec, device=device, model_path=model_path, trained_dir=trained_dir)

    texts = load_eval_texts(spec["eval"], corpus_dir, spec.get("datasets"))
    work = out.parent.parent
    ctx = EvalContext(
        run_id=spec["run_id"], eval_cfg=spec["eval"], tokenizer=built.tokenizer, texts=texts, device=device,
        seed=seed, evicting=built.evicting, cache_factory=built.cache_factory,
        predictions_dir=Path(predictions_dir) if predictions_dir else work / "predictions",
        scratch_dir=work / "zeroshot_tasks" / spec["run_id"],
        instruct_dir=instruct_dir, unigram_path=unigram_path, datasets=spec.get("datasets") or {}, log=log)
    quality = evaluate(built.model, ctx, spec["evaluate"])

    budget, performance = measure(built, spec, texts, device)
    record = write_run_record(out, spec, built, quality=quality, budget=budget, performance=performance,
                              texts=texts, corpus_dir=corpus_dir, device=device, code=code, started_at=started_at,
                              wall_time_s=time.perf_counter() - t0)
    q = record["quality"]
    log(f"{spec['run_id']}: ppl {q['ppl_token']}, realized budget {record['budget']['realized']:.3f}, "
        f"decode {performance['decode_tokens_per_s']['mean']:.1f} tok/s -> {out}")
    return record

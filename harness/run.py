"""One run of the grid: load the base model, apply the method, measure, write the record.

``execute_run`` is what ``python -m harness run`` calls for each Snakemake job. It is
resumable: a valid record made from the same spec is kept, not recomputed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from harness.config import BASE_METHOD
from harness.provenance import collect_provenance, resolve_device, utc_now
from harness.records import existing_record, new_record, write_record


def texts_fingerprint(texts: list[str]) -> str:
    """SHA-256 of the evaluated documents, in order."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def load_eval_texts(eval_cfg: Mapping[str, Any], corpus_dir: str | Path | None) -> list[str]:
    """The held-out documents to score: the offline corpus split, or a hub text set."""
    if eval_cfg["text_set"] == "corpus":
        if corpus_dir is None:
            raise ValueError("eval.text_set 'corpus' needs --corpus (the directory built by 'harness corpus')")
        from harness.corpus import read_split

        texts = read_split(corpus_dir, eval_cfg["split"])
    else:
        from harness.hub_data import load_text_set

        texts = load_text_set(eval_cfg["text_set"], path=eval_cfg["text_path"], split=eval_cfg["split"])
    if not texts:
        raise ValueError(f"no documents in eval set {eval_cfg['text_set']!r} split {eval_cfg['split']!r}")
    return texts


def _measure_live_cache(model, tokenizer, texts: list[str], n_tokens: int, device: str) -> tuple[Any, int]:
    """Prefill ``n_tokens`` held-out tokens with the cache on; return (cache, tokens actually used)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= n_tokens:
            break
    ids = ids[:n_tokens]
    if not ids:
        raise ValueError("eval texts produced no tokens to measure the cache with")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return out.past_key_values, len(ids)


def _method_for(name: str):
    """The registry entry of ``name``, if this stage of the workflow can evaluate it.

    Methods that must be trained first, or that act only through their own cache (eviction),
    need the train / bounded-cache stages, which the workflow does not run yet.
    """
    from harness.methods import get_method

    method = get_method(name)
    if method.needs_training:
        raise NotImplementedError(f"method {name!r} needs training, which the workflow does not run yet")
    return method


def execute_run(
    spec: Mapping[str, Any],
    out: str | Path,
    *,
    model_path: str | Path | None = None,
    corpus_dir: str | Path | None = None,
    unigram_path: str | Path | None = None,
    threads: int = 1,
) -> dict:
    """Run one grid cell described by ``spec`` (harness.config.run_spec) and write its record.

    ``model_path`` is the directory of a model pretrained here (None: the spec's hub checkpoint);
    ``unigram_path`` the JSON written by ``harness unigram`` (None: no unigram reference).
    """
    from harness.methods import get_method
    from harness.perplexity import perplexity
    from harness.train import seed_everything
    from harness.zoo import load_base_model
    from mixsga.budget import full_kv_bytes_per_token

    out = Path(out)
    previous = existing_record(out, spec)
    if previous is not None:
        print(f"[harness run] {spec['run_id']}: valid record for this spec exists at {out}; skipping", file=sys.stderr)
        return previous

    started_at, t0 = utc_now(), time.perf_counter()
    torch.set_num_threads(max(1, int(threads)))
    seed_everything(int(spec["seed"]))
    device = resolve_device(spec["device"])
    dtype = getattr(torch, spec["dtype"])

    source = model_path if model_path is not None else spec["model"].get("hub")
    if source is None:
        raise ValueError(f"model {spec['model']['name']!r} is pretrained here: pass its directory as model_path")
    method = _method_for(spec["method"])
    model, tokenizer = load_base_model(str(source), dtype=dtype, device=device)
    model.eval()
    base_bytes = full_kv_bytes_per_token(model.config, dtype)
    eval_cfg = spec["eval"]
    texts = load_eval_texts(eval_cfg, corpus_dir)
    # the budget's denominator: what the unmodified model really stores for the same tokens
    # (below the ledger's figure for Gemma 2's sliding-window layers on long prompts)
    base_cache, cache_tokens = _measure_live_cache(model, tokenizer, texts, eval_cfg["cache_tokens"], device)
    base_measured = get_method(BASE_METHOD).live_bytes(base_cache)
    del base_cache

    params = method.params_for_budget(model.config, float(spec["budget"]))
    analytic = method.analytic_bytes_per_token(model.config, params, dtype)
    model = method.apply(model, params)
    if method.new_cache(model, params) is not None:
        raise NotImplementedError(
            f"method {spec['method']!r} acts through its own cache; its bounded-cache evaluation is not wired yet"
        )

    ppl = perplexity(
        model,
        tokenizer,
        texts,
        seq_len=eval_cfg["seq_len"],
        batch_size=eval_cfg["batch_size"],
        device=device,
        max_tokens=eval_cfg["max_tokens"],
    )
    cache, _ = _measure_live_cache(model, tokenizer, texts, eval_cfg["cache_tokens"], device)
    measured = method.live_bytes(cache)

    fingerprint: dict[str, Any] = {"eval_texts_sha256": texts_fingerprint(texts), "eval_documents": len(texts)}
    if corpus_dir is not None:
        from harness.corpus import read_fingerprint

        fingerprint["corpus"] = read_fingerprint(corpus_dir)
    unigram = json.loads(Path(unigram_path).read_text())["ppl_unigram"] if unigram_path else None

    record = new_record(
        spec=spec,
        provenance=collect_provenance(
            seed=int(spec["seed"]), device=device, dataset_fingerprint=fingerprint, started_at=started_at
        ),
        budget={
            "nominal": float(spec["budget"]),
            "realized": measured / base_measured,
            "analytic_bytes_per_token": float(analytic),
            "base_bytes_per_token": float(base_bytes),
            "measured_bytes": float(measured),
            "base_measured_bytes": float(base_measured),
            "measured_tokens": cache_tokens,
            "dtype": spec["dtype"],
            "params": params,
        },
        quality={
            "ppl_token": float(ppl["ppl_token"]),
            "ppl_word": float(ppl["ppl_word"]),
            "ppl_unigram": unigram,
            "eval_set": f"{eval_cfg['text_set']}:{eval_cfg['split']}",
            "eval_tokens": int(ppl["tokens"]),
            "eval_words": int(ppl["words"]),
        },
        flags={"simulated": bool(method.simulated), "query_aware": method.query_aware},
        wall_time_s=time.perf_counter() - t0,
    )
    write_record(out, record)
    return record

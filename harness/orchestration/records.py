"""One JSON record per run: schema, constructor, validation, atomic write, reader.

A record has the sections identity, provenance, budget, quality, performance, flags
and wall_time_s (results/README.md lists every field). Numbers not measured are
``null``, never invented. ``analysis/`` reads only these records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from jsonschema import Draft202012Validator

from harness.atomic import write_json_atomic  # the project's one atomic JSON writer (harness.atomic)

#: 3: identity.method_fields (architecture, eviction, keep, variant, architecture_params) from the method's spec.
#: 4: quality.ppl_windows (per-window NLL sums and scored-token counts, for the paired bootstrap).
#: 5: quality.ppl_longrange / longrange_tokens / longrange_min_distance / longrange_windows (the long-range task).
SCHEMA_VERSION = 5
TRAINING_KINDS = ("none", "cpt", "sft")

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_POS_OR_NULL = {"type": ["number", "null"], "minimum": 0}
_INT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_STR_OR_NULL = {"type": ["string", "null"]}
_FRACTIONS_OR_NULL = {"type": ["array", "null"], "items": {"type": "number", "minimum": 0, "maximum": 1}}


def _section(properties: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(properties) if required is None else required,
        "properties": properties,
    }


def _or_null(schema: dict) -> dict:
    return {"oneOf": [{"type": "null"}, schema]}


#: mean / p50 / p90 / std over the timed repeats (harness.measurement.measure.summarise), plus their count.
_SUMMARY = _section({**{k: {"type": "number", "minimum": 0} for k in ("mean", "p50", "p90", "std", "min")},
                     "n": {"type": "integer", "minimum": 1}}, required=["mean", "p50", "p90", "std"])
_PEAK = _section({"prefill": _POS_OR_NULL, "decode": _POS_OR_NULL})
#: One context length's timing: prefill = generate 1 token; decode = the other new tokens.
_TIMING = _section(
    {
        "context_len": {"type": "integer", "minimum": 1},
        "new_tokens": {"type": "integer", "minimum": 2},
        "prefill_ms": _SUMMARY,
        "decode_tokens_per_s": _SUMMARY,
        "peak_memory_bytes": _PEAK,
        "peak_torch_allocated_bytes": _PEAK,
        "memory_source": {"enum": ["rss", "nvml"]},
    }
)
#: One held-out point of the uptraining curve (harness.training.train.Curve).
_CURVE_POINT = _section({"step": {"type": "integer", "minimum": 0}, "tokens": {"type": "integer", "minimum": 0},
                         "loss": _NUM, "ppl": _NUM})
_TRAINING_SUMMARY = _section(
    {
        "train_id": {"type": "string", "minLength": 1},
        "recipe": {"type": "string", "minLength": 1},
        "steps": {"type": "integer", "minimum": 1},
        "tokens": {"type": "integer", "minimum": 1},
        "target_tokens": {"type": "integer", "minimum": 1},
        "token_hash": {"type": "string", "minLength": 16},
        "final_loss": _NUM,
        "final_loss_avg": _NUM,
        "aux_loss_final": _NUM_OR_NULL,
        "agreement_final": _NUM_OR_NULL,
        "precision": {"type": "string"},
        "wall_time_s": {"type": "number", "minimum": 0},
        "curve": {"type": "array", "items": _CURVE_POINT},
        "curve_time_s": {"type": "number", "minimum": 0},
    },
    # the curve came later: a record trained without one stays valid
    required=["train_id", "recipe", "steps", "tokens", "target_tokens", "token_hash", "final_loss", "final_loss_avg",
              "aux_loss_final", "agreement_final", "precision", "wall_time_s"],
)

RECORD_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mixSGA-bench run record",
    **_section(
        {
            "schema_version": {"const": SCHEMA_VERSION},
            "identity": _section(
                {
                    "run_id": {"type": "string", "minLength": 1},
                    "experiments": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                    "model": {"type": "string", "minLength": 1},
                    "family": {"type": "string", "minLength": 1},
                    "method": {"type": "string", "minLength": 1},
                    "seed": {"type": "integer", "minimum": 0},
                    "params": {"type": ["object", "null"]},
                    "method_fields": _section(
                        {
                            "architecture": {"type": "string", "minLength": 1},
                            "eviction": _STR_OR_NULL,
                            "keep": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
                            "variant": _STR_OR_NULL,
                            "architecture_params": {"type": "object"},
                        }
                    ),
                    "training": {"enum": list(TRAINING_KINDS)},
                    "training_summary": _or_null(_TRAINING_SUMMARY),
                    "config": {"type": "object"},
                }
            ),
            "provenance": _section(
                {
                    "git": _section(
                        {"commit": _STR_OR_NULL, "dirty": {"type": ["boolean", "null"]}}
                    ),
                    "packages": {"type": "object", "additionalProperties": _STR_OR_NULL},
                    "python": {"type": "string"},
                    "platform": {"type": "string"},
                    "hostname": {"type": "string"},
                    "device": {
                        "type": "object",
                        "required": ["type", "name"],
                        "properties": {"type": {"type": "string"}, "name": {"type": "string"}},
                    },
                    "seed": {"type": "integer", "minimum": 0},
                    "dataset_fingerprint": {"type": ["object", "null"]},
                    "code": {"type": ["string", "null"]},
                    # glibc malloc settings the job ran with (harness.allocator); absent in older records
                    "allocator": {"type": "object"},
                    "started_at": {"type": "string", "format": "date-time"},
                    "finished_at": {"type": "string", "format": "date-time"},
                },
                required=["git", "packages", "python", "platform", "hostname", "device", "seed",
                          "dataset_fingerprint", "started_at", "finished_at"],
            ),
            "budget": _section(
                {
                    "nominal": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "realized": _POS_OR_NULL,
                    "analytic_bytes_per_token": _POS_OR_NULL,
                    "base_bytes_per_token": _POS_OR_NULL,
                    "measured_bytes": _POS_OR_NULL,
                    "base_measured_bytes": _POS_OR_NULL,
                    "analytic_bytes": _POS_OR_NULL,
                    "base_analytic_bytes": _POS_OR_NULL,
                    "measured_tokens": _INT_OR_NULL,
                    "dtype": {"type": "string"},
                    "params": {"type": ["object", "null"]},
                    "prefill_expert_fractions": _FRACTIONS_OR_NULL,
                    "decode_expert_fractions": _FRACTIONS_OR_NULL,
                },
                required=["nominal", "realized", "analytic_bytes_per_token", "base_bytes_per_token",
                          "measured_bytes", "base_measured_bytes", "measured_tokens", "dtype", "params"],
            ),
            "quality": _section(
                {
                    "ppl_token": _POS_OR_NULL,
                    "ppl_word": _POS_OR_NULL,
                    "ppl_unigram": _POS_OR_NULL,
                    "ppl_protocol": {"enum": ["full", "bounded_cache", None]},
                    "eval_set": _STR_OR_NULL,
                    "eval_tokens": _INT_OR_NULL,
                    "eval_words": _INT_OR_NULL,
                    # one entry per scored window, in stream order: summed NLL (nats) and scored targets
                    "ppl_windows": _or_null(_section({
                        "nll": {"type": "array", "items": {"type": "number", "minimum": 0}},
                        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    })),
                    # the long-range task (harness.evaluation.longrange), from the same scoring pass
                    "ppl_longrange": _POS_OR_NULL,
                    "longrange_tokens": _INT_OR_NULL,
                    "longrange_min_distance": {"type": ["integer", "null"], "minimum": 1},
                    "longrange_windows": _or_null(_section({
                        "nll": {"type": "array", "items": {"type": "number", "minimum": 0}},
                        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    })),
                    "rouge_l": _POS_OR_NULL,
                    "rouge_impl": _STR_OR_NULL,
                    "gen_length": _POS_OR_NULL,
                    "instruct_set": _STR_OR_NULL,
                    "instruct_rows": _INT_OR_NULL,
                    "rouge_by_set": {
                        "type": ["object", "null"],
                        "additionalProperties": _section({"rouge_l": _NUM, "gen_length": _NUM, "rows": _NUM}),
                    },
                    "zeroshot": {"type": ["object", "null"], "additionalProperties": _NUM_OR_NULL},
                }
            ),
            "performance": _section(
                {
                    "device": {"type": ["string", "null"]},
                    "context_len": _INT_OR_NULL,
                    "prefill_ms": _or_null(_SUMMARY),
                    "decode_tokens_per_s": _or_null(_SUMMARY),
                    "peak_memory_bytes": _PEAK,
                    "by_context": {"type": "array", "items": _TIMING},
                }
            ),
            "flags": _section(
                {"simulated": {"type": "boolean"}, "query_aware": {"type": ["boolean", "null"]}}
            ),
            "wall_time_s": {"type": "number", "minimum": 0},
        }
    ),
}

_VALIDATOR = Draft202012Validator(RECORD_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


def empty_quality() -> dict:
    """Quality section with nothing measured."""
    return {k: None for k in RECORD_SCHEMA["properties"]["quality"]["properties"]}


def empty_performance() -> dict:
    """Performance section with nothing measured."""
    return {"device": None, "context_len": None, "prefill_ms": None, "decode_tokens_per_s": None,
            "peak_memory_bytes": {"prefill": None, "decode": None}, "by_context": []}


def new_record(
    *,
    spec: Mapping[str, Any],
    provenance: Mapping[str, Any],
    budget: Mapping[str, Any],
    quality: Mapping[str, Any] | None = None,
    performance: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any],
    wall_time_s: float,
    params: Mapping[str, Any] | None = None,
    training_summary: Mapping[str, Any] | None = None,
    method_fields: Mapping[str, Any] | None = None,
) -> dict:
    """Assemble and validate a record.

    ``spec`` is the run's resolved config (harness.orchestration.config.run_spec); ``params`` the method's
    resolved parameters; ``training_summary`` the CPT / SFT summary (None when untrained);
    ``method_fields`` the method spec's ``fields(params)`` (asked of the spec when not given).
    """
    if method_fields is None:
        from harness.methods import get_spec

        method_fields = get_spec(spec["method"]).fields(dict(params or {}))
    record = {
        "schema_version": SCHEMA_VERSION,
        "identity": {
            "run_id": spec["run_id"],
            "experiments": list(spec.get("experiments") or ["adhoc"]),
            "model": spec["model"]["name"],
            "family": spec["model"]["family"],
            "method": spec["method"],
            "seed": spec["seed"],
            "params": None if params is None else dict(params),
            "method_fields": dict(method_fields),
            "training": spec.get("training", {}).get("kind", "none") if spec.get("training") else "none",
            "training_summary": None if training_summary is None else dict(training_summary),
            "config": dict(spec),
        },
        "provenance": dict(provenance),
        "budget": dict(budget),
        "quality": {**empty_quality(), **(quality or {})},
        "performance": {**empty_performance(), **(performance or {})},
        "flags": dict(flags),
        "wall_time_s": float(wall_time_s),
    }
    validate_record(record)
    return record


def _key_name(path) -> str:
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "<top level>"


def _non_finite(value, path=()) -> list[str]:
    """Paths of NaN / inf numbers (JSON cannot hold them portably, so records may not either)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [_key_name(path)]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, (*path, i))]
    return []


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError naming each field that breaks the record schema."""
    errors = sorted(_VALIDATOR.iter_errors(record), key=lambda e: list(map(str, e.absolute_path)))
    problems = [f"record field '{_key_name(e.absolute_path)}': {e.message}" for e in errors]
    problems += [f"record field '{p}': not a finite number" for p in _non_finite(record)]
    if not problems and record["identity"]["seed"] != record["provenance"]["seed"]:
        problems.append("record field 'provenance.seed': differs from identity.seed")
    windows = (record.get("quality") or {}).get("ppl_windows") if not problems else None
    if windows:
        if len(windows["nll"]) != len(windows["tokens"]):
            problems.append(f"record field 'quality.ppl_windows': {len(windows['nll'])} NLL sums but "
                            f"{len(windows['tokens'])} token counts")
        elif record["quality"].get("eval_tokens") not in (None, sum(windows["tokens"])):
            problems.append(f"record field 'quality.ppl_windows': its tokens sum to {sum(windows['tokens'])}, "
                            f"not eval_tokens {record['quality']['eval_tokens']}")
    far = (record.get("quality") or {}).get("longrange_windows") if not problems else None
    if far:
        if len(far["nll"]) != len(far["tokens"]) or (windows and len(far["tokens"]) != len(windows["tokens"])):
            problems.append("record field 'quality.longrange_windows': not one NLL sum and token count per scored "
                            "window of quality.ppl_windows")
        elif record["quality"].get("longrange_tokens") not in (None, sum(far["tokens"])):
            problems.append(f"record field 'quality.longrange_windows': its tokens sum to {sum(far['tokens'])}, "
                            f"not longrange_tokens {record['quality']['longrange_tokens']}")
    if problems:
        raise ValueError("invalid record:\n  " + "\n  ".join(problems))


def write_record(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Validate ``record``, then write it atomically (harness.atomic.write_json_atomic)."""
    validate_record(record)
    return write_json_atomic(path, record)


def read_record(path: str | Path) -> dict:
    """Load and validate one record; ValueError naming the file if it is not a valid record."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    try:
        validate_record(record)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return record


def existing_record(path: str | Path, spec: Mapping[str, Any]) -> dict | None:
    """The record at ``path`` if it is valid and was made from exactly ``spec`` (resume), else None."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = read_record(path)
    except ValueError:
        return None
    # compare through JSON so that tuples / lists and int / float spellings agree
    wanted = json.loads(json.dumps(dict(spec)))
    return record if record["identity"]["config"] == wanted else None

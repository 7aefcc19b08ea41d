"""Workflow configuration: schema validation with defaults, the run grid, per-run specs.

One implementation serves the Snakefile (which validates before any job is built)
and the CLI. The schema lives in ``workflow/schemas/config.schema.yaml``.
"""

from __future__ import annotations

import copy
import csv
import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from jsonschema import Draft202012Validator, validators

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
#: The method that leaves the model unchanged; it always runs at budget 1.0.
BASE_METHOD = "base"
RUN_TABLE_COLUMNS = ("run_id", "model", "family", "source", "method", "budget", "seed")


class ConfigError(ValueError):
    """A configuration that the schema or the grid rules reject; the message names the key."""


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    """The config JSON schema (YAML on disk)."""
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _validator_with_defaults(schema: dict) -> Draft202012Validator:
    """A Draft 2020-12 validator that fills in ``default`` values while it descends."""
    base_properties = Draft202012Validator.VALIDATORS["properties"]

    def properties_with_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for key, prop in properties.items():
                if "default" in prop and key not in instance:
                    # deep copy: the schema's default objects must never be shared or mutated
                    instance[key] = copy.deepcopy(prop["default"])
        yield from base_properties(validator, properties, instance, subschema)

    cls = validators.extend(Draft202012Validator, {"properties": properties_with_defaults})
    return cls(schema)


def _key_name(path: Iterable[Any]) -> str:
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "<top level>"


def validate_config(config: Mapping[str, Any]) -> dict:
    """Return a validated deep copy of ``config`` with defaults filled in.

    Raises ConfigError naming every offending key and why, e.g.
    ``config key 'pretrain.steps': -3 is less than the minimum of 1``.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a mapping, got {type(config).__name__}")
    resolved = copy.deepcopy(dict(config))
    validator = _validator_with_defaults(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"config key '{_key_name(e.absolute_path)}': {e.message}" for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    _check_semantics(resolved)
    return resolved


def _check_semantics(cfg: dict) -> None:
    """Rules a JSON schema cannot state simply."""
    problems = []
    seen: set[str] = set()
    for i, model in enumerate(cfg["models"]):
        name = model["name"]
        if name in seen:
            problems.append(f"config key 'models[{i}].name': duplicate model name {name!r}")
        seen.add(name)
        if ("size" in model) == ("hub" in model):
            problems.append(
                f"config key 'models[{i}]': model {name!r} needs exactly one of 'size' "
                "(pretrained here) or 'hub' (downloaded checkpoint)"
            )
        elif "hub" in model and "pretrain" in model:
            problems.append(f"config key 'models[{i}].pretrain': model {name!r} comes from the hub, it is not pretrained")
    if cfg["eval"]["text_set"] == "corpus" and cfg["eval"]["text_path"] is not None:
        problems.append("config key 'eval.text_path': only used with a hub text set, not with text_set 'corpus'")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def load_config(paths: str | Path | Iterable[str | Path], overrides: Mapping[str, Any] | None = None) -> dict:
    """Load YAML config file(s) (later ones merged over earlier ones, as Snakemake does) and validate."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
        merge_config(merged, data)
    if overrides:
        merge_config(merged, dict(overrides))
    return validate_config(merged)


def merge_config(base: dict, update: Mapping[str, Any]) -> dict:
    """Merge ``update`` into ``base`` in place: mappings key by key, everything else replaced."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def budget_tag(budget: float) -> str:
    """Budget as it appears in run ids: 1.0 -> 'kv100', 0.375 -> 'kv37.5'."""
    return f"kv{round(float(budget) * 100, 4):g}"


def make_run_id(model: str, method: str, budget: float, seed: int) -> str:
    """The run id; '__' separates fields (model names cannot contain '_')."""
    return f"{model}__{method}__{budget_tag(budget)}__s{int(seed)}"


def model_entry(cfg: Mapping[str, Any], name: str) -> dict:
    """The models[] entry called ``name``; ConfigError listing the known names otherwise."""
    for model in cfg["models"]:
        if model["name"] == name:
            return dict(model)
    raise ConfigError(f"unknown model {name!r}; config models are {[m['name'] for m in cfg['models']]}")


def pretrained_here(model: Mapping[str, Any]) -> bool:
    """True when the model is pretrained by this workflow (it has a size, not a hub name)."""
    return "size" in model


def pretrain_settings(cfg: Mapping[str, Any], name: str) -> dict:
    """The pretraining recipe of model ``name``: the top-level section, overridden by the model's own."""
    model = model_entry(cfg, name)
    if not pretrained_here(model):
        raise ConfigError(f"model {name!r} comes from the hub ({model['hub']}); it is not pretrained here")
    return {**cfg["pretrain"], **model.get("pretrain", {})}


def run_table(cfg: Mapping[str, Any]) -> list[dict]:
    """The grid model x method x budget x seed as rows (base runs once per seed at budget 1.0)."""
    rows = []
    for model in cfg["models"]:
        for method in cfg["methods"]:
            budgets = [1.0] if method == BASE_METHOD else [float(b) for b in cfg["budgets"]]
            for budget in budgets:
                for seed in cfg["seeds"]:
                    rows.append(
                        {
                            "run_id": make_run_id(model["name"], method, budget, seed),
                            "model": model["name"],
                            "family": model["family"],
                            "source": "pretrained" if pretrained_here(model) else model["hub"],
                            "method": method,
                            "budget": budget,
                            "seed": int(seed),
                        }
                    )
    return rows


def run_spec(cfg: Mapping[str, Any], run_id: str) -> dict:
    """Everything that determines one run's result: its row, model, eval and (if pretrained here)
    the data, tokenizer and pretraining settings. Stored as the record's resolved config."""
    rows = {row["run_id"]: row for row in run_table(cfg)}
    if run_id not in rows:
        raise ConfigError(f"run id {run_id!r} is not in the grid of this config ({len(rows)} runs)")
    row = rows[run_id]
    model = model_entry(cfg, row["model"])
    spec = {
        "run_id": run_id,
        "profile": cfg["profile"],
        "model": model,
        "method": row["method"],
        "budget": row["budget"],
        "seed": row["seed"],
        "device": cfg["device"],
        "dtype": cfg["dtype"],
        "eval": copy.deepcopy(cfg["eval"]),
    }
    if pretrained_here(model):
        spec["data"] = copy.deepcopy(cfg["data"])
        spec["tokenizer"] = copy.deepcopy(cfg["tokenizer"])
        spec["pretrain"] = pretrain_settings(cfg, model["name"])
    return spec


def write_run_table(rows: list[dict], path: str | Path) -> Path:
    """Write the grid as a TSV (one row per run) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RUN_TABLE_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return path


def code_hash(paths: Iterable[str | Path], root: Path = REPO_ROOT) -> str:
    """SHA-256 (12 hex digits) over the named source files or directories (their *.py files).

    Rules pass it as a param, so that a change of the code a rule runs reruns that rule.
    """
    digest = hashlib.sha256()
    for entry in paths:
        p = (root / entry) if not Path(entry).is_absolute() else Path(entry)
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if not f.exists():
                # not written yet (another part of the suite): hash the absence, change reruns
                digest.update(f"missing:{f.relative_to(root)}".encode())
                continue
            digest.update(str(f.relative_to(root)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]

"""Workflow configuration: schema validation with defaults, the run grid, per-run specs.

One implementation serves the Snakefile (which validates before any job is built)
and the CLI. The schema lives in ``workflow/schemas/config.schema.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from jsonschema import Draft202012Validator, validators

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"
#: The method that leaves the model unchanged; it always runs at budget 1.0.
BASE_METHOD = "base"
RUN_TABLE_COLUMNS = (
    "run_id", "experiments", "model", "family", "source", "training", "method", "budget", "params", "seed",
    "evaluate", "train_id",
)


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
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines + _unknown_methods(resolved)))
    from harness.orchestration.checks import check_config  # imports this module

    check_config(resolved)
    _check_semantics(resolved)
    return resolved


def _unknown_methods(cfg: Mapping[str, Any]) -> list[str]:
    """Problems naming each run whose method the registry lacks (reported with the schema's, all at once)."""
    experiments = cfg.get("experiments")
    problems = []
    for exp_name, exp in (experiments.items() if isinstance(experiments, Mapping) else ()):
        runs = exp.get("runs") if isinstance(exp, Mapping) else None
        for i, entry in enumerate(runs if isinstance(runs, list) else ()):
            method = entry.get("method") if isinstance(entry, Mapping) else None
            if isinstance(method, str):
                try:
                    _method_spec(f"config key 'experiments.{exp_name}.runs[{i}]'", method)
                except ConfigError as err:
                    problems.append(str(err))
    return problems


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
    for exp_name, exp in cfg["experiments"].items():
        for name in exp.get("models") or []:
            if name not in seen:
                problems.append(f"config key 'experiments.{exp_name}.models': unknown model {name!r}; "
                                f"config models are {sorted(seen)}")
    for name in cfg["default_skip"]:
        if name not in cfg["experiments"]:
            problems.append(f"config key 'default_skip': {name!r} is not an experiment of this config "
                            f"(experiments: {sorted(cfg['experiments'])})")
    for exp_name, exp in cfg["experiments"].items():
        if exp["training"] == "none" and "rouge" in exp["evaluate"]:
            problems.append(f"config key 'experiments.{exp_name}.evaluate': ROUGE-L needs an instruction-tuned "
                            "model (training: sft)")
    for name in cfg["overheads"]["checkpoints"] or []:
        model = next((m for m in cfg["models"] if m["name"] == name), None)
        if model is None or "hub" not in model:
            problems.append(f"config key 'overheads.checkpoints': {name!r} is not a hub model of this config "
                            f"(hub models: {[m['name'] for m in cfg['models'] if 'hub' in m]})")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    rows = run_table(cfg)  # expansion errors (unknown method, missing budgets, clashing ids) surface here
    _check_local_data(cfg, rows)


# ----------------------------------------------------------------------------- datasets


def datasets_read(cfg: Mapping[str, Any], rows: list[dict] | None = None) -> dict[str, set[str]]:
    """The hub datasets (``datasets.<name>``) the grid reads, each with the splits it reads."""
    rows = rows if rows is not None else run_table(cfg)
    kinds = {r["training"] for r in rows}
    evaluations = {w for r in rows for w in r["evaluate"]}
    read: dict[str, set[str]] = {}

    def add(name: str, split: str) -> None:
        if name in cfg["datasets"]:
            read.setdefault(name, set()).add(split)

    if "cpt" in kinds:
        add(cfg["training"]["cpt"]["data"], "train")
    if "sft" in kinds:
        add(cfg["training"]["sft"]["data"], "train")
    add(cfg["eval"]["text_set"], cfg["eval"]["split"])  # every run scores or prompts with it
    if "rouge" in evaluations:
        for name in cfg["eval"]["instruct"]["sets"]:
            add(name, cfg["eval"]["instruct"]["split"])
    add(cfg["figure1"]["text_set"], "test")
    return read


def _check_local_data(cfg: Mapping[str, Any], rows: list[dict]) -> None:
    """Every local dataset path holds the files its loader reads, and no two datasets share a file."""
    from harness.data.hub_data import SPLITS, local_files

    read = datasets_read(cfg, rows)
    problems, owner = [], {}
    for name, entry in cfg["datasets"].items():
        if entry["path"] is None:
            continue
        where = f"config key 'datasets.{name}.path'"
        files: set[Path] = set()
        missing = []
        for split in sorted(read.get(name) or SPLITS):
            try:
                files.update(f.resolve() for f in local_files(name, entry["path"], split))
            except FileNotFoundError as err:
                missing.append(f"{where}: {err}")
        # a split a job reads must be there; a dataset no job reads needs only some file
        problems += missing if name in read else missing[:1] if not files else []
        for f in sorted(files):
            if f in owner and owner[f] != name:
                problems.append(f"{where}: {name!r} and {owner[f]!r} both resolve to {str(f)!r}; "
                                "give each dataset its own file")
            owner.setdefault(f, name)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def hub_offline(environ: Mapping[str, str] | None = None) -> bool:
    """True when the hub must not be reached (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set to a true value)."""
    env = os.environ if environ is None else environ
    return any(env.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                      "HF_DATASETS_OFFLINE"))


def _cache_dirs(repo: str, kind: str, env: Mapping[str, str]) -> list[Path]:
    """Where huggingface_hub / datasets would have cached ``repo`` (kind 'model' or 'dataset')."""
    home = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    hub = Path(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
    dirs = [hub / f"{kind}s--{repo.replace('/', '--')}"]
    if kind == "dataset":
        dirs.append(Path(env.get("HF_DATASETS_CACHE") or home / "datasets") / repo.replace("/", "___"))
    return dirs


def check_offline(cfg: Mapping[str, Any], rows: list[dict] | None = None,
                  environ: Mapping[str, str] | None = None, *, task_datasets=None) -> None:
    """With the hub offline, refuse (before any job) what only the hub could provide, naming it.

    A hub model whose ``hub`` is not a local directory, a dataset with ``path: null`` and an lm-eval
    task without ``eval.zeroshot.paths`` entry must then be in the local cache (HF_HOME).
    ``task_datasets``: task name -> its hub dataset (default: lm-eval's task registry).
    """
    env = os.environ if environ is None else environ
    if not hub_offline(env):
        return
    from harness.data.hub_data import INSTRUCTION_SETS, TEXT_SETS

    rows = rows if rows is not None else run_table(cfg)
    sources = {**INSTRUCTION_SETS, **TEXT_SETS}
    problems = []

    def cached(repo: str, kind: str) -> bool:
        return any(d.is_dir() for d in _cache_dirs(repo, kind, env))

    timed = cfg["overheads"]["checkpoints"]
    timed = [m["name"] for m in cfg["models"] if "hub" in m] if timed is None else timed
    for name in sorted({r["model"] for r in rows} | set(timed)):
        hub = model_entry(cfg, name).get("hub")
        if hub and not Path(hub).is_dir() and not cached(hub, "model"):
            problems.append(f"model {name!r}: {hub!r} is neither a local directory nor in the hub cache "
                            f"({_cache_dirs(hub, 'model', env)[0]})")
    for name in sorted(datasets_read(cfg, rows)):
        if cfg["datasets"][name]["path"] is None and not cached(sources[name].repo, "dataset"):
            problems.append(f"dataset {name!r}: config key 'datasets.{name}.path' is null and "
                            f"{sources[name].repo!r} is not in the datasets cache")
    zeroshot = [r for r in rows if "zeroshot" in r["evaluate"]]
    tasks = [t for t in cfg["eval"]["zeroshot"]["tasks"] if t != "local" and t not in cfg["eval"]["zeroshot"]["paths"]]
    if zeroshot and tasks:
        if task_datasets is None:
            from harness.evaluation.lm_eval_adapter import task_datasets as lookup

            task_datasets = lookup(tasks)
        for task in tasks:
            repo = task_datasets.get(task)
            if repo is None or not cached(repo, "dataset"):
                problems.append(f"zero-shot task {task!r} ({len(zeroshot)} runs): its dataset {repo!r} is not in the "
                                f"datasets cache; give config key 'eval.zeroshot.paths.{task}' a local copy")
    if problems:
        raise ConfigError("HF_HUB_OFFLINE is set, and these would need the hub:\n  " + "\n  ".join(problems))


def load_config(paths: str | Path | Iterable[str | Path], overrides: Mapping[str, Any] | None = None) -> dict:
    """Load YAML config file(s), later ones over earlier ones by :func:`merge_config`, and validate.

    The workflow resolves its config through this too (``workflow/rules/common.smk``), so that
    Snakemake and the CLI apply the same profile rule (:data:`REPLACED_WHOLE`).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    from harness.orchestration.checks import read_config_file  # imports this module

    merged: dict = {}
    for path in paths:
        merge_config(merged, read_config_file(path))
    if overrides:
        merge_config(merged, dict(overrides))
    return validate_config(merged)


#: The workflow's own config file (the Snakefile's ``configfile:``); --configfile files merge over it.
DEFAULT_CONFIGFILE = REPO_ROOT / "config" / "config.yaml"


def resolve_config(configfiles: Iterable[str | Path] = (), overrides: Mapping[str, Any] | None = None) -> dict:
    """The config ``snakemake --configfile F... --config K=V...`` runs: the default file, then ``F...``, then ``K=V``.

    The workflow (common.smk) and every CLI command resolve through this one function.
    """
    return load_config([DEFAULT_CONFIGFILE, *configfiles], overrides)


#: Mappings a later config file replaces whole instead of merging into them key by key ('*':
#: any key). A profile's recipe overrides are relative to the recipe *it* names, so offline
#: overrides must not survive under the paper's recipe; an experiment is what its profile says.
REPLACED_WHOLE: tuple[tuple[str, ...], ...] = (
    ("training", "cpt", "overrides"),
    ("training", "sft", "overrides"),
    ("experiments", "*"),
)


def _replaced_whole(path: tuple[str, ...]) -> bool:
    return any(len(p) == len(path) and all(a in ("*", b) for a, b in zip(p, path)) for p in REPLACED_WHOLE)


def merge_config(base: dict, update: Mapping[str, Any], _path: tuple[str, ...] = ()) -> dict:
    """Merge ``update`` into ``base`` in place: mappings key by key, everything else replaced.

    Exceptions (:data:`REPLACED_WHOLE`): ``training.{cpt,sft}.overrides`` and each
    ``experiments.<name>`` entry are replaced whole by a later file that gives them.
    """
    for key, value in update.items():
        path = (*_path, str(key))
        if isinstance(value, Mapping) and isinstance(base.get(key), dict) and not _replaced_whole(path):
            merge_config(base[key], value, path)
        else:
            base[key] = copy.deepcopy(value)
    return base


def budget_tag(budget: float) -> str:
    """Budget as it appears in run ids: 1.0 -> 'kv100', 0.375 -> 'kv37.5', 5/7 -> 'kv71.43'."""
    return f"kv{round(float(budget) * 100, 2):g}"


def make_run_id(model: str, method: str, budget: float, seed: int, *, training: str = "none",
                params: Mapping[str, Any] | None = None) -> str:
    """The readable run id ``{model}__{training}__{method}[-{variant}]__kv{budget}__s{seed}``.

    '__' separates fields (model names cannot contain '_'); the variant spells out the
    explicit method params (e.g. ``mixsga-r1.9.2``, ``mixsga-r3.1.6-routerrandom``).
    """
    return f"{model}__{training}__{method}{_variant(params or {})}__{budget_tag(budget)}__s{int(seed)}"


_KEY_TAGS = {"ratios": "r", "group_sizes": "g", "aux_loss_weight": "aux", "inner_budget": "in"}


def _variant(params: Mapping[str, Any]) -> str:
    """A short readable tag of explicit params: {'ratios': [1, 9, 2]} -> '-r1.9.2'."""
    parts = []
    for key in sorted(params):
        value = params[key]
        if isinstance(value, Mapping):
            text = _variant(value).lstrip("-")
        elif isinstance(value, (list, tuple)):
            text = ".".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(_KEY_TAGS.get(key, key.replace("_", "")) + text)
    tag = "-".join(parts)
    tag = "".join(c if c.isalnum() or c in ".-" else "" for c in tag)
    return f"-{tag}" if tag else ""


def model_kv_heads(model: Mapping[str, Any]) -> int | None:
    """K/V heads per layer of a models[] entry: its ``kv_heads``, or its zoo size's; None if unknown."""
    if model.get("kv_heads") is not None:
        return int(model["kv_heads"])
    if pretrained_here(model):
        from harness.models.shapes import kv_heads

        return kv_heads(model["family"], model["size"])
    return None


def _method_spec(where: str, method: str):
    """The registry's spec of ``method``; ConfigError naming the key and the known methods."""
    from harness.methods import get_spec

    try:
        return get_spec(method)
    except ValueError as err:
        raise ConfigError(f"{where[:-1]}.method': {err}") from None


def _spec_error(where: str, err: ValueError, model: Mapping[str, Any] | None = None) -> ConfigError:
    """The ConfigError of a spec's ValueError: a ParamError names ``...runs[i].params.<key>``."""
    from harness.methods.core import ParamError

    if isinstance(err, ParamError):
        return ConfigError(f"{where[:-1]}.params.{err.key}': {err}")
    on = f", model {model['name']!r}" if model is not None else ""
    return ConfigError(f"{where}{on}: {err}")


def run_contexts(cfg: Mapping[str, Any], exp: Mapping[str, Any]) -> dict[str, int]:
    """The token counts an experiment's runs process, by config key: its perplexity windows and measured prompts.

    Each run is measured at every ``measure.context_lengths`` prompt; ``eval.seq_len`` is the
    window its cache sees when it scores perplexity. (ROUGE prompts vary by row: not known here.)
    """
    contexts = {f"measure.context_lengths[{i}]": int(n) for i, n in enumerate(cfg["measure"]["context_lengths"])}
    if "ppl" in exp["evaluate"]:
        contexts["eval.seq_len"] = int(cfg["eval"]["seq_len"])
    return contexts


def _check_feasible(where: str, model: Mapping[str, Any], method: str, budget: float,
                    params: Mapping[str, Any], contexts: Mapping[str, int]) -> None:
    """Reject, before any job runs, a budget the model's K/V heads cannot store (when they are known), and
    a run the method's spec refuses whatever the model (``MethodSpec.check_run``)."""
    spec = _method_spec(where, method)
    heads = model_kv_heads(model)
    try:
        if heads is not None:
            spec.check_feasible(budget, params, heads)
    except ValueError as err:
        raise _spec_error(where, err, model) from None
    try:
        spec.check_run(budget, params, contexts)
    except ValueError as err:
        raise _spec_error(where, err) from None


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


def architecture_of(method: str, budget: float, params: Mapping[str, Any]) -> tuple[str, float, dict]:
    """(method, budget, explicit params) of the weights a run uses: the method spec's ``train_key``.

    ``h2o`` runs on the base model; ``h2o+mixsga`` on mixSGA at ``inner_budget`` (0.5 by default)
    with the ``inner`` params. Runs differing only in the eviction keep thus share one checkpoint.
    """
    from harness.methods import get_spec

    try:
        return get_spec(method).train_key(budget, params)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _run_budgets(where: str, entry: Mapping[str, Any], model: Mapping[str, Any]) -> list[float]:
    spec = _method_spec(where, entry["method"])
    try:
        return spec.budgets(entry.get("budgets"), entry.get("params") or {}, model_kv_heads(model))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def run_table(cfg: Mapping[str, Any]) -> list[dict]:
    """Every experiment's runs as rows, shared runs once (their ``experiments`` merged), in config order.

    A run is identified by model, training, method, budget, explicit params and seed; two
    experiments asking for the same run share it, and its evaluations are the union of theirs.
    """
    by_id: dict[str, dict] = {}
    origin: dict[str, str] = {}  # run id -> the config key that first asked for it
    for exp_name, exp in cfg["experiments"].items():
        models = exp.get("models") or [m["name"] for m in cfg["models"]]
        seeds = exp.get("seeds") or cfg["seeds"]
        for i, entry in enumerate(exp["runs"]):
            where = f"config key 'experiments.{exp_name}.runs[{i}]'"
            try:  # validates the method name and its params (the method's spec)
                params = _method_spec(where, entry["method"]).parse_params(entry.get("params"))
            except ConfigError:
                raise
            except ValueError as err:
                from harness.methods.core import ParamError

                key = f".{err.key}" if isinstance(err, ParamError) else ""
                raise ConfigError(f"{where[:-1]}.params{key}': {err}") from None
            contexts = run_contexts(cfg, exp)
            for model_name in models:
                model = model_entry(cfg, model_name)
                for budget in _run_budgets(where, entry, model):
                    _check_feasible(where, model, entry["method"], budget, params, contexts)
                    for seed in seeds:
                        run_id = make_run_id(model_name, entry["method"], budget, seed,
                                             training=exp["training"], params=params)
                        row = by_id.get(run_id)
                        if row is None:
                            origin[run_id] = where
                            row = by_id[run_id] = {
                                "run_id": run_id,
                                "experiments": [],
                                "model": model_name,
                                "family": model["family"],
                                "source": "pretrained" if pretrained_here(model) else model["hub"],
                                "training": exp["training"],
                                "method": entry["method"],
                                "budget": float(budget),
                                "params": params,
                                "seed": int(seed),
                                "evaluate": [],
                            }
                        elif row["params"] != params or row["budget"] != float(budget):
                            raise ConfigError(f"run id {run_id!r} stands for two different runs: budget "
                                              f"{row['budget']:g}, params {row['params']} ({origin[run_id]}) and "
                                              f"budget {float(budget):g}, params {params} ({where}); run ids "
                                              "keep budgets to 0.01 % and must differ")
                        if exp_name not in row["experiments"]:
                            row["experiments"].append(exp_name)
                        for what in exp["evaluate"]:
                            if what not in row["evaluate"]:
                                row["evaluate"].append(what)
    rows = list(by_id.values())
    for row in rows:
        row["evaluate"] = [w for w in EVALUATIONS if w in row["evaluate"]]
        row["train_id"] = train_id(row) if row["training"] != "none" else ""
    return rows


EVALUATIONS = ("ppl", "rouge", "zeroshot")


def train_id(row: Mapping[str, Any]) -> str:
    """Id of the trained checkpoint a run uses (shared by runs that differ only in eviction)."""
    method, budget, params = architecture_of(row["method"], row["budget"], row["params"])
    return make_run_id(row["model"], method, budget, row["seed"], training=row["training"], params=params)


def _indexed(cfg: Mapping[str, Any], rows: list[dict] | None) -> dict[str, dict]:
    return {row["run_id"]: row for row in (rows if rows is not None else run_table(cfg))}


def training_spec(cfg: Mapping[str, Any], row: Mapping[str, Any]) -> dict:
    """What decides a run's trained weights: kind, recipe (+ overrides), data, architecture, seed."""
    if row["training"] == "none":
        return {"kind": "none"}
    method, budget, params = architecture_of(row["method"], row["budget"], row["params"])
    section = copy.deepcopy(cfg["training"][row["training"]])
    if row["training"] == "cpt":  # the model's own CPT settings (models[].cpt) over the section's overrides
        section["overrides"] = {**section["overrides"], **model_entry(cfg, row["model"]).get("cpt", {})}
    return {
        "kind": row["training"],
        "train_id": row["train_id"],
        **section,
        # the local copy of its data (null: the hub / cache; corpus and offline are built here)
        "dataset": copy.deepcopy(cfg["datasets"].get(section["data"])),
        "architecture": {"method": method, "budget": budget, "params": params},
        "seed": row["seed"],
    }


#: eval keys every run reads (its texts also give the latency prompts) / only perplexity reads
_EVAL_ALWAYS = ("text_set", "split")
_EVAL_PPL = ("seq_len", "batch_size", "max_tokens", "longrange", "cache_chunk")


def eval_spec(cfg: Mapping[str, Any], row: Mapping[str, Any]) -> tuple[dict, dict]:
    """(eval keys, datasets entries) one run reads: a key it never reads must not rerun it."""
    ev = cfg["eval"]
    spec = {k: copy.deepcopy(ev[k]) for k in _EVAL_ALWAYS}
    if "ppl" in row["evaluate"]:
        spec.update({k: copy.deepcopy(ev[k]) for k in _EVAL_PPL})
    if "rouge" in row["evaluate"]:
        spec["instruct"] = copy.deepcopy(ev["instruct"])
    if "zeroshot" in row["evaluate"]:
        spec["zeroshot"] = copy.deepcopy(ev["zeroshot"])
    names = [ev["text_set"]] + (list(ev["instruct"]["sets"]) if "rouge" in row["evaluate"] else [])
    datasets = {n: copy.deepcopy(cfg["datasets"][n]) for n in names if n in cfg["datasets"]}
    return spec, datasets


def run_spec(cfg: Mapping[str, Any], run_id: str, rows: list[dict] | None = None) -> dict:
    """Everything that determines one run's result (stored as the record's resolved config).

    ``rows``: the precomputed ``run_table(cfg)`` (the workflow computes it once).
    """
    index = _indexed(cfg, rows)
    if run_id not in index:
        raise ConfigError(f"run id {run_id!r} is not in the grid of this config ({len(index)} runs)")
    row = index[run_id]
    model = model_entry(cfg, row["model"])
    evaluated, datasets = eval_spec(cfg, row)
    spec = {
        "run_id": run_id,
        "experiments": list(row["experiments"]),
        "profile": cfg["profile"],
        "model": model,
        "method": row["method"],
        "budget": row["budget"],
        "params": dict(row["params"]),
        "seed": row["seed"],
        "device": cfg["device"],
        "dtype": cfg["dtype"],
        "training": training_spec(cfg, row),
        "evaluate": list(row["evaluate"]),
        "eval": evaluated,
        "datasets": datasets,
        "measure": copy.deepcopy(cfg["measure"]),
    }
    if pretrained_here(model):
        spec["data"] = copy.deepcopy(cfg["data"])
        spec["tokenizer"] = copy.deepcopy(cfg["tokenizer"])
        spec["pretrain"] = pretrain_settings(cfg, model["name"])
    return spec


def train_table(cfg: Mapping[str, Any], rows: list[dict] | None = None) -> dict[str, dict]:
    """Every trained checkpoint the runs need: train_id -> training spec (+ model, dtype, device)."""
    trains: dict[str, dict] = {}
    for row in (rows if rows is not None else run_table(cfg)):
        if row["training"] == "none" or row["train_id"] in trains:
            continue
        model = model_entry(cfg, row["model"])
        spec = {"model": model, "device": cfg["device"], **training_spec(cfg, row)}
        if pretrained_here(model):
            spec["data_build"] = copy.deepcopy(cfg["data"])
            spec["tokenizer"] = copy.deepcopy(cfg["tokenizer"])
            spec["pretrain"] = pretrain_settings(cfg, model["name"])
        trains[row["train_id"]] = spec
    return trains


def run_table_lines(rows: list[dict]) -> list[str]:
    """The sweep table as tab-separated lines, header first (lists comma-joined, params as JSON)."""
    lines = ["\t".join(RUN_TABLE_COLUMNS)]
    for row in rows:
        cells = {**row, "experiments": ",".join(row["experiments"]), "evaluate": ",".join(row["evaluate"]),
                 "params": json.dumps(row["params"], sort_keys=True)}
        lines.append("\t".join(str(cells[c]) for c in RUN_TABLE_COLUMNS))
    return lines


def write_run_table(rows: list[dict], path: str | Path) -> Path:
    """Write the sweep table (one row per run, see run_table_lines) atomically and return its path."""
    from harness.atomic import write_atomic

    return write_atomic(path, "\n".join(run_table_lines(rows)) + "\n")


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


#: The experiment whose runs the cost benchmark times (harness.measurement.bench; `perf`, `pareto`).
BENCH_EXPERIMENT = "main"


def bench_runs(rows: list[dict], model: str) -> tuple[int, list[dict]]:
    """``(seed, rows)``: the benchmark grid's runs of ``model`` at the grid's first seed, in grid order.

    One seed's checkpoints are timed: decode cost follows the architecture and the cache, not the
    values of the weights, and the rounds (not the seeds) give the spread.
    """
    mine = [r for r in rows if BENCH_EXPERIMENT in r["experiments"] and r["model"] == model]
    if not mine:
        raise ConfigError(f"model {model!r} has no run in the {BENCH_EXPERIMENT!r} grid: nothing to benchmark")
    seed = min(r["seed"] for r in mine)
    return seed, [r for r in mine if r["seed"] == seed]


def bench_spec(cfg: Mapping[str, Any], model: str, rows: list[dict], work: str | Path) -> dict:
    """The benchmark job's spec: the model, each run (method, params, training, checkpoint under ``work``;
    the base model first if the grid has no base run), the eval texts the prompts come from, the model's
    longest configured window and the ``perf`` section."""
    seed, mine = bench_runs(rows, model)
    runs = []
    for row in mine:
        spec = run_spec(cfg, row["run_id"], rows)
        runs.append({**{k: spec[k] for k in ("run_id", "method", "budget", "params", "training")},
                     "trained": f"{work}/trained/{row['train_id']}" if row["train_id"] else None})
    if not any(r["method"] == "base" for r in runs):
        # the reference of every ratio; without a base run in the grid, the untrained base model
        # (decode cost follows the architecture and the cache, not the values of the weights)
        runs.insert(0, {"run_id": None, "method": "base", "budget": 1.0, "params": {}, "training": {"kind": "none"},
                        "trained": None})
    first = run_spec(cfg, mine[0]["run_id"], rows)
    entry = model_entry(cfg, model)
    window = max(cfg["eval"]["seq_len"], pretrain_settings(cfg, model)["seq_len"] if pretrained_here(entry) else 0)
    return {"model": entry, "seed": seed, "device": cfg["device"], "dtype": cfg["dtype"], "eval": first["eval"],
            "datasets": first.get("datasets") or {}, "window": int(window), "bench": copy.deepcopy(cfg["perf"]),
            "runs": runs}

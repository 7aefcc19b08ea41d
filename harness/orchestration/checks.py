"""Checks of a resolved config that go beyond its schema, run before the first job.

``validate_config`` calls :func:`check_config` after the schema and before the grid is
expanded; :func:`read_config_file` reads one config file (naming file and line on a YAML
error) and refuses what a merge would silently drop; :func:`check_records` refuses, at
workflow start, an existing record that is no longer valid. Everything here is torch-free
and reads only the config, the workflow's rule files and (for the records) JSON files.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from harness.orchestration.config import REPO_ROOT, ConfigError

#: Experiments with a target rule of their own name (workflow/rules/targets.smk): allowed.
_EXPERIMENT_TARGET = re.compile(r"^rule (\w+):\s*\n\s+input:\s*\n\s+experiment_outputs\(\"\1\"\),?\s*$", re.M)
_RULE = re.compile(r"^rule (\w+):", re.M)
#: Stems of outputs the workflow writes beside experiment tables / figures (results/tables/<stem>.csv,
#: results/figures/<stem>.png): an experiment of that name would share the file with another rule.
GLOBAL_OUTPUT_STEMS = ("all", "pareto", "pareto_bytes", "pareto_latency", "pareto_longrange", "perf",
                       "table9_overheads", "figure1_token_importance")


def read_config_file(path: str | Path) -> dict:
    """One config file as a mapping; ConfigError naming the file (and line) for what cannot be used.

    Refuses an empty ``experiments`` mapping: merged over an earlier file it keeps that file's
    experiments (mappings merge key by key), so the whole default grid would run unasked.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read as text: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config file {path}{where}: YAML syntax error: {reason}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    if isinstance(data.get("experiments"), dict) and not data["experiments"]:
        raise ConfigError(f"config file {path}: config key 'experiments' is an empty mapping; merged over the "
                          "default config it would keep every default experiment. List the experiments to run.")
    return data


@functools.lru_cache(maxsize=1)
def reserved_experiment_names() -> frozenset[str]:
    """Names an experiment may not take: the workflow's rules (targets) and global output stems.

    Read from the rule files, so a new rule is reserved without a second list. The paper's
    experiments whose target rule builds exactly their outputs stay allowed.
    """
    names: set[str] = set(GLOBAL_OUTPUT_STEMS)
    for path in [REPO_ROOT / "Snakefile", *sorted((REPO_ROOT / "workflow" / "rules").glob("*.smk"))]:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            names.update(_RULE.findall(text))
            names.difference_update(_EXPERIMENT_TARGET.findall(text))
    return frozenset(names)


def check_config(cfg: Mapping[str, Any]) -> None:
    """Every rule below on a schema-valid config with defaults; ConfigError listing all problems."""
    problems = [*_experiment_names(cfg), *_paths(cfg), *_recipes(cfg), *_positions(cfg), *_longrange(cfg),
                *_perf(cfg)]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _experiment_names(cfg: Mapping[str, Any]) -> Iterable[str]:
    reserved = reserved_experiment_names()
    for name in cfg["experiments"]:
        if name in reserved:
            yield (f"config key 'experiments.{name}': {name!r} is the name of a workflow target or output "
                   f"(its table would clash with it); reserved names: {', '.join(sorted(reserved))}")


def _paths(cfg: Mapping[str, Any]) -> Iterable[str]:
    for key, value in cfg["paths"].items():
        path = Path(value)
        if path.exists() and not path.is_dir():
            yield f"config key 'paths.{key}': {value!r} exists and is not a directory"
    if Path(cfg["paths"]["work"]).resolve() == Path(cfg["paths"]["results"]).resolve():
        yield f"config key 'paths.results': the same directory as paths.work ({cfg['paths']['work']!r})"


def _recipes(cfg: Mapping[str, Any]) -> Iterable[str]:
    """Each training kind's recipe with its overrides, built as the training job will build it."""
    from harness.training.recipes import Recipe, get_recipe  # torch-free

    known = {f.name for f in dataclasses.fields(Recipe)} - {"name", "kind"}
    for kind, section in cfg["training"].items():
        where = f"config key 'training.{kind}"
        overrides = section["overrides"]
        unknown = sorted(set(overrides) - known)
        if unknown:
            yield f"{where}.overrides': unknown recipe fields {unknown}; known: {sorted(known)}"
            continue
        try:
            recipe = get_recipe(section["recipe"], **overrides)
        except (ValueError, TypeError) as exc:
            yield f"{where}{'.recipe' if 'unknown recipe' in str(exc) else '.overrides'}': {exc}"
            continue
        if recipe.kind != kind:
            yield f"{where}.recipe': {recipe.name!r} is a {recipe.kind} recipe, not a {kind} one"
        elif recipe.total_tokens is not None and recipe.total_tokens < recipe.tokens_per_step:
            yield (f"{where}.overrides.total_tokens': {recipe.total_tokens} tokens are less than one batch "
                   f"(batch_size {recipe.batch_size} x seq_len {recipe.seq_len} = {recipe.tokens_per_step}): "
                   "0 optimiser steps")
        curve = section.get("curve") or {}
        if kind == "cpt" and curve.get("points") and curve["val_tokens"] < recipe.seq_len:
            yield (f"{where}.curve.val_tokens': {curve['val_tokens']} held-out tokens are less than one window "
                   f"of the recipe's seq_len {recipe.seq_len}: the curve would score nothing")


def _positions(cfg: Mapping[str, Any]) -> Iterable[str]:
    """Sequence lengths against the positions of models pretrained here (hub models: unknown here)."""
    from harness.models.shapes import SIZES  # plain data

    measure = cfg["measure"]
    longest = max(measure["context_lengths"])
    lengths = {  # key -> (tokens the model must place, how they add up)
        "measure.context_lengths": (longest + measure["new_tokens"],
                                    f"context length {longest} + measure.new_tokens {measure['new_tokens']} = "),
        "eval.seq_len": (cfg["eval"]["seq_len"], ""),
        # "window" is cut to the positions by the benchmark; a given length is taken as given
        **{f"perf.context_lengths[{i}]": (n + cfg["perf"]["new_tokens"],
                                          f"context length {n} + perf.new_tokens {cfg['perf']['new_tokens']} = ")
           for i, n in enumerate(cfg["perf"]["context_lengths"]) if isinstance(n, int)},
        "eval.cache_tokens": (cfg["eval"]["cache_tokens"], ""),
    }
    for i, model in enumerate(cfg["models"]):
        positions = SIZES.get(model["family"], {}).get(model.get("size"), {}).get("max_position_embeddings")
        if positions is None:
            continue
        own = {**lengths, "pretrain.seq_len": ({**cfg["pretrain"], **model.get("pretrain", {})}["seq_len"], "")}
        for key, (length, how) in own.items():
            if length > positions:
                yield (f"config key '{key}': {how}{length} tokens exceed the {positions} positions of model "
                       f"{model['name']!r} (models[{i}], {model['family']} {model['size']})")


def _longrange(cfg: Mapping[str, Any]) -> Iterable[str]:
    """The long-range task's distance against the windows it is scored in."""
    distance, seq_len = cfg["eval"]["longrange"]["min_distance"], cfg["eval"]["seq_len"]
    if distance is not None and cfg["eval"]["text_set"] != "corpus":
        yield (f"config key 'eval.longrange.min_distance': the long-range task finds identifiers with Python's "
               f"tokenizer, so it needs the Python corpus (eval.text_set corpus), not {cfg['eval']['text_set']!r}; "
               "set it to null")
    if distance is not None and distance >= seq_len:
        yield (f"config key 'eval.longrange.min_distance': {distance} tokens is not below eval.seq_len {seq_len}: "
               "no previous occurrence that far back can lie inside a scored window, so no token would qualify")


def _perf(cfg: Mapping[str, Any]) -> Iterable[str]:
    """The cost benchmark's context lengths, each once (``window`` may coincide with a given length: deduplicated)."""
    lengths = list(cfg["perf"]["context_lengths"])
    if len(set(map(str, lengths))) != len(lengths):
        yield f"config key 'perf.context_lengths': {lengths} lists a context length twice"


def check_records(records_dir: str | Path, run_ids: Iterable[str]) -> None:
    """Refuse (ConfigError naming each file) existing records of ``run_ids`` that are not valid records.

    Snakemake judges an output by its existence and time stamp only, so a record truncated or
    edited by hand would count as done; checking them at workflow start makes it loud.
    """
    from harness.orchestration.records import read_record

    bad = []
    for run_id in run_ids:
        path = Path(records_dir) / f"{run_id}.json"
        if path.exists():
            try:
                read_record(path)
            except (ValueError, OSError) as exc:
                text = " ".join(line.strip() for line in str(exc).splitlines())
                bad.append(text if str(path) in text else f"{path}: {text}")
    if bad:
        raise ConfigError("corrupt records (delete them to rerun their runs):\n  " + "\n  ".join(bad))

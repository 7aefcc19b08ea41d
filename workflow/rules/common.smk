# Shared set-up: config validation, paths, the run grid, input and param helpers.
import json
import os
import sys
from pathlib import Path

# `python -m harness` finds the package from the repository root (the working directory);
# the Snakefile itself imports it the same way, installed or not.
sys.path.insert(0, str(Path(workflow.basedir)))
# Rules run `python`: make that the interpreter running Snakemake, so that `.venv/bin/snakemake`
# works without activating the venv. (With --sdm conda, activation puts the env's python first.)
os.environ.update(PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))

from harness.config import (
    code_hash,
    model_entry,
    pretrain_settings,
    pretrained_here,
    run_spec,
    run_table,
    validate_config,
    write_run_table,
)

# Rejects a bad config here, before Snakemake builds a single job (ConfigError names the key).
config.update(validate_config(config))

WORK = config["paths"]["work"]
RESULTS = config["paths"]["results"]
ENV = "../../environment.yml"
CORPUS = f"{WORK}/data/corpus"
INSTRUCT = f"{WORK}/data/instruct"
TOKENIZER = f"{WORK}/tokenizer"
RUNS = run_table(config)
RUN_IDS = [row["run_id"] for row in RUNS]
PRETRAINED = [m["name"] for m in config["models"] if pretrained_here(m)]
USES_CORPUS = bool(PRETRAINED) or config["eval"]["text_set"] == "corpus"

# Source files each stage runs; their hash is a param, so editing the code reruns the stage.
CODE = {
    "corpus": ["harness/corpus.py"],
    "instruct": ["harness/instruct.py", "harness/corpus.py"],
    "tokenizer": ["harness/tokenizer.py"],
    "unigram": ["harness/perplexity.py", "harness/tokenizer.py"],
    "pretrain": ["harness/pretrain.py", "harness/zoo.py", "harness/tokenizer.py"],
    "run": [
        "harness/run.py",
        "harness/perplexity.py",
        "harness/zoo.py",
        "harness/records.py",
        "harness/provenance.py",
        "harness/hub_data.py",
        "mixsga/budget.py",
    ],
    # every method other than 'base' comes from the registry and the method packages
    "method": ["harness/methods.py", "mixsga", "baselines"],
    "analysis": ["analysis"],
}


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9.-]*",
    run_id=r"[A-Za-z0-9][A-Za-z0-9.-]*__[^/_][^/]*__kv[0-9.]+__s[0-9]+",
    split=r"validation|test",


def all_targets():
    """Everything `snakemake` builds by default: the grid table, one record per run, tables, figures."""
    targets = [
        f"{RESULTS}/runs.tsv",
        f"{RESULTS}/tables/all.csv",
        f"{RESULTS}/tables/perplexity.csv",
        f"{RESULTS}/tables/perplexity.md",
        f"{RESULTS}/figures/perplexity.png",
    ]
    if USES_CORPUS:
        targets.append(INSTRUCT)
    return targets


def max_tokens_arg():
    """`--max-tokens N` when the eval is capped, so the unigram floor scores the runs' tokens."""
    n = config["eval"]["max_tokens"]
    return "" if n is None else f"--max-tokens {n}"


def model_field(name):
    """A param function reading one field of the model's entry (for `rule pretrain`)."""
    return lambda wildcards: model_entry(config, wildcards.model)[name]


def recipe(name):
    """A param function reading one pretraining setting of the model (its own, else the default)."""
    return lambda wildcards: pretrain_settings(config, wildcards.model)[name]


def run_inputs(wildcards):
    """Inputs of one run: its base model if pretrained here, the corpus, the unigram reference."""
    spec = run_spec(config, wildcards.run_id)
    inputs = {}
    if spec["eval"]["text_set"] == "corpus" or pretrained_here(spec["model"]):
        inputs["corpus"] = CORPUS
    if pretrained_here(spec["model"]):
        inputs["model"] = f"{WORK}/models/{spec['model']['name']}/base"
        # the shared tokenizer's unigram floor only means something for models that use it
        inputs["unigram"] = f"{WORK}/reference/unigram_{spec['eval']['split']}.json"
    return inputs


def run_optional_args(wildcards, input):
    """Command-line flags for the inputs this run has (hub models have no --model)."""
    names = [name for name in ("model", "corpus", "unigram") if name in input.keys()]
    return " ".join(f"--{name} {getattr(input, name)}" for name in names)


def run_code(wildcards):
    """Hash of the code one run executes (method packages only for methods other than base)."""
    spec = run_spec(config, wildcards.run_id)
    files = CODE["run"] + (CODE["method"] if spec["method"] != "base" else [])
    return code_hash(files)

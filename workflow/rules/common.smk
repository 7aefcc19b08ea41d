# Shared set-up: config validation, paths, the run grid (expanded once), input and param helpers.
import functools
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

from harness.orchestration.config import (
    architecture_of,
    check_offline,
    code_hash,
    load_config,
    model_entry,
    pretrain_settings,
    pretrained_here,
    run_spec,
    run_table,
    train_table,
    validate_config,
    write_run_table,
)

# Snakemake merged the config files key by key. Resolve them again, in the same order, by the
# profile rule of harness.orchestration.config.merge_config (a later file's recipe overrides and
# experiment entries replace the earlier ones whole), so the workflow and `python -m harness`
# resolve a profile alike. load_config validates: a bad config stops here, before any job.
_cli_files = [Path(f).absolute() for f in workflow.overwrite_configfiles]
_own_files = [Path(f) for f in workflow.configfiles if Path(f).absolute() not in _cli_files]
_resolved = load_config(_own_files + _cli_files, overrides=dict(workflow.config_settings.config or {}))
config.clear()
config.update(_resolved)

WORK = config["paths"]["work"]
RESULTS = config["paths"]["results"]
ENV = "../../environment.yml"
CORPUS = f"{WORK}/data/corpus"
INSTRUCT = f"{WORK}/data/instruct"
TOKENIZER = f"{WORK}/tokenizer"
# The grid, expanded once: every run of every experiment, shared runs once.
RUNS = run_table(config)
RUN_INDEX = {row["run_id"]: row for row in RUNS}
RUN_IDS = list(RUN_INDEX)
TRAINS = train_table(config, RUNS)
# With HF_HUB_OFFLINE=1, a model, dataset or zero-shot task only the hub has stops the workflow
# here, named, instead of failing (or waiting through retries) inside a job.
check_offline(config, RUNS)
EXPERIMENTS = list(config["experiments"])
PRETRAINED = [m["name"] for m in config["models"] if pretrained_here(m)]
# The paper's experiments, each with a target rule of its name (workflow/rules/targets.smk).
NAMED_EXPERIMENTS = [
    "table1_sft",
    "table2_cpt",
    "table3_eviction_stack",
    "table4_middle_ratio",
    "table5_expert_count",
    "table6_router",
    "table11_ratio_grid",
    "figure3_budget_sweep",
]
# The grid behind `pareto` and `perf`.
MAIN = "main"

# Source files each stage runs; their hash is a param, so editing the code reruns the stage.
CODE = {
    "corpus": ["harness/data/corpus.py"],
    "instruct": ["harness/data/instruct.py", "harness/data/corpus.py"],
    "tokenizer": ["harness/data/tokenizer.py"],
    "unigram": ["harness/evaluation/perplexity.py", "harness/data/tokenizer.py"],
    "pretrain": ["harness/training/pretrain.py", "harness/models/zoo.py", "harness/models/shapes.py", "harness/data/tokenizer.py"],
    "train": [
        "harness/training/train.py",
        "harness/training/recipes.py",
        "harness/orchestration/run.py",
        "harness/models/zoo.py",
        "harness/models/shapes.py",
        "harness/methods/__init__.py",
        "harness/evaluation/perplexity.py",
        "harness/data/corpus.py",
        "harness/data/instruct.py",
        "harness/data/hub_data.py",
    ],
    "run": [
        "harness/orchestration/run.py",
        "harness/evaluation/perplexity.py",
        "harness/evaluation/evaluate.py",
        "harness/measurement/measure.py",
        "harness/models/zoo.py",
        "harness/models/shapes.py",
        "harness/orchestration/records.py",
        "harness/orchestration/provenance.py",
        "harness/data/hub_data.py",
        "harness/methods/__init__.py",
        "mixsga/budget.py",
    ],
    "zeroshot": ["harness/evaluation/lm_eval_adapter.py"],
    "token_importance": ["harness/evaluation/token_importance.py"],
    "overheads": ["harness/measurement/overheads.py", "harness/measurement/measure.py", "harness/methods/__init__.py", "mixsga", "baselines"],
    "analysis": ["analysis"],
}
# The code of each method: changing it reruns that method's runs (and only those).
METHOD_CODE = {
    "base": [],
    "gqa": ["baselines/gqa.py", "baselines/attention.py"],
    "mqa": ["baselines/gqa.py", "baselines/attention.py"],
    "cla": ["baselines/cla.py", "baselines/gqa.py", "baselines/attention.py"],
    "mixsga": ["mixsga"],
    "eviction": ["baselines/eviction.py", "baselines/attention.py"],
}


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9.-]*",
    run_id=r"[A-Za-z0-9][^/]*__s[0-9]{1,9}",
    train_id=r"[A-Za-z0-9][^/]*__s[0-9]{1,9}",
    experiment="|".join(EXPERIMENTS),
    split=r"validation|test",


@functools.lru_cache(maxsize=None)
def cached_code_hash(files):
    """code_hash of a tuple of paths, computed once per workflow invocation."""
    return code_hash(list(files))


def method_code(method):
    """The method packages a method (plain, eviction, or eviction stacked on gqa / mixsga) executes."""
    inner = architecture_of(method, 0.5, {})[0]
    files = list(METHOD_CODE[inner])
    if inner != method:
        files += METHOD_CODE["eviction"]
        if inner == "mixsga":
            files.append("mixsga/eviction.py")
    return files


def records_of(experiment):
    """Record paths of one experiment's runs."""
    if experiment not in config["experiments"]:
        raise ValueError(
            f"experiment {experiment!r} is not in this config; its experiments are {EXPERIMENTS}"
        )
    return [f"{RESULTS}/records/{r['run_id']}.json" for r in RUNS if experiment in r["experiments"]]


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


def _model_input(model, inputs):
    if pretrained_here(model):
        inputs["model"] = f"{WORK}/models/{model['name']}/base"


def train_inputs(wildcards):
    """Inputs of one training: the base model if pretrained here, and its offline data."""
    spec = TRAINS[wildcards.train_id]
    inputs = {}
    _model_input(spec["model"], inputs)
    if spec["kind"] == "cpt" and spec["data"] == "corpus":
        inputs["corpus"] = CORPUS
    if spec["kind"] == "sft" and spec["data"] == "offline":
        inputs["instruct"] = INSTRUCT
    return inputs


def train_code(wildcards):
    """Hash of the code one training executes."""
    spec = TRAINS[wildcards.train_id]
    return cached_code_hash(tuple(CODE["train"] + method_code(spec["architecture"]["method"])))


def run_inputs(wildcards):
    """Inputs of one run: base model, trained checkpoint, corpus, instruction set, unigram floor."""
    row = RUN_INDEX[wildcards.run_id]
    model = model_entry(config, row["model"])
    inputs = {}
    _model_input(model, inputs)
    if row["train_id"]:
        inputs["trained"] = f"{WORK}/trained/{row['train_id']}"
    if config["eval"]["text_set"] == "corpus" or pretrained_here(model):
        inputs["corpus"] = CORPUS
    if "rouge" in row["evaluate"] and "offline" in config["eval"]["instruct"]["sets"]:
        inputs["instruct"] = INSTRUCT
    if pretrained_here(model) and "ppl" in row["evaluate"]:
        # the shared tokenizer's unigram floor only means something for models that use it
        inputs["unigram"] = f"{WORK}/reference/unigram_{config['eval']['split']}.json"
    return inputs


def optional_args(names):
    """A param function: `--name path` for each of `names` the job has as an input."""

    def args(wildcards, input):
        return " ".join(f"--{n} {getattr(input, n)}" for n in names if n in input.keys())

    return args


def run_code(wildcards):
    """Hash of the code one run executes (its method's packages included)."""
    row = RUN_INDEX[wildcards.run_id]
    files = CODE["run"] + method_code(row["method"])
    if row["train_id"]:
        files += CODE["train"]
    if "zeroshot" in row["evaluate"]:
        files += CODE["zeroshot"]
    return cached_code_hash(tuple(files))


def figure1_model():
    """The model Figure 1 perturbs: the configured one, else the first."""
    name = config["figure1"]["model"] or config["models"][0]["name"]
    return model_entry(config, name)


#: Experiments with a figure of their own (quality against the realized budget).
FIGURE_EXPERIMENTS = ["figure3_budget_sweep"]


def overheads_checkpoints():
    """The config models whose own checkpoints Table 9 times (default: every model not pretrained here)."""
    names = config["overheads"]["checkpoints"]
    if names is None:
        return [m["name"] for m in config["models"] if not pretrained_here(m)]
    return list(names)  # validated: hub models of this config


def figure1_text_path():
    """`--text-path` of Figure 1's hub text set when `datasets.<set>.path` gives a local copy."""
    source = config["datasets"].get(config["figure1"]["text_set"]) or {}
    return f"--text-path {source['path']}" if source.get("path") else ""


def figure1_inputs(wildcards):
    """Figure 1's model (if pretrained here) and the corpus (offline text set)."""
    inputs = {}
    _model_input(figure1_model(), inputs)
    if config["figure1"]["text_set"] == "stdlib":
        inputs["corpus"] = CORPUS
    return inputs


def experiment_outputs(experiment):
    """What an experiment's target builds: its paper-shaped table (CSV + Markdown) and figure."""
    outputs = [f"{RESULTS}/tables/{experiment}.csv", f"{RESULTS}/tables/{experiment}.md"]
    if experiment in FIGURE_EXPERIMENTS:
        outputs.append(f"{RESULTS}/figures/{experiment}.png")
    return outputs


# The `main` grid's fronts, and its whole table (every family x method x budget) beside them.
PARETO_OUTPUTS = [
    f"{RESULTS}/tables/pareto.csv",
    f"{RESULTS}/tables/pareto.md",
    f"{RESULTS}/figures/pareto_bytes.png",
    f"{RESULTS}/figures/pareto_latency.png",
] + experiment_outputs(MAIN)
PERF_OUTPUTS = [f"{RESULTS}/tables/perf.csv", f"{RESULTS}/tables/perf.md", f"{RESULTS}/figures/perf.png"]
FIGURE1_OUTPUTS = [f"{RESULTS}/figures/figure1_token_importance.png"]
TABLE9_OUTPUTS = [f"{RESULTS}/tables/table9_overheads.csv", f"{RESULTS}/tables/table9_overheads.md"]


def all_targets():
    """Everything `snakemake` builds by default: every experiment's outputs and the global targets."""
    targets = [f"{RESULTS}/runs.tsv", f"{RESULTS}/tables/all.csv"]
    for experiment in EXPERIMENTS:
        if experiment != MAIN:
            targets += experiment_outputs(experiment)
    if MAIN in config["experiments"]:
        targets += PARETO_OUTPUTS + PERF_OUTPUTS
    targets += FIGURE1_OUTPUTS
    targets += TABLE9_OUTPUTS
    return targets

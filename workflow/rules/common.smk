# Shared set-up: config validation, paths, the run grid (expanded once), input and param helpers.
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

from harness.orchestration.codehash import CodeHashes
from harness.orchestration.config import (
    BENCH_EXPERIMENT,
    bench_runs,
    bench_spec,
    check_offline,
    model_entry,
    pretrain_settings,
    pretrained_here,
    resolve_config,
    run_spec,
    run_table,
    train_table,
    write_run_table,
)
from harness.orchestration.checks import check_records

# Rejects a bad config here, before Snakemake builds a single job (ConfigError names the key).
# The config is resolved as `python -m harness check-config` resolves it (config/config.yaml,
# then --configfile files, then --config), by the same function: the two cannot disagree.
_resolved = resolve_config(workflow.config_settings.configfiles, dict(workflow.config_settings.config))
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
# A record truncated or edited by hand still looks done to Snakemake (it exists, it is new):
# refuse it here, naming the file, rather than collate it or report "nothing to be done".
if config["check_records"]:
    check_records(f"{RESULTS}/records", RUN_IDS)
TRAINS = train_table(config, RUNS)
# With HF_HUB_OFFLINE=1, a model, dataset or zero-shot task only the hub has stops the workflow
# here, named, instead of failing (or waiting through retries) inside a job.
check_offline(config, RUNS)
EXPERIMENTS = list(config["experiments"])
# What `snakemake` without a target builds (config `default_skip` leaves experiments to their own targets).
DEFAULT_EXPERIMENTS = [name for name in EXPERIMENTS if name not in config["default_skip"]]
DEFAULT_RUN_IDS = [r["run_id"] for r in RUNS if set(r["experiments"]) & set(DEFAULT_EXPERIMENTS)]
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
MAIN = BENCH_EXPERIMENT  # harness.orchestration.config: the benchmark times the same grid

# Each job's code hash is a param, so editing code reruns exactly the jobs that run it. The hashes
# follow the imports of the module each job runs, parsed once, here (harness/orchestration/codehash.py).
CODE_HASHES = CodeHashes(Path(workflow.basedir))


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9.-]*",
    run_id=r"[A-Za-z0-9][^/]*__s[0-9]{1,9}",
    train_id=r"[A-Za-z0-9][^/]*__s[0-9]{1,9}",
    experiment="|".join(EXPERIMENTS),
    split=r"validation|test",
    instruct_set=r"[A-Za-z0-9_-]+",


def command_code(command):
    """Hash of the code `python -m <command>` runs: "harness corpus", "analysis collate", a module."""
    return CODE_HASHES.command_hash(command)


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
    """Hash of the code one training executes: `harness train` and its method's modules."""
    spec = TRAINS[wildcards.train_id]
    return CODE_HASHES.method_job_hash("harness train", spec["architecture"]["method"])


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
    """Hash of the code one run executes: `harness run` and its method's modules."""
    row = RUN_INDEX[wildcards.run_id]
    return CODE_HASHES.method_job_hash("harness run", row["method"])


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
# The long-range task's front (long-range perplexity vs KV bytes), when eval.longrange scores it.
PARETO_LONGRANGE = (
    {"png_longrange": f"{RESULTS}/figures/pareto_longrange.png"}
    if config["eval"]["longrange"]["min_distance"] is not None
    else {}
)
PARETO_OUTPUTS += list(PARETO_LONGRANGE.values())


def trivial_references(experiment):
    """The trivial-reference ROUGE-L files an experiment's table prints beside it: one per instruction set
    its runs score (none for an experiment without ROUGE-L). Computed once per set, shared by the tables."""
    if not any(experiment in r["experiments"] and "rouge" in r["evaluate"] for r in RUNS):
        return []
    return [f"{WORK}/reference/trivial_rouge_{name}.json" for name in config["eval"]["instruct"]["sets"]]


def trivial_reference_inputs(wildcards):
    """The offline instruction set's directory (hub sets are read where datasets.<name> says)."""
    return {"instruct": INSTRUCT} if wildcards.instruct_set == "offline" else {}


# Held-out perplexity against uptraining tokens of the `main` grid's CPT runs (analysis/curves.py).
RECOVERY_OUTPUTS = [
    f"{RESULTS}/figures/recovery_curves.png",
    f"{RESULTS}/tables/recovery_curves.csv",
    f"{RESULTS}/tables/recovery_curves.md",
]


def recovery_records():
    """Records of the runs the recovery curves compare: the `main` grid's CPT'd base, GQA / CLA / mixSGA 50 %, MQA.

    The same selection as analysis.curves.selected, applied here so the target waits for these runs only.
    """
    from analysis.curves import selected

    return [
        f"{RESULTS}/records/{r['run_id']}.json"
        for r in RUNS
        if MAIN in r["experiments"] and r["training"] == "cpt" and selected(r["method"], r["budget"], r["params"])
    ]


# The cost benchmark: one job per model of the main grid, on the grid's first seed's checkpoints
# (timing does not need every seed: the weights' values barely move decode cost; the repeats do).
PERF_MODELS = sorted({r["model"] for r in RUNS if BENCH_EXPERIMENT in r["experiments"]})
PERF_BENCH = [f"{RESULTS}/perf/{name}.json" for name in PERF_MODELS]


def perf_spec(model):
    """The benchmark job's spec (harness.orchestration.config.bench_spec)."""
    return bench_spec(config, model, RUNS, WORK)


def perf_inputs(wildcards):
    """Inputs of one benchmark job: the base model if pretrained here, every trained checkpoint, the corpus."""
    _, rows = bench_runs(RUNS, wildcards.model)
    model = model_entry(config, wildcards.model)
    inputs = {"trained": sorted({f"{WORK}/trained/{r['train_id']}" for r in rows if r["train_id"]})}
    _model_input(model, inputs)
    if config["eval"]["text_set"] == "corpus" or pretrained_here(model):
        inputs["corpus"] = CORPUS
    return inputs


def bench_code(wildcards):
    """Hash of the code one benchmark job executes: the benchmark and every method it times."""
    _, rows = bench_runs(RUNS, wildcards.model)
    return CODE_HASHES.methods_job_hash("harness.measurement.bench", sorted({r["method"] for r in rows}))


PERF_OUTPUTS = [f"{RESULTS}/tables/perf.csv", f"{RESULTS}/tables/perf.md", f"{RESULTS}/figures/perf.png"]
FIGURE1_OUTPUTS = [f"{RESULTS}/figures/figure1_token_importance.png"]
TABLE9_OUTPUTS = [f"{RESULTS}/tables/table9_overheads.csv", f"{RESULTS}/tables/table9_overheads.md"]


def all_targets():
    """Everything `snakemake` builds by default: every experiment's outputs and the global targets."""
    targets = [f"{RESULTS}/runs.tsv", f"{RESULTS}/tables/all.csv"]
    for experiment in DEFAULT_EXPERIMENTS:
        if experiment != MAIN:
            targets += experiment_outputs(experiment)
    if MAIN in DEFAULT_EXPERIMENTS:
        targets += PARETO_OUTPUTS + PERF_OUTPUTS
        if recovery_records():
            targets += RECOVERY_OUTPUTS
    targets += FIGURE1_OUTPUTS
    targets += TABLE9_OUTPUTS
    return targets

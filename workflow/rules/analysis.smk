# Analysis: records -> tidy tables -> per-experiment tables (mean ± 95 % CI over seeds) and
# figures. Reads only the records; each rule is one `python -m analysis ...` call
# (the subcommands are listed in results/README.md).


rule collate_all:
    input:
        # the runs `snakemake` builds by default (those of `default: false` experiments only when asked for)
        records=expand(f"{RESULTS}/records/{{run_id}}.json", run_id=DEFAULT_RUN_IDS),
    output:
        f"{RESULTS}/tables/all.csv",
    params:
        code=command_code("analysis collate"),
    log:
        f"{RESULTS}/logs/collate_all.log",
    conda:
        ENV
    shell:
        "python -m analysis collate {input.records} --all-csv {output} > {log} 2>&1"


rule collate_experiment:
    input:
        records=lambda wildcards: records_of(wildcards.experiment),
    output:
        f"{RESULTS}/tables/records/{{experiment}}.csv",
    params:
        code=command_code("analysis collate"),
    log:
        f"{RESULTS}/logs/collate_{{experiment}}.log",
    conda:
        ENV
    shell:
        "python -m analysis collate {input.records} --all-csv {output} > {log} 2>&1"


rule experiment:
    input:
        table=f"{RESULTS}/tables/records/{{experiment}}.csv",
        references=lambda wildcards: trivial_references(wildcards.experiment),
    output:
        csv=report(
            f"{RESULTS}/tables/{{experiment}}.csv",
            caption="../report/experiment_table.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
        md=f"{RESULTS}/tables/{{experiment}}.md",
    params:
        references=lambda wildcards, input: " ".join(f"--reference {p}" for p in input.references),
        code=command_code("analysis table"),
    log:
        f"{RESULTS}/logs/experiment_{{experiment}}.log",
    conda:
        ENV
    shell:
        "python -m analysis table --table {input.table} --experiment {wildcards.experiment} "
        "--csv {output.csv} --md {output.md} {params.references} > {log} 2>&1"


rule experiment_figure:
    input:
        table=f"{RESULTS}/tables/records/{{experiment}}.csv",
    output:
        report(
            f"{RESULTS}/figures/{{experiment}}.png",
            caption="../report/experiment_figure.rst",
            category="Experiments",
            subcategory="{experiment}",
        ),
    params:
        code=command_code("analysis figure3"),
    log:
        f"{RESULTS}/logs/experiment_figure_{{experiment}}.log",
    conda:
        ENV
    shell:
        "python -m analysis figure3 --table {input.table} --experiment {wildcards.experiment} "
        "--out {output} > {log} 2>&1"


rule pareto_tables:
    input:
        table=f"{RESULTS}/tables/records/{MAIN}.csv",
        bench=PERF_BENCH,
    output:
        csv=report(PARETO_OUTPUTS[0], caption="../report/pareto.rst", category="Pareto"),
        md=PARETO_OUTPUTS[1],
        png_bytes=report(PARETO_OUTPUTS[2], caption="../report/pareto.rst", category="Pareto"),
        png_latency=report(PARETO_OUTPUTS[3], caption="../report/pareto.rst", category="Pareto"),
        **{k: report(v, caption="../report/pareto.rst", category="Pareto") for k, v in PARETO_LONGRANGE.items()},
    params:
        experiment=MAIN,
        code=command_code("analysis pareto"),
        longrange=" ".join(f"--longrange-figure {v}" for v in PARETO_LONGRANGE.values()),
    log:
        f"{RESULTS}/logs/pareto.log",
    conda:
        ENV
    shell:
        "python -m analysis pareto --table {input.table} --experiment {params.experiment} --csv {output.csv} "
        "--md {output.md} --kv-figure {output.png_bytes} --latency-figure {output.png_latency} {params.longrange} "
        "--bench {input.bench} "
        "> {log} 2>&1"


rule perf_tables:
    input:
        table=f"{RESULTS}/tables/records/{MAIN}.csv",
        bench=PERF_BENCH,
    output:
        csv=report(PERF_OUTPUTS[0], caption="../report/perf.rst", category="Performance"),
        md=PERF_OUTPUTS[1],
        png=report(PERF_OUTPUTS[2], caption="../report/perf.rst", category="Performance"),
    params:
        code=command_code("analysis perf"),
    log:
        f"{RESULTS}/logs/perf.log",
    conda:
        ENV
    shell:
        "python -m analysis perf --table {input.table} --bench {input.bench} --csv {output.csv} --md {output.md} "
        "--figure {output.png} > {log} 2>&1"


rule recovery_curves_tables:
    input:
        records=recovery_records(),
    output:
        png=report(RECOVERY_OUTPUTS[0], caption="../report/recovery_curves.rst", category="Recovery curves"),
        csv=RECOVERY_OUTPUTS[1],
        md=RECOVERY_OUTPUTS[2],
    params:
        code=command_code("analysis recovery"),
    log:
        f"{RESULTS}/logs/recovery_curves.log",
    conda:
        ENV
    shell:
        "python -m analysis recovery {input.records} --csv {output.csv} --md {output.md} "
        "--figure {output.png} > {log} 2>&1"


rule trivial_reference:
    input:
        unpack(trivial_reference_inputs),
    output:
        f"{WORK}/reference/trivial_rouge_{{instruct_set}}.json",
    params:
        split=config["eval"]["instruct"]["split"],
        max_rows=lambda wildcards: (
            ""
            if config["eval"]["instruct"]["max_rows"] is None
            else f"--max-rows {config['eval']['instruct']['max_rows']}"
        ),
        instruct=optional_args(["instruct"]),
        source=lambda wildcards: json.dumps(config["datasets"].get(wildcards.instruct_set) or {}, sort_keys=True),
        code=command_code("harness.evaluation.instruct_reference"),
    log:
        f"{RESULTS}/logs/trivial_reference_{{instruct_set}}.log",
    conda:
        ENV
    shell:
        "python -m harness.evaluation.instruct_reference --set {wildcards.instruct_set} --split {params.split} "
        "{params.max_rows} {params.instruct} --source {params.source:q} --out {output} > {log} 2>&1"

# Runs: one training job per distinct checkpoint, one run job per run (one JSON record each).
# A new method, budget, family or experiment is a config entry; these rules do not change.


rule grid:
    output:
        f"{RESULTS}/runs.tsv",
    params:
        rows=RUNS,
    log:
        f"{RESULTS}/logs/grid.log",
    run:
        write_run_table(params.rows, output[0])


rule train:
    input:
        unpack(train_inputs),
    output:
        directory(f"{WORK}/trained/{{train_id}}"),
    params:
        spec=lambda wildcards: json.dumps(TRAINS[wildcards.train_id], sort_keys=True),
        optional=optional_args(["model", "corpus", "instruct"]),
        code=train_code,
    threads: config["threads"]
    resources:
        gpu=lambda wildcards: int(config["device"] == "cuda"),
    log:
        f"{RESULTS}/logs/train/{{train_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{train_id}}.tsv"
    conda:
        ENV
    shell:
        "python -m harness train --spec {params.spec:q} {params.optional} "
        "--out {output} --threads {threads} > {log} 2>&1"


rule run:
    input:
        unpack(run_inputs),
    output:
        f"{RESULTS}/records/{{run_id}}.json",
    params:
        spec=lambda wildcards: json.dumps(run_spec(config, wildcards.run_id, RUNS), sort_keys=True),
        optional=optional_args(["model", "trained", "corpus", "instruct", "unigram"]),
        predictions=f"{RESULTS}/predictions",
        code=run_code,
    threads: config["threads"]
    resources:
        gpu=lambda wildcards: int(config["device"] == "cuda"),
    log:
        f"{RESULTS}/logs/runs/{{run_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/runs/{{run_id}}.tsv"
    conda:
        ENV
    shell:
        "python -m harness run --spec {params.spec:q} {params.optional} --predictions {params.predictions} "
        "--code {params.code} --out {output} --threads {threads} > {log} 2>&1"


rule perf_bench:
    input:
        unpack(perf_inputs),
    output:
        f"{RESULTS}/perf/{{model}}.json",
    params:
        spec=lambda wildcards: json.dumps(perf_spec(wildcards.model), sort_keys=True),
        optional=optional_args(["model", "corpus"]),
        torch_threads=config["threads"],
        code=bench_code,
    # Alone: every other job claims at least one core, so a job claiming all of them runs by itself
    # (`--cores all` or `--cores N`); torch still uses `threads`, as each run's own timing did.
    threads: lambda wildcards: workflow.cores  # a function: read at scheduling, so `--report` (no --cores) still loads
    resources:
        gpu=lambda wildcards: int(config["device"] == "cuda"),
    log:
        f"{RESULTS}/logs/perf/{{model}}.log",
    conda:
        ENV
    shell:
        "python -m harness.measurement.bench --spec {params.spec:q} {params.optional} --code {params.code} "
        "--threads {params.torch_threads} --out {output} > {log} 2>&1"

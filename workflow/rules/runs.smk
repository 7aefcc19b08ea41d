# Runs: one job per grid cell (model x method x budget x seed), one JSON record each.
# A new method or budget is a config entry; this rule does not change.


rule grid:
    output:
        f"{RESULTS}/runs.tsv",
    params:
        rows=RUNS,
    log:
        f"{RESULTS}/logs/grid.log",
    run:
        write_run_table(params.rows, output[0])


rule run:
    input:
        unpack(run_inputs),
    output:
        f"{RESULTS}/records/{{run_id}}.json",
    params:
        spec=lambda wildcards: json.dumps(run_spec(config, wildcards.run_id), sort_keys=True),
        optional=run_optional_args,
        code=run_code,
    threads: config["threads"]
    log:
        f"{RESULTS}/logs/runs/{{run_id}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/runs/{{run_id}}.tsv"
    conda:
        ENV
    shell:
        "python -m harness run --spec {params.spec:q} {params.optional} "
        "--out {output} --threads {threads} > {log} 2>&1"

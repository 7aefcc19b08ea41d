# Targets named after the paper's experiments; each is runnable alone
# (`snakemake --cores all table1_sft`) and builds only what it needs.


rule token_importance:
    input:
        unpack(figure1_inputs),
    output:
        f"{RESULTS}/figure1_token_importance.json",
    params:
        seq_tokens=config["figure1"]["seq_tokens"],
        batch_size=config["figure1"]["batch_size"],
        text_set=config["figure1"]["text_set"],
        model=lambda wildcards, input: input.model if "model" in input.keys() else figure1_model()["hub"],
        text_path=lambda wildcards, input: (
            f"--text-path {input.corpus}" if "corpus" in input.keys() else figure1_text_path()
        ),
        device=config["device"],
        dtype=config["dtype"],
        code=command_code("harness.evaluation.token_importance"),
    threads: config["threads"]
    log:
        f"{RESULTS}/logs/token_importance.log",
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m harness.evaluation.token_importance --model {params.model} "
        "--text-set {params.text_set} {params.text_path} --seq-tokens {params.seq_tokens} "
        "--batch-size {params.batch_size} --device {params.device} --dtype {params.dtype} "
        "--out {output} > {log} 2>&1"


rule figure1_tables:
    input:
        f"{RESULTS}/figure1_token_importance.json",
    output:
        report(FIGURE1_OUTPUTS[0], caption="../report/figure1.rst", category="Figure 1"),
    params:
        code=command_code("analysis figure1"),
    log:
        f"{RESULTS}/logs/figure1.log",
    conda:
        ENV
    shell:
        "python -m analysis figure1 --json {input} --out {output} > {log} 2>&1"


rule overheads:
    input:
        models=[f"{WORK}/models/{name}/base" for name in PRETRAINED],
    output:
        f"{RESULTS}/table9_overheads.json",
    params:
        zoo=lambda wildcards, input: str(Path(input.models[0]).parent.parent) if input.models else "''",
        families=",".join(sorted({m["family"] for m in config["models"] if pretrained_here(m)}))
        or ("''" if overheads_checkpoints() else "llama3"),
        checkpoints=",".join(f"{name}={model_entry(config, name)['hub']}" for name in overheads_checkpoints()),
        paper_models=(
            ""
            if config["overheads"]["paper_models"] is None
            else f"--paper-models {','.join(config['overheads']['paper_models'])}"
        ),
        time_paper=",".join(config["overheads"]["time_paper_models"]),
        prompt_tokens=config["overheads"]["prompt_tokens"],
        new_tokens=config["overheads"]["new_tokens"],
        repeats=config["overheads"]["repeats"],
        device=config["device"],
        dtype=config["dtype"],
        code=command_code("harness.measurement.overheads"),
    threads: config["threads"]
    log:
        f"{RESULTS}/logs/overheads.log",
    conda:
        ENV
    shell:
        "OMP_NUM_THREADS={threads} python -m harness.measurement.overheads --zoo {params.zoo} --families {params.families} "
        "{params.paper_models} --time-paper-models '{params.time_paper}' --checkpoints '{params.checkpoints}' "
        "--prompt-tokens {params.prompt_tokens} "
        "--new-tokens {params.new_tokens} --repeats {params.repeats} --device {params.device} "
        "--dtype {params.dtype} --out {output} > {log} 2>&1"


rule table9_tables:
    input:
        f"{RESULTS}/table9_overheads.json",
    output:
        csv=report(TABLE9_OUTPUTS[0], caption="../report/table9.rst", category="Tables 9 and 10"),
        md=TABLE9_OUTPUTS[1],
    params:
        code=command_code("analysis table9"),
    log:
        f"{RESULTS}/logs/table9.log",
    conda:
        ENV
    shell:
        "python -m analysis table9 --json {input} --csv {output.csv} --md {output.md} > {log} 2>&1"


rule figure1_token_importance:
    input:
        FIGURE1_OUTPUTS,


rule table9_overheads:
    input:
        TABLE9_OUTPUTS,


rule table1_sft:
    input:
        experiment_outputs("table1_sft"),


rule table2_cpt:
    input:
        experiment_outputs("table2_cpt"),


rule table3_eviction_stack:
    input:
        experiment_outputs("table3_eviction_stack"),


rule table4_middle_ratio:
    input:
        experiment_outputs("table4_middle_ratio"),


rule table5_expert_count:
    input:
        experiment_outputs("table5_expert_count"),


rule table6_router:
    input:
        experiment_outputs("table6_router"),


rule table11_ratio_grid:
    input:
        experiment_outputs("table11_ratio_grid"),


rule paper_sft:
    # Every SFT experiment of the config (Tables 1, 4, 5, 6, 11 by default), whether `all` builds it or not.
    input:
        [out for name, exp in config["experiments"].items() if exp.get("training") == "sft"
         for out in experiment_outputs(name)],


rule figure3_budget_sweep:
    input:
        experiment_outputs("figure3_budget_sweep"),


rule pareto:
    input:
        PARETO_OUTPUTS,


rule perf:
    input:
        PERF_OUTPUTS,


rule recovery_curves:
    input:
        RECOVERY_OUTPUTS,


rule report:
    input:
        all_targets(),
    output:
        f"{RESULTS}/report.html",
    params:
        configfile=f"{RESULTS}/.resolved_config.yaml",
    log:
        f"{RESULTS}/logs/report.log",
    run:
        import yaml

        Path(params.configfile).write_text(yaml.safe_dump(dict(config), sort_keys=False))
        # the outer Snakemake holds the lock; the report only reads metadata and outputs
        shell(
            "snakemake --nolock --configfile {params.configfile} --report {output} > {log} 2>&1"
        )

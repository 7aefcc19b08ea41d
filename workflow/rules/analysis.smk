# Analysis: records -> tidy tables (CSV + Markdown) -> figures. Reads only the records.


rule collate:
    input:
        records=expand(f"{RESULTS}/records/{{run_id}}.json", run_id=RUN_IDS),
    output:
        all=f"{RESULTS}/tables/all.csv",
        perplexity_csv=f"{RESULTS}/tables/perplexity.csv",
        perplexity_md=f"{RESULTS}/tables/perplexity.md",
    params:
        code=code_hash(CODE["analysis"]),
    log:
        f"{RESULTS}/logs/collate.log",
    conda:
        ENV
    shell:
        "python -m analysis collate {input.records} --all-csv {output.all} "
        "--perplexity-csv {output.perplexity_csv} --perplexity-md {output.perplexity_md} > {log} 2>&1"


rule figure_perplexity:
    input:
        table=f"{RESULTS}/tables/all.csv",
    output:
        report(
            f"{RESULTS}/figures/perplexity.png",
            caption="../report/perplexity.rst",
            category="Quality",
        ),
    params:
        code=code_hash(CODE["analysis"]),
    log:
        f"{RESULTS}/logs/figure_perplexity.log",
    conda:
        ENV
    shell:
        "python -m analysis plot-perplexity --table {input.table} --out {output} > {log} 2>&1"

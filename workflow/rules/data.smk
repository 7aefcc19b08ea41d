# Data: the offline corpus (stdlib source split by module) and the instruction set built from it.


rule corpus:
    output:
        directory(CORPUS),
    params:
        val_fraction=config["data"]["val_fraction"],
        test_fraction=config["data"]["test_fraction"],
        code=command_code("harness corpus"),
    log:
        f"{RESULTS}/logs/corpus.log",
    benchmark:
        f"{RESULTS}/benchmarks/corpus.tsv"
    conda:
        ENV
    shell:
        "python -m harness corpus --out {output} "
        "--val-fraction {params.val_fraction} --test-fraction {params.test_fraction} > {log} 2>&1"


rule instruct:
    input:
        corpus=CORPUS,
    output:
        directory(INSTRUCT),
    params:
        code=command_code("harness instruct"),
    log:
        f"{RESULTS}/logs/instruct.log",
    benchmark:
        f"{RESULTS}/benchmarks/instruct.tsv"
    conda:
        ENV
    shell:
        "python -m harness instruct --corpus {input.corpus} --out {output} > {log} 2>&1"

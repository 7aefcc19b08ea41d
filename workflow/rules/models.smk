# Base models: each config model with a `size` is pretrained here on the corpus.
# (Models with a `hub` checkpoint are loaded by the runs directly.)


rule pretrain:
    input:
        tokenizer=TOKENIZER,
        corpus=CORPUS,
    output:
        directory(f"{WORK}/models/{{model}}/base"),
    params:
        family=model_field("family"),
        size=model_field("size"),
        steps=recipe("steps"),
        batch_size=recipe("batch_size"),
        seq_len=recipe("seq_len"),
        lr=recipe("lr"),
        seed=recipe("seed"),
        eval_tokens=recipe("eval_tokens"),
        device=config["device"],
        code=command_code("harness pretrain"),
    threads: config["threads"]
    # every family's chain starts here: base models first, so the last family's chain is not left
    # running alone at the end (measured: without it Snakemake began CPT jobs before two pretrainings)
    priority: 10
    log:
        f"{RESULTS}/logs/pretrain/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{model}}.tsv"
    conda:
        ENV
    shell:
        "python -m harness pretrain --family {params.family} --size {params.size} "
        "--tokenizer {input.tokenizer} --corpus {input.corpus} --out {output} "
        "--steps {params.steps} --batch-size {params.batch_size} --seq-len {params.seq_len} "
        "--lr {params.lr} --seed {params.seed} --eval-tokens {params.eval_tokens} --device {params.device} --threads {threads} > {log} 2>&1"

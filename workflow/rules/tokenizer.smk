# Tokenizer: a byte-level BPE trained on the corpus training split, and the unigram
# perplexity floor it implies (a language model must land far below it).


rule tokenizer:
    input:
        corpus=CORPUS,
    output:
        directory(TOKENIZER),
    params:
        vocab_size=config["tokenizer"]["vocab_size"],
        code=command_code("harness tokenizer"),
    threads: config["threads"]
    log:
        f"{RESULTS}/logs/tokenizer.log",
    benchmark:
        f"{RESULTS}/benchmarks/tokenizer.tsv"
    conda:
        ENV
    shell:
        "python -m harness tokenizer --corpus {input.corpus} --out {output} "
        "--vocab-size {params.vocab_size} --threads {threads} > {log} 2>&1"


rule unigram:
    input:
        tokenizer=TOKENIZER,
        corpus=CORPUS,
    output:
        f"{WORK}/reference/unigram_{{split}}.json",
    params:
        max_tokens=max_tokens_arg(),
        code=command_code("harness unigram"),
    log:
        f"{RESULTS}/logs/unigram_{{split}}.log",
    conda:
        ENV
    shell:
        "python -m harness unigram --tokenizer {input.tokenizer} --corpus {input.corpus} "
        "--split {wildcards.split} {params.max_tokens} --out {output} > {log} 2>&1"

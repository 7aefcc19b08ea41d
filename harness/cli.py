"""Command line of the harness: ``python -m harness <command> ...`` (also ``mixsga-bench``).

Each Snakemake rule calls exactly one of these commands; they are equally usable by hand.
Heavy imports happen inside the commands so that ``--help`` and ``grid`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from harness.allocator import tune_allocator



def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _import_transformers_lean() -> None:
    """Import transformers' generation utils while scikit-learn and SciPy look uninstalled.

    transformers imports them eagerly for features no train or run uses (assisted decoding,
    object-detection losses); that is 1.5 s of a tiny train / run process's 5 to 10 s. A
    ``None`` entry in ``sys.modules`` hides a package for this import only; lm-eval and the
    analysis import them normally afterwards.
    """
    hidden = [name for name in ("sklearn", "scipy") if name not in sys.modules]
    if "transformers.generation.candidate_generator" in sys.modules:
        return
    for name in hidden:
        sys.modules[name] = None
    try:
        import transformers.generation.candidate_generator  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


def cmd_corpus(args: argparse.Namespace) -> None:
    from harness.data.corpus import build_corpus

    fp = build_corpus(args.out, val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    print(json.dumps(fp, indent=2, sort_keys=True))


def cmd_instruct(args: argparse.Namespace) -> None:
    from harness.data.instruct import build_instruct

    print(json.dumps(build_instruct(args.out, args.corpus), indent=2, sort_keys=True, default=str))


def cmd_tokenizer(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    from harness.data.tokenizer import train_tokenizer

    tok = train_tokenizer(args.corpus, args.out, vocab_size=args.vocab_size)
    print(f"tokenizer with {len(tok)} tokens saved to {args.out}")


def cmd_unigram(args: argparse.Namespace) -> None:
    from harness.data.corpus import read_split
    from harness.evaluation.perplexity import unigram_perplexity
    from harness.atomic import write_json_atomic
    from harness.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    train, held_out = read_split(args.corpus, "train"), read_split(args.corpus, args.split)
    value = unigram_perplexity(tokenizer, train, held_out, max_tokens=args.max_tokens)
    write_json_atomic(
        args.out,
        {"ppl_unigram": float(value), "split": args.split, "max_tokens": args.max_tokens, "tokenizer": str(args.tokenizer)},
    )
    print(f"unigram perplexity on {args.split}: {value:.2f}")


def cmd_pretrain(args: argparse.Namespace) -> None:
    _set_threads(args.threads)
    from harness.training.pretrain import pretrain
    from harness.orchestration.provenance import resolve_device

    summary = pretrain(
        args.family,
        args.size,
        args.tokenizer,
        args.corpus,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        seed=args.seed,
        device=resolve_device(args.device),
        threads=args.threads,
        eval_tokens=args.eval_tokens,
    )
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))


def cmd_check_config(args: argparse.Namespace) -> None:
    import yaml

    from harness.orchestration.config import resolve_config

    print(yaml.safe_dump(resolve_config(args.configfile), sort_keys=False), end="")


def cmd_grid(args: argparse.Namespace) -> None:
    from harness.orchestration.config import resolve_config, run_table, run_table_lines, write_run_table

    rows = run_table(resolve_config(args.configfile))
    if args.out:
        write_run_table(rows, args.out)
    print("\n".join(run_table_lines(rows)))


#: Top-level fields of the specs the workflow passes (harness.orchestration.config.run_spec / train_table).
SPEC_FIELDS = {
    "run": ("run_id", "experiments", "profile", "model", "method", "budget", "params", "seed", "device", "dtype",
            "training", "evaluate", "eval", "measure"),
    "train": ("model", "device", "kind", "train_id", "recipe", "overrides", "data", "architecture", "seed"),
}


def _parse_spec(text: str, table: str) -> dict:
    """The --spec JSON as a mapping holding every field of a {table} spec; ValueError naming what is wrong."""
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--spec is not valid JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--spec must be a JSON object (a {table} spec), got {type(spec).__name__}")
    missing = [k for k in SPEC_FIELDS[table] if k not in spec]
    if missing:
        raise ValueError(f"--spec lacks the {table} spec fields {missing}")
    return spec


def _spec_from(args: argparse.Namespace, table: str) -> dict:
    """The spec of --spec (JSON, as the workflow passes it) or of --run-id / --train-id in --configfile."""
    from harness.orchestration.config import resolve_config, run_spec, train_table

    ident = getattr(args, "run_id" if table == "run" else "train_id")
    if (args.spec is None) == (ident is None):
        raise ValueError(f"give exactly one of --spec (JSON, as the workflow does) or --{table}-id (with --configfile)")
    if args.spec is not None:
        return _parse_spec(args.spec, table)
    cfg = resolve_config(args.configfile)
    if table == "run":
        return run_spec(cfg, ident)
    trains = train_table(cfg)
    if ident not in trains:
        raise ValueError(f"train id {ident!r} is not needed by any run of this config ({len(trains)} checkpoints)")
    return trains[ident]


def cmd_train(args: argparse.Namespace) -> None:
    _import_transformers_lean()
    from harness.orchestration.run import execute_train

    spec = _spec_from(args, "train")
    got = execute_train(spec, args.out, model_path=args.model, corpus_dir=args.corpus, instruct_dir=args.instruct,
                        threads=args.threads)
    s = got["summary"]
    print(f"{s['train_id']}: {s['steps']} steps, {s['tokens']} tokens, loss {s['final_loss_avg']:.4f} -> {args.out}")


def cmd_run(args: argparse.Namespace) -> None:
    _import_transformers_lean()
    from harness.orchestration.run import execute_run

    spec = _spec_from(args, "run")
    record = execute_run(
        spec,
        args.out,
        model_path=args.model,
        trained_dir=args.trained,
        corpus_dir=args.corpus,
        instruct_dir=args.instruct,
        unigram_path=args.unigram,
        predictions_dir=args.predictions,
        code=args.code,
        threads=args.threads,
    )
    q = record["quality"]
    shown = {k: q[k] for k in ("ppl_token", "rouge_l") if q.get(k) is not None}
    print(f"{record['identity']['run_id']}: {json.dumps(shown)} realized budget {record['budget']['realized']:.3f} "
          f"-> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every harness command."""
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="mixSGA-bench harness: build data, tokenizer and base models, run one grid cell, "
        "inspect the config grid. Snakemake calls these; see README.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    def threads(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")

    p = add("corpus", cmd_corpus, "build the offline text corpus (stdlib source split by module)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.10)
    p.add_argument("--test-fraction", type=float, default=0.05)

    p = add("instruct", cmd_instruct, "build the offline instruction set (code -> docstring summary)")
    p.add_argument("--corpus", required=True, help="corpus directory")
    p.add_argument("--out", required=True, help="output directory")

    p = add("tokenizer", cmd_tokenizer, "train the byte-level BPE tokenizer on the corpus training split")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=4096)
    threads(p)

    p = add("unigram", cmd_unigram, "unigram (token frequency) perplexity: the floor a language model must beat")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--split", default="test", choices=["validation", "test"])
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (as the runs do)")
    p.add_argument("--out", required=True, help="JSON file")

    p = add("pretrain", cmd_pretrain, "pretrain a small base model of one family on the corpus")
    p.add_argument("--family", required=True)
    p.add_argument("--size", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=131072, help="validation tokens scored at the end")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    threads(p)

    p = add("check-config", cmd_check_config, "validate config file(s) and print the resolved config "
            "(as snakemake --configfile resolves it: config/config.yaml, then the files)")
    p.add_argument("--configfile", nargs="+", default=[], help="merged over config/config.yaml, later over earlier")

    p = add("grid", cmd_grid, "print the expanded sweep (every experiment's runs, shared runs once) of a config")
    p.add_argument("--configfile", nargs="+", default=[], help="merged over config/config.yaml (as snakemake)")
    p.add_argument("--out", help="also write the table here (TSV)")

    p = add("train", cmd_train, "train one checkpoint (CPT / SFT) that runs share; resumes a killed job")
    p.add_argument("--spec", help="the training spec as JSON (what the workflow passes)")
    p.add_argument("--train-id", help="alternatively: a train id of --configfile's runs")
    p.add_argument("--configfile", nargs="+", default=[], help="merged over config/config.yaml (as snakemake)")
    p.add_argument("--model", help="directory of the base model pretrained here (omit for hub models)")
    p.add_argument("--corpus", help="corpus directory (CPT data)")
    p.add_argument("--instruct", help="instruction set directory (SFT data)")
    p.add_argument("--out", required=True, help="checkpoint directory (save_pretrained files + train.json)")
    threads(p)

    p = add("run", cmd_run, "run one grid cell and write its record (skipped if a valid record exists)")
    p.add_argument("--spec", help="the run's resolved config as JSON (what the workflow passes)")
    p.add_argument("--run-id", help="alternatively: a run id of --configfile's grid")
    p.add_argument("--configfile", nargs="+", default=[], help="merged over config/config.yaml (as snakemake)")
    p.add_argument("--model", help="directory of a model pretrained here (omit for hub models)")
    p.add_argument("--trained", help="trained checkpoint directory from 'harness train' (trained runs)")
    p.add_argument("--corpus", help="corpus directory (eval texts for text_set 'corpus', fingerprint)")
    p.add_argument("--instruct", help="instruction set directory (offline ROUGE-L)")
    p.add_argument("--unigram", help="JSON from 'harness unigram' (models pretrained here)")
    p.add_argument("--predictions", help="directory for generated responses (default: records/../predictions)")
    p.add_argument("--code", help="hash of the code the run executes (recorded in provenance)")
    p.add_argument("--out", required=True, help="record path (JSON)")
    threads(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; bad input exits with status 2 and a one-line reason instead of a traceback."""
    args = build_parser().parse_args(argv)
    tune_allocator()  # before any model is built: freed host memory is reused, not page-faulted afresh
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

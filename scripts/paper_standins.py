"""Tiny local stand-ins, in each hub format, for everything the paper profile downloads.

    python scripts/paper_standins.py --out work/ci-paper/standins

writes, with no network and seeded (the same bytes every time):

* ``models/{llama3,opt,gemma2}/``: random-weight ``tiny`` zoo models of the three checkpoint
  families (Llama 3 / TinyLlama, OPT, Gemma 2) with a BPE tokenizer, saved with
  ``save_pretrained`` as the hub's checkpoints are;
* ``dolly/databricks-dolly-15k.jsonl``: Databricks' schema (instruction, context, response, category);
* ``self-inst/valid.jsonl``, ``Vicuna/valid.jsonl``, ``sinst/11_/valid.jsonl``,
  ``uinst/11_/valid.jsonl``: the four MiniLLM sets in their hub layout (instruction, input, output);
* ``minipile/data/{train,validation,test}-00000-of-00001.parquet`` (``text``);
* ``wikitext/wikitext-2-raw-v1/{train,validation,test}-00000-of-00001.parquet``: raw lines with
  ``= Title =`` headings, as ``Salesforce/wikitext`` stores them;
* ``ai2_arc/ARC-Easy/{train,validation,test}-00000-of-00001.parquet``: lm-eval's ``arc_easy``
  (id, question, choices {text, label}, answerKey).

The text is a seeded word salad: the stand-ins test the plumbing (formats, paths, the
workflow end to end), and their numbers mean nothing. ``.test/config/paper_local.yaml`` points
the paper profile at this directory (``.ci/run`` builds it and runs a few records and a table).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("the model cache key value head group expert token budget layer router attention query memory "
         "decode prefill sequence batch weight gradient loss train test share merge split store read write "
         "small large fast slow first last every some many few long short new old data text code paper").split()
FAMILIES = ("llama3", "opt", "gemma2")
SPLITS = ("train", "validation", "test")


def sentence(rng: random.Random, n: int | None = None) -> str:
    """One seeded sentence of ``n`` (default 6 to 14) words."""
    words = [rng.choice(WORDS) for _ in range(n or rng.randint(6, 14))]
    return " ".join(words).capitalize() + "."


def document(rng: random.Random, sentences: int = 12) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def build_data(out: Path, *, seed: int = 0) -> dict[str, Path]:
    """The datasets in their hub layouts under ``out``; returns {dataset: path to give the config}."""
    rng = random.Random(seed)
    dolly = [{"instruction": sentence(rng), "context": sentence(rng) if i % 2 else "",
              "response": sentence(rng), "category": "open_qa"} for i in range(48)]
    _jsonl(out / "dolly" / "databricks-dolly-15k.jsonl", dolly)
    paths = {"dolly": out / "dolly"}
    for name, rel in (("self_instruct", "self-inst/valid.jsonl"), ("vicuna", "Vicuna/valid.jsonl"),
                      ("sni", "sinst/11_/valid.jsonl"), ("unnatural", "uinst/11_/valid.jsonl")):
        set_rng = random.Random(f"{seed}-{name}")  # each set its own rows
        _jsonl(out / rel, [{"instruction": sentence(set_rng), "input": "", "output": sentence(set_rng)}
                           for _ in range(12)])
        paths[name] = out / rel.split("/")[0]
    for split in SPLITS:
        docs = [document(rng) for _ in range(40 if split == "train" else 12)]
        _parquet(out / "minipile" / "data" / f"{split}-00000-of-00001.parquet", [{"text": d} for d in docs])
        lines = []
        for k in range(6):
            lines += [{"text": ""}, {"text": f" = {sentence(rng, 2)[:-1]} {k} = \n"}, {"text": ""}]
            lines += [{"text": f" {document(rng, 4)} \n"} for _ in range(4)]
        _parquet(out / "wikitext" / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet", lines)
        items = []
        for i in range(16):
            choices = [sentence(rng, 3) for _ in range(4)]
            items.append({"id": f"{split}-{i}", "question": sentence(rng),
                          "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]})
        _parquet(out / "ai2_arc" / "ARC-Easy" / f"{split}-00000-of-00001.parquet", items)
    paths.update(minipile=out / "minipile", wikitext2=out / "wikitext", arc_easy=out / "ai2_arc")
    return paths


def build_models(out: Path, texts: list[str], *, seed: int = 0, vocab_size: int = 512) -> dict[str, Path]:
    """Random-weight tiny checkpoints of the three families, saved as the hub saves them."""
    import torch
    from transformers import AutoModelForCausalLM

    from harness.data.tokenizer import train_tokenizer_on
    from harness.models.zoo import build_config

    tokenizer = train_tokenizer_on(texts, out / "tokenizer", vocab_size)
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(build_config(family, "tiny", tokenizer))
        target = out / "models" / family
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        paths[family] = target
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the stand-ins")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = build_data(out, seed=args.seed)
    import pyarrow.parquet as pq

    # the tokenizer learns the stand-in MiniPile's training text, as a real one learnt its corpus
    texts = pq.read_table(data["minipile"] / "data" / "train-00000-of-00001.parquet").column("text").to_pylist()
    models = build_models(out, texts, seed=args.seed)
    for name, path in {**data, **models}.items():
        print(f"{name:<14} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A trivial reference ROUGE-L per instruction set: what a prediction scores that needs no trained model.

The SFT tables print it beside the models, so a reader sees whether they learned the task at
all. It is computed once per instruction set (not per run), on exactly the rows the runs score
(``eval.instruct``: the set's ``split``, its first ``max_rows``), with the runs' ROUGE-L
(:func:`harness.evaluation.evaluate.rouge_l`). The trivial prediction of a row:

* ``offline`` (summarise a stdlib function in one sentence; the reference is its docstring's
  first sentence): the function's name split into words (``harness.data.instruct.name_words``,
  ``_read_split`` -> ``read split``), which a model could copy from the code without learning
  to summarise.
* any other set (Dolly): the prompt's instruction, echoed.

``python -m harness.evaluation.instruct_reference --set offline --instruct work/data/instruct
--split test --max-rows 32 --out ref.json`` writes ``{"set", "split", "rows", "rouge_l",
"predictor", "rouge_impl", "examples"}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Mapping, Sequence

from harness.atomic import write_json_atomic
from harness.data.instruct import name_words

#: What the trivial prediction is, per set (the fallback for every other set under "*").
PREDICTORS = {"offline": "the function's name split into words", "*": "the prompt's instruction, echoed"}
_INSTRUCTION = re.compile(r"### Instruction:\n(.*?)\n\n###", re.S)


def trivial_prediction(set_name: str, row: Mapping[str, Any]) -> str:
    """The trivial prediction of one instruction row (see the module docstring)."""
    if set_name == "offline":
        return name_words(row["id"])
    match = _INSTRUCTION.search(row["prompt"])
    return (match.group(1) if match else row["prompt"]).strip()


def reference_rouge(set_name: str, rows: Sequence[Mapping[str, Any]], split: str) -> dict:
    """ROUGE-L of the trivial predictions of ``rows`` (the runs' scorer), with a few examples to read."""
    from harness.evaluation.evaluate import rouge_l, rouge_l_scores

    if not rows:
        raise ValueError(f"instruction set {set_name!r}: no rows to score")
    predictions = [trivial_prediction(set_name, r) for r in rows]
    references = [list(r["references"]) for r in rows]
    scored = rouge_l(predictions, references)
    per_row = rouge_l_scores(predictions[:5], references[:5])
    return {
        "set": set_name,
        "split": split,
        "rows": len(rows),
        "rouge_l": float(scored["rouge_l"]),
        "predictor": PREDICTORS.get(set_name, PREDICTORS["*"]),
        "rouge_impl": scored["rouge_impl"],
        "examples": [{"id": r.get("id"), "prediction": p, "reference": ref[0], "rouge_l": s}
                     for r, p, ref, s in zip(rows, predictions, references, per_row)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: score one set's trivial predictions and write the JSON; exit 2 with the reason on bad input."""
    parser = argparse.ArgumentParser(prog="python -m harness.evaluation.instruct_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, help="instruction set: offline or a hub set (dolly)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--max-rows", type=int, default=None, help="first N rows, as eval.instruct.max_rows")
    parser.add_argument("--instruct", help="the offline set's directory (harness instruct)")
    parser.add_argument("--source", default="{}", help="the set's datasets.<name> entry as JSON (hub sets)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from harness.data.sets import load_instruction_rows

    try:
        rows = load_instruction_rows(args.set, args.split, instruct_dir=args.instruct,
                                     source=json.loads(args.source) or None, max_rows=args.max_rows)
        result = reference_rouge(args.set, rows, args.split)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, result)
    print(f"{args.set}:{args.split}: trivial reference ROUGE-L {result['rouge_l']:.2f} on {result['rows']} rows "
          f"({result['predictor']}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

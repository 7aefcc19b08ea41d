"""The text and instruction sets a job reads: the offline corpus / instruction split, or a hub set."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def load_eval_texts(eval_cfg: Mapping[str, Any], corpus_dir: str | Path | None,
                    datasets: Mapping[str, Any] | None = None) -> list[str]:
    """The held-out documents to score: the offline corpus split, or a hub text set (``datasets``: its local copy)."""
    if eval_cfg["text_set"] == "corpus":
        if corpus_dir is None:
            raise ValueError("eval.text_set 'corpus' needs --corpus (the directory built by 'harness corpus')")
        from harness.data.corpus import read_split

        texts = read_split(corpus_dir, eval_cfg["split"])
    else:
        from harness.data.hub_data import load_text_set

        source = (datasets or {}).get(eval_cfg["text_set"]) or {}
        texts = load_text_set(eval_cfg["text_set"], path=source.get("path"), split=eval_cfg["split"])
    if not texts:
        raise ValueError(f"no documents in eval set {eval_cfg['text_set']!r} split {eval_cfg['split']!r}")
    return texts


def load_instruction_rows(name: str, split: str, *, instruct_dir: str | Path | None,
                          source: Mapping[str, Any] | None, max_rows: int | None) -> list[dict]:
    """Rows ``{"id", "prompt", "references"}`` of the offline set (``name='offline'``) or a hub set.

    ``source``: the set's ``datasets.<name>`` entry (local path; Dolly's held-out size and seed).
    """
    if name == "offline":
        if instruct_dir is None:
            raise ValueError("the offline instruction set needs --instruct (the directory built by 'harness instruct')")
        from harness.data.instruct import read_instruct

        rows = read_instruct(instruct_dir, split)
    else:
        from harness.data.hub_data import load_instruction_set

        source = dict(source or {})
        split_keys = {"eval_size": source["heldout"], "seed": source["seed"]} if "heldout" in source else {}
        rows = load_instruction_set(name, path=source.get("path"), split=split, **split_keys)
    if not rows:
        raise ValueError(f"instruction set {name!r} split {split!r} has no rows")
    return rows[:max_rows] if max_rows else rows

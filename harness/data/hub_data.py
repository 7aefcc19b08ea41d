"""The paper's datasets behind one interface, from the model hub or from local files.

Instruction sets map to the offline instruct rows ``{"id", "prompt", "references", "source"}``
(prompt in the Alpaca / Dolly / MiniLLM template of :func:`harness.data.instruct.format_prompt`);
text sets map to a list of documents. ``path=`` reads local files written in each dataset's
own schema, so the paper profile can run from a pre-downloaded copy and the tests need no
network:

========================  =========================================  ===============================================
name                      hub source                                 local schema (``path=``)
========================  =========================================  ===============================================
``dolly``                 ``databricks/databricks-dolly-15k``        JSONL/JSON/Parquet: instruction, context, response,
                                                                     category (MiniLLM's instruction/input/output too)
``self_instruct``         ``MiniLLM/self-inst`` ``valid.jsonl``      MiniLLM JSONL: instruction, input, output (str or
``vicuna``                ``MiniLLM/Vicuna`` ``valid.jsonl``         list), optional prompt (``<n>`` = newline); file or
``sni``                   ``MiniLLM/sinst`` ``11_/valid.jsonl``      a directory holding the hub layout
``unnatural``             ``MiniLLM/uinst`` ``11_/valid.jsonl``      (first 10,000 rows, as MiniLLM evaluates)
``stdlib`` (instructions)  (built here)                               :func:`harness.data.instruct.build_instruct` output
``minipile``              ``JeanKaddour/minipile``                   JSONL/JSON/Parquet with ``text``; or a directory with
                                                                     ``{split}.jsonl`` / ``{split}-*.parquet`` files
``wikitext2``             ``Salesforce/wikitext`` (2-raw-v1)         ``wiki.{train,valid,test}.raw`` (file or directory),
                                                                     or JSONL/Parquet of HF line rows (``text``)
``stdlib`` (text)         (built here)                               :func:`harness.data.corpus.build_corpus` output
========================  =========================================  ===============================================

Dolly has only a train split on the hub; as in the paper (14,000 train / 500 validation /
500 test, "randomly selected") it is split here by a seeded permutation. WikiText-2 rows are
lines; they are joined and cut into articles at top-level ``= Title =`` headings.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from harness.data.instruct import format_prompt

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the hub: ``datasets.load_dataset(repo, config, data_files=..., split=...)``."""

    repo: str
    config: str | None = None
    data_files: str | None = None
    splits: tuple[str, ...] = ("test",)  # splits this loader serves
    limit: int | None = None
    hub_split: str | None = None  # the hub split holding every row (None: same name as ours)
    local_stems: tuple[str, ...] = ("valid",)  # file stems to look for in a local directory


INSTRUCTION_SETS: dict[str, HubSource] = {
    "dolly": HubSource("databricks/databricks-dolly-15k", splits=SPLITS, hub_split="train",
                       local_stems=("databricks-dolly-15k", "raw", "train")),
    # MiniLLM publishes each eval set as one data file, which `datasets` calls "train".
    "self_instruct": HubSource("MiniLLM/self-inst", data_files="valid.jsonl", hub_split="train"),
    "vicuna": HubSource("MiniLLM/Vicuna", data_files="valid.jsonl", hub_split="train"),
    "sni": HubSource("MiniLLM/sinst", data_files="11_/valid.jsonl", hub_split="train"),
    "unnatural": HubSource("MiniLLM/uinst", data_files="11_/valid.jsonl", hub_split="train", limit=10000),
}
TEXT_SETS: dict[str, HubSource] = {
    "minipile": HubSource("JeanKaddour/minipile", splits=SPLITS),
    "wikitext2": HubSource("Salesforce/wikitext", config="wikitext-2-raw-v1", splits=SPLITS),
}
DOLLY_SIZES = {"train": 14000, "validation": 500, "test": 500}
DOLLY_SEED = 42
_WIKI_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)
_WIKI_FILE_SPLIT = {"train": "train", "validation": "valid", "test": "test"}


# ----------------------------------------------------------------------------- file reading
def _read_records(path: Path) -> list[dict]:
    """Rows of a JSONL, JSON (list of objects) or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            # Either {"data": [...]} style or a single column-oriented table.
            data = data.get("data", data)
            if isinstance(data, dict):
                keys = list(data)
                data = [dict(zip(keys, values)) for values in zip(*data.values())]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"unsupported file type {suffix!r} for {path}; expected .jsonl, .json or .parquet")


def _require(rows: list[dict], keys: tuple[str, ...], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"{where}: row {i} lacks field(s) {missing}; has {sorted(row)}")


def _check_split(name: str, split: str, source: HubSource) -> None:
    if split not in source.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; available: {list(source.splits)}")


def _hub_rows(source: HubSource, split: str) -> list[dict]:
    import datasets  # heavy import, only for hub access

    kwargs = {"data_files": source.data_files} if source.data_files else {}
    ds = datasets.load_dataset(source.repo, source.config, split=source.hub_split or split, **kwargs)
    return [dict(row) for row in ds]


def _split_files(directory: Path, stems: tuple[str, ...]) -> list[Path]:
    """Data files named ``{stem}.ext``, ``{stem}-*.ext`` or ``data/{stem}-*.ext`` (hub layout), first stem found."""
    found = []
    for stem in stems:
        for ext in ("jsonl", "json", "parquet"):
            found += sorted(directory.glob(f"{stem}.{ext}")) + sorted(directory.glob(f"{stem}-*.{ext}"))
            found += sorted(directory.glob(f"data/{stem}-*.{ext}"))
        if found:
            return found
    return found


# ----------------------------------------------------------------------------- instruction sets
def _instruction_row(raw: dict, *, name: str, index: int) -> dict:
    """One row in either the Databricks Dolly schema or MiniLLM's processed schema."""
    if "instruction" in raw:
        context = raw.get("context", raw.get("input")) or ""
        prompt = format_prompt(raw["instruction"], context)
    elif "prompt" in raw:
        prompt = raw["prompt"].replace("<n>", "\n")
    else:
        raise ValueError(f"{name}: row {index} has neither 'instruction' nor 'prompt'; has {sorted(raw)}")
    answer = raw.get("response", raw.get("output"))
    if answer is None:
        raise ValueError(f"{name}: row {index} has neither 'response' nor 'output'; has {sorted(raw)}")
    references = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    if not references:
        raise ValueError(f"{name}: row {index} has an empty reference list")
    return {"id": f"{name}-{index}", "prompt": prompt, "references": references, "source": name}


def _dolly_split(rows: list[dict], split: str, eval_size: int, seed: int) -> list[dict]:
    """Seeded split of Dolly: ``eval_size`` test, ``eval_size`` validation, the rest train (<= 14,000)."""
    if len(rows) < 2 * eval_size + 1:
        raise ValueError(f"dolly: {len(rows)} rows are too few for two held-out sets of {eval_size} "
                         "(config datasets.dolly.heldout)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picks = {"test": order[:eval_size], "validation": order[eval_size : 2 * eval_size],
             "train": order[2 * eval_size :][: DOLLY_SIZES["train"]]}[split]
    return [rows[i] for i in sorted(picks)]


def local_files(name: str, path: str | os.PathLike, split: str = "test") -> list[Path]:
    """The local files ``load_instruction_set`` / ``load_text_set`` read for ``name`` at ``path``.

    One function for the loaders and the workflow's check that two datasets do not resolve
    to the same file. FileNotFoundError (naming the dataset and the layout expected) if none.
    """
    p = Path(path)
    if name in INSTRUCTION_SETS:
        source = INSTRUCTION_SETS[name]
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise FileNotFoundError(f"{name}: local data not found: {str(p)!r}")
        candidates = [p / source.data_files] if source.data_files else []
        candidates += _split_files(p, source.local_stems)
        files = [c for c in candidates if c.is_file()]
        if not files:
            want = source.data_files or f"{source.local_stems[0]}.jsonl"
            raise FileNotFoundError(f"{name}: no data file in {str(p)!r} (expected e.g. {want})")
        return files[:1]
    if name in TEXT_SETS:
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise FileNotFoundError(f"{name}: local data not found: {str(p)!r}")
        config = TEXT_SETS[name].config
        if config and (p / config).is_dir():
            p = p / config  # a download of the whole hub repository: its config's folder
        if name == "wikitext2":
            raw_file = p / f"wiki.{_WIKI_FILE_SPLIT[split]}.raw"
            if raw_file.is_file():
                return [raw_file]
        stems = (split, _WIKI_FILE_SPLIT[split]) if name == "wikitext2" else (split,)
        files = _split_files(p, stems)
        if not files:
            raise FileNotFoundError(f"{name}: no {split} data in {str(p)!r}")
        return files
    raise ValueError(f"unknown dataset {name!r}; known: {sorted([*INSTRUCTION_SETS, *TEXT_SETS])}")


def load_instruction_set(
    name: str,
    path: str | os.PathLike | None = None,
    split: str = "test",
    *,
    eval_size: int = DOLLY_SIZES["test"],
    seed: int = DOLLY_SEED,
) -> list[dict]:
    """Rows ``{"id", "prompt", "references", "source"}`` of an instruction-following set.

    ``path`` reads local files (see the module table); without it the hub is used.
    ``eval_size`` / ``seed`` set Dolly's held-out split (paper: 500 / 500, rest train;
    config ``datasets.dolly.heldout`` / ``datasets.dolly.seed``).
    """
    if name == "stdlib":
        from harness.data.instruct import read_instruct

        if path is None:
            raise ValueError("the 'stdlib' instruction set is built locally; pass path= (build_instruct output)")
        return read_instruct(path, split)
    if name not in INSTRUCTION_SETS:
        raise ValueError(f"unknown instruction set {name!r}; known: {sorted([*INSTRUCTION_SETS, 'stdlib'])}")
    source = INSTRUCTION_SETS[name]
    _check_split(name, split, source)
    if path is None:
        raw = _hub_rows(source, split)
    else:
        raw = _read_records(local_files(name, path, split)[0])
    # Ids follow the source order, before any split, so they are stable across splits.
    rows = [_instruction_row(r, name=name, index=i) for i, r in enumerate(raw)]
    if name == "dolly":
        rows = _dolly_split(rows, split, eval_size, seed)
    if source.limit is not None:
        rows = rows[: source.limit]
    if not rows:
        raise ValueError(f"{name}: no rows loaded for split {split!r}")
    return rows


# ----------------------------------------------------------------------------- text sets
def wikitext_articles(text: str) -> list[str]:
    """Split raw WikiText into articles at top-level ``= Title =`` heading lines."""
    starts = [m.start() for m in _WIKI_HEADING.finditer(text)]
    if not starts:
        return [text.strip()] if text.strip() else []
    pieces = ([text[: starts[0]]] if starts[0] else []) + [
        text[s:e] for s, e in zip(starts, starts[1:] + [len(text)])
    ]
    return [p.strip("\n") for p in pieces if p.strip()]


def _wikitext_from_rows(rows: list[dict], where: str) -> list[str]:
    _require(rows, ("text",), where)
    # HF rows are the raw file's lines (most keep their "\n"); rejoin them into the raw text.
    return wikitext_articles("".join(t if t.endswith("\n") else t + "\n" for t in (r["text"] for r in rows)))


def load_text_set(name: str, path: str | os.PathLike | None = None, split: str = "test") -> list[str]:
    """Documents of a plain-text set (MiniPile, WikiText-2 articles, or the stdlib corpus)."""
    if name == "stdlib":
        from harness.data.corpus import read_split

        if path is None:
            raise ValueError("the 'stdlib' text set is built locally; pass path= (build_corpus output)")
        return read_split(path, split)
    if name not in TEXT_SETS:
        raise ValueError(f"unknown text set {name!r}; known: {sorted([*TEXT_SETS, 'stdlib'])}")
    source = TEXT_SETS[name]
    _check_split(name, split, source)
    if path is None:
        rows = _hub_rows(source, split)
        return _wikitext_from_rows(rows, name) if name == "wikitext2" else _texts(rows, name)
    files = local_files(name, path, split)
    if name == "wikitext2" and files[0].suffix in (".raw", ".txt"):
        return wikitext_articles(files[0].read_text(encoding="utf-8"))
    rows = [row for f in files for row in _read_records(f)]
    return _wikitext_from_rows(rows, name) if name == "wikitext2" else _texts(rows, name)


def _texts(rows: list[dict], name: str) -> list[str]:
    _require(rows, ("text",), name)
    texts = [r["text"] for r in rows if r["text"] and r["text"].strip()]
    if not texts:
        raise ValueError(f"{name}: no non-empty documents")
    return texts

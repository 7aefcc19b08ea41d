"""Offline instruction-following set: summarise a standard-library function in one sentence.

Built from the corpus splits, so a pair inherits its module's split (no function is in two
splits). The prompt follows the Alpaca / Dolly template that MiniLLM (and so the paper)
uses: the instruction asks for a one-sentence summary, the input is the function's source
with its docstring removed, and the single reference is the docstring's first sentence.

Long functions are skipped rather than truncated, so every prompt is complete code that a
short-context model can read; the cap is recorded in ``meta.json``.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import textwrap

from harness.data.corpus import SPLITS, read_fingerprint, read_rows, write_splits

INSTRUCTION = "Summarise what this Python function does in one sentence."
SOURCE = "stdlib_docstring"
META_FILE = "meta.json"

_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# A sentence ends at . ! ? followed by whitespace and a capital / quote / bracket,
# unless the dot belongs to a common abbreviation.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'`(\[])")
# A word of an identifier: an acronym before a capitalised word, a (capitalised) word, an acronym, digits.
_NAME_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.")


def format_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca / Dolly / MiniLLM prompt template (with or without an input block)."""
    if input_text and input_text.strip():
        return _TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return _TEMPLATE_NO_INPUT.format(instruction=instruction)


def first_sentence(docstring: str) -> str:
    """First sentence of a docstring's first paragraph, on one line."""
    paragraph = textwrap.dedent(docstring).strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    for match in _SENTENCE_END.finditer(text):
        candidate = text[: match.start()]
        if candidate.endswith(_ABBREVIATIONS):
            continue
        return candidate.strip()
    return text.strip()


def _strip_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """Function source (from the ``def`` line, decorators excluded) without its docstring.

    None when the docstring shares a line with other code or is the whole body.
    """
    doc = node.body[0]
    if len(node.body) < 2 or doc.lineno == node.lineno or node.body[1].lineno <= doc.end_lineno:
        return None
    start, end = node.lineno - 1, node.end_lineno
    kept = lines[start : doc.lineno - 1] + lines[doc.end_lineno : end]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def extract_pairs(
    source: str, module: str, *, min_words: int = 5, max_words: int = 40, max_code_chars: int = 512
) -> list[dict]:
    """``(code, summary)`` pairs from every function / method of one module's source.

    Keeps functions whose docstring's first sentence has ``min_words`` to ``max_words`` words
    and whose docstring-free source is at most ``max_code_chars`` characters.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    pairs = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    doc = ast.get_docstring(child, clean=True)
                    if doc:
                        summary = first_sentence(doc)
                        code = _strip_docstring(lines, child)
                        n_words = len(summary.split())
                        if code and min_words <= n_words <= max_words and len(code) <= max_code_chars:
                            pairs.append({"id": f"{module}:{qualname}:{child.lineno}", "code": code,
                                          "summary": summary})
                visit(child, f"{qualname}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return pairs


def build_instruct(
    out_dir: str | os.PathLike,
    corpus_dir: str | os.PathLike,
    *,
    min_words: int = 5,
    max_words: int = 40,
    max_code_chars: int = 512,
) -> dict:
    """Write ``{train,validation,test}.jsonl`` + ``meta.json`` to ``out_dir``; return the meta.

    Rows are ``{"id", "prompt", "references": [summary], "source"}``. Functions whose
    docstring-free code appears earlier (in split order, then file order) are dropped, so
    no prompt repeats within or across splits.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got min_words={min_words!r}, max_words={max_words!r}")
    if max_code_chars < 1:
        raise ValueError(f"max_code_chars must be >= 1, got {max_code_chars!r}")
    fingerprint = read_fingerprint(corpus_dir)
    seen: set[str] = set()
    rows: dict[str, list[dict]] = {}
    duplicates = 0
    for split in SPLITS:
        rows[split] = []
        for doc in read_rows(corpus_dir, split):
            for pair in extract_pairs(doc["text"], doc["id"], min_words=min_words, max_words=max_words,
                                      max_code_chars=max_code_chars):
                key = hashlib.sha256(pair["code"].encode()).hexdigest()
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                rows[split].append({
                    "id": pair["id"],
                    "prompt": format_prompt(INSTRUCTION, pair["code"]),
                    "references": [pair["summary"]],
                    "source": SOURCE,
                })
    for split, split_rows in rows.items():
        if not split_rows:
            raise ValueError(f"instruct split {split!r} is empty; the corpus at {str(corpus_dir)!r} has too few "
                             f"functions with {min_words}+ word docstrings under {max_code_chars} characters")
    meta = {
        "source": SOURCE,
        "instruction": INSTRUCTION,
        "min_words": min_words,
        "max_words": max_words,
        "max_code_chars": max_code_chars,
        "duplicates_dropped": duplicates,
        "pairs": {s: len(r) for s, r in rows.items()},
        "corpus_sha256": fingerprint["sha256"],
    }
    write_splits(out_dir, rows, META_FILE, meta)
    return meta


def name_words(row_id: str) -> str:
    """The function's name of an offline row id (``module:qualname:line``) split into lower-case words.

    ``_read_split`` -> ``read split``, ``getLogger`` -> ``get logger``, ``HTTPServer.parse_URL`` ->
    ``parse url``: the trivial reference summary that the ROUGE-L tables print beside the models
    (a model that learned nothing beyond copying the name from the code scores about this).
    """
    parts = str(row_id).split(":")
    if len(parts) < 3:
        raise ValueError(f"{row_id!r} is not an offline instruction row id (module:qualname:line)")
    name = parts[-2].rsplit(".", 1)[-1]
    words = [w.lower() for piece in name.split("_") for w in _NAME_WORD.findall(piece)]
    return " ".join(words) or name


def read_instruct(data_dir: str | os.PathLike, split: str) -> list[dict]:
    """Rows of one split of the instruction set, in file order."""
    return read_rows(data_dir, split, what="instruct")

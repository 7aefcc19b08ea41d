"""Offline instruction set: docstring-free prompts, first-sentence references, split by module."""

import ast
import json

import pytest

from harness.data.corpus import build_corpus, read_rows
from harness.data.instruct import (
    INSTRUCTION,
    build_instruct,
    extract_pairs,
    first_sentence,
    format_prompt,
    name_words,
    read_instruct,
)

SOURCE = '''
def documented(a, b):
    """Add two numbers together, e.g. 1 and 2. Then return the sum.

    More detail here.
    """
    # keep comments
    return a + b


def short_doc(x):
    """Too short."""
    return x


def only_doc():
    """This function has nothing but a docstring in it."""


class Box:
    """A box."""

    def method(self, item):
        """Store one item inside the box for later use."""
        self.item = item

        def inner():
            """Nested helpers are also summarised here fine."""
            return item
        return inner
'''


def test_first_sentence():
    assert first_sentence("Return the sum. More text.") == "Return the sum."
    assert first_sentence("Use e.g. this value. Next.") == "Use e.g. this value."
    assert first_sentence("Spans\n    two lines and ends here.\n\nSecond paragraph.") == "Spans two lines and ends here."
    assert first_sentence("no final period") == "no final period"


def test_format_prompt_matches_minillm_template():
    with_input = format_prompt("Do it.", "data")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nDo it.\n\n### Input:\ndata\n\n### Response:\n")
    assert format_prompt("Do it.").endswith("### Instruction:\nDo it.\n\n### Response:\n")
    assert "### Input" not in format_prompt("Do it.", "   ")


def test_extract_pairs_strips_docstring_and_keeps_code():
    pairs = {p["id"]: p for p in extract_pairs(SOURCE, "m")}
    assert set(pairs) == {"m:documented:2", "m:Box.method:23", "m:Box.method.inner:27"}
    doc = pairs["m:documented:2"]
    assert doc["summary"] == "Add two numbers together, e.g. 1 and 2."
    assert '"""' not in doc["code"] and "# keep comments" in doc["code"] and doc["code"].startswith("def documented")
    ast.parse(doc["code"])  # still valid Python
    assert pairs["m:Box.method:23"]["code"].startswith("def method(self, item):")
    assert extract_pairs(SOURCE, "m", max_code_chars=40) == [p for p in extract_pairs(SOURCE, "m")
                                                            if len(p["code"]) <= 40]
    assert extract_pairs("def broken(:\n", "m") == []


def test_build_instruct_splits_like_the_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["colorsys", "shlex", "string", "bisect"]):
        (src / f"{name}.py").write_text(SOURCE + f"\n\ndef unique_{i}(v):\n    '''Return the value of v plus {i} here.'''\n"
                                         f"    return v + {i}\n")
    build_corpus(tmp_path / "corpus", source_dir=src, val_fraction=0.25, test_fraction=0.2)
    meta = build_instruct(tmp_path / "instruct", tmp_path / "corpus")
    assert meta["max_code_chars"] == 512 and meta["min_words"] == 5
    assert json.loads((tmp_path / "instruct" / "meta.json").read_text()) == meta
    # SOURCE is repeated in every module: its functions are kept once (first split, first file).
    assert meta["duplicates_dropped"] == 3 * 3
    for split in ("train", "validation", "test"):
        rows = read_instruct(tmp_path / "instruct", split)
        modules = {r["id"] for r in read_rows(tmp_path / "corpus", split)}
        assert rows and all(r["id"].split(":")[0] in modules for r in rows)
        for r in rows:
            assert set(r) == {"id", "prompt", "references", "source"}
            assert INSTRUCTION in r["prompt"] and r["prompt"].endswith("### Response:\n")
            assert len(r["references"]) == 1 and len(r["references"][0].split()) >= 5
            assert r["references"][0] not in r["prompt"]  # the answer is not leaked in the prompt
    with pytest.raises(ValueError, match="min_words"):
        build_instruct(tmp_path / "x", tmp_path / "corpus", min_words=0)
    with pytest.raises(FileNotFoundError):
        build_instruct(tmp_path / "x", tmp_path / "nothing")


def test_name_words_split_the_function_name_of_a_row_id():
    assert name_words("shlex:_read_split:3") == "read split"
    assert name_words("logging:getLogger:10") == "get logger"
    assert name_words("http.server:HTTPServer.parse_URL:9") == "parse url"  # the function, not its class
    assert name_words("m:Box.method.inner:40") == "inner"
    with pytest.raises(ValueError, match="module:qualname:line"):
        name_words("dolly-17")


def test_trivial_reference_scores_the_runs_rows_with_the_runs_rouge(tmp_path, capsys):
    from harness.evaluation.evaluate import rouge_l
    from harness.evaluation.instruct_reference import main, reference_rouge, trivial_prediction

    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["colorsys", "shlex", "string", "bisect"]):
        (src / f"{name}.py").write_text(SOURCE + f"\n\ndef add_value_{i}(v):\n    \"\"\"Add the value {i} to v and "
                                         f"return it.\"\"\"\n    return v + {i}\n")
    build_corpus(tmp_path / "corpus", source_dir=src, val_fraction=0.25, test_fraction=0.2)
    build_instruct(tmp_path / "instruct", tmp_path / "corpus")
    rows = read_instruct(tmp_path / "instruct", "test")
    got = reference_rouge("offline", rows, "test")
    preds = [name_words(r["id"]) for r in rows]
    assert got["rows"] == len(rows) and got["rouge_l"] == rouge_l(preds, [r["references"] for r in rows])["rouge_l"]
    assert got["examples"][0]["prediction"].startswith("add value")
    assert 0 < got["rouge_l"] < 100  # "add value i" shares words with "Add the value i to v and return it."
    # another set echoes the prompt's instruction
    assert trivial_prediction("dolly", {"id": "dolly-1", "prompt": format_prompt("Name a colour.")}) == "Name a colour."

    out = tmp_path / "ref.json"
    assert main(["--set", "offline", "--split", "test", "--max-rows", "1", "--instruct", str(tmp_path / "instruct"),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"] == 1
    assert main(["--set", "offline", "--out", str(tmp_path / "no.json")]) == 2
    assert "needs --instruct" in capsys.readouterr().err and not (tmp_path / "no.json").exists()

"""Paper datasets from local files in each dataset's own schema, and the hub call they would make."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from harness.data.hub_data import INSTRUCTION_SETS, load_instruction_set, load_text_set, wikitext_articles
from harness.data.instruct import format_prompt


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def dolly_rows(n):
    return [{"instruction": f"Question {i}?", "context": "Some context." if i % 2 else "",
             "response": f"Answer {i}.", "category": "open_qa"} for i in range(n)]


def test_dolly_local_schema_and_seeded_split(tmp_path):
    path = write_jsonl(tmp_path / "databricks-dolly-15k.jsonl", dolly_rows(20))
    splits = {s: load_instruction_set("dolly", path=path, split=s, eval_size=3) for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [14, 3, 3]
    ids = [r["id"] for rows in splits.values() for r in rows]
    assert len(set(ids)) == 20  # disjoint and complete
    row = next(r for r in splits["train"] + splits["test"] + splits["validation"] if r["id"] == "dolly-1")
    assert row == {"id": "dolly-1", "prompt": format_prompt("Question 1?", "Some context."),
                   "references": ["Answer 1."], "source": "dolly"}
    zero = next(r for rows in splits.values() for r in rows if r["id"] == "dolly-0")
    assert "### Input" not in zero["prompt"]  # empty context -> template without input
    # same seed, same split; directory lookup finds the file
    assert load_instruction_set("dolly", path=tmp_path, split="test", eval_size=3) == splits["test"]
    assert load_instruction_set("dolly", path=path, split="test", eval_size=3, seed=1) != splits["test"]
    with pytest.raises(ValueError, match="too few"):
        load_instruction_set("dolly", path=path, split="test", eval_size=10)


def test_minillm_eval_sets_local_schema(tmp_path):
    rows = [{"instruction": "Sort these.", "input": "3 1 2", "prompt": "ignored<n>prompt", "output": "1 2 3"},
            {"instruction": "Say hi.", "input": "", "output": ["hi", "hello"]}]
    write_jsonl(tmp_path / "sinst" / "11_" / "valid.jsonl", rows)  # hub layout of MiniLLM/sinst
    sni = load_instruction_set("sni", path=tmp_path / "sinst")
    assert sni[0]["prompt"] == format_prompt("Sort these.", "3 1 2") and sni[0]["references"] == ["1 2 3"]
    assert sni[1]["references"] == ["hi", "hello"] and sni[1]["source"] == "sni"
    vicuna = write_jsonl(tmp_path / "vicuna.jsonl", [{"prompt": "Line one<n>line two", "output": "ok"}])
    assert load_instruction_set("vicuna", path=vicuna)[0]["prompt"] == "Line one\nline two"
    write_jsonl(tmp_path / "self-inst" / "valid.jsonl", rows)
    assert len(load_instruction_set("self_instruct", path=tmp_path / "self-inst")) == 2
    unnatural = write_jsonl(tmp_path / "u.jsonl", rows * 3)
    assert [r["id"] for r in load_instruction_set("unnatural", path=unnatural)][:2] == ["unnatural-0", "unnatural-1"]


def test_instruction_set_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown instruction set"):
        load_instruction_set("alpaca", path=tmp_path)
    with pytest.raises(ValueError, match="no split 'train'"):
        load_instruction_set("vicuna", path=tmp_path, split="train")
    with pytest.raises(FileNotFoundError):
        load_instruction_set("vicuna", path=tmp_path / "missing.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(ValueError, match="neither 'instruction' nor 'prompt'"):
        load_instruction_set("vicuna", path=bad)
    csv = tmp_path / "x.csv"
    csv.write_text("instruction,output\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_instruction_set("vicuna", path=csv)
    with pytest.raises(ValueError, match="pass path"):
        load_instruction_set("stdlib")


WIKI_RAW = (" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a game . \n \n"
            " = = Gameplay = = \n \n The game began development in 2010 . \n \n"
            " = Tower Building = \n \n The tower is tall . \n")


def test_wikitext_articles_split_at_top_level_headings(tmp_path):
    articles = wikitext_articles(WIKI_RAW)
    assert len(articles) == 2
    assert articles[0].startswith(" = Valkyria Chronicles III =") and "= = Gameplay = =" in articles[0]
    assert articles[1].startswith(" = Tower Building =")
    (tmp_path / "wiki.test.raw").write_text(WIKI_RAW)
    (tmp_path / "wiki.valid.raw").write_text(" = Other = \n text . \n")
    assert load_text_set("wikitext2", path=tmp_path, split="test") == articles
    assert load_text_set("wikitext2", path=tmp_path, split="validation") == [" = Other = \n text . "]
    # the HF schema: one row per line (parquet, as the hub stores it)
    lines = [{"text": line + "\n" if line else ""} for line in WIKI_RAW.split("\n")[:-1]]
    (tmp_path / "hf" / "wikitext-2-raw-v1").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(lines), tmp_path / "hf" / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
    assert load_text_set("wikitext2", path=tmp_path / "hf" / "wikitext-2-raw-v1", split="test") == articles


def test_minipile_parquet_and_jsonl(tmp_path):
    docs = [{"text": "First document.\nWith two lines."}, {"text": ""}, {"text": "Second one."}]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(docs), tmp_path / "data" / "test-00000-of-00001.parquet")
    assert load_text_set("minipile", path=tmp_path, split="test") == ["First document.\nWith two lines.", "Second one."]
    jsonl = write_jsonl(tmp_path / "validation.jsonl", docs[:1])
    assert load_text_set("minipile", path=jsonl, split="validation") == [docs[0]["text"]]
    with pytest.raises(FileNotFoundError, match="no train data"):
        load_text_set("minipile", path=tmp_path, split="train")
    with pytest.raises(ValueError, match="lacks field"):
        load_text_set("minipile", path=write_jsonl(tmp_path / "bad.jsonl", [{"content": "x"}]), split="test")
    with pytest.raises(ValueError, match="unknown text set"):
        load_text_set("c4")


def test_hub_path_calls_load_dataset_with_the_paper_names(monkeypatch):
    calls = []

    def fake_load_dataset(repo, config=None, split=None, **kwargs):
        calls.append((repo, config, split, kwargs))
        if repo == "databricks/databricks-dolly-15k":
            return dolly_rows(1200)
        if repo == "Salesforce/wikitext":
            return [{"text": line + "\n" if line else ""} for line in WIKI_RAW.split("\n")[:-1]]
        if repo == "JeanKaddour/minipile":
            return [{"text": "doc"}]
        return [{"instruction": "i", "input": "", "output": "o"}] * 12000

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_instruction_set("dolly", split="test")) == 500
    assert len(load_instruction_set("dolly", split="train")) == 200
    assert calls[0] == ("databricks/databricks-dolly-15k", None, "train", {})
    assert len(load_instruction_set("unnatural")) == 10000  # MiniLLM evaluates the first 10k
    assert calls[-1] == ("MiniLLM/uinst", None, "train", {"data_files": "11_/valid.jsonl"})
    for name, source in INSTRUCTION_SETS.items():
        if name != "dolly":
            load_instruction_set(name)
            assert calls[-1][0] == source.repo
    assert len(load_text_set("wikitext2", split="test")) == 2
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", {})
    assert load_text_set("minipile", split="validation") == ["doc"]
    assert calls[-1] == ("JeanKaddour/minipile", None, "validation", {})


def test_paper_standins_load_through_every_loader_each_from_its_own_files(tmp_path):
    """scripts/paper_standins.py writes each dataset in its hub layout; the loaders and the config read them."""
    import importlib.util

    from conftest import REPO_ROOT
    from harness.orchestration.config import load_config

    spec = importlib.util.spec_from_file_location("paper_standins", REPO_ROOT / "scripts" / "paper_standins.py")
    standins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standins)
    paths = standins.build_data(tmp_path)
    test = {n: load_instruction_set(n, path=paths[n], split="test", eval_size=8)
            for n in ("dolly", "self_instruct", "vicuna", "sni", "unnatural")}
    assert len(test["dolly"]) == 8 and len(load_instruction_set("dolly", path=paths["dolly"], split="train",
                                                                eval_size=8)) == 48 - 16
    prompts = [tuple(r["prompt"] for r in rows) for rows in test.values()]
    assert len(set(prompts)) == len(prompts), "two sets hold the same prompts"
    assert len(load_text_set("wikitext2", path=paths["wikitext2"], split="test")) == 6  # articles at headings
    assert load_text_set("minipile", path=paths["minipile"], split="train")
    datasets = {n: {"path": str(paths[n])} for n in ("self_instruct", "vicuna", "sni", "unnatural", "minipile",
                                                       "wikitext2")}
    datasets["dolly"] = {"path": str(paths["dolly"]), "heldout": 8}
    load_config([REPO_ROOT / "config" / "config.yaml", REPO_ROOT / "config" / "paper.yaml"],
                overrides={"datasets": datasets})

"""analysis/: records -> tidy table -> per-model perplexity tables (CSV, Markdown) -> figure."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.__main__ import main as analysis_main
from analysis.collate import collate, load_records, perplexity_summary, to_markdown
from analysis.plots import plot_perplexity
from harness.records import write_record


@pytest.fixture
def record_files(tmp_path, make_record):
    """Two models; llama3 with two seeds (ppl 40 and 60), opt with one (ppl 80)."""
    specs = [("llama3", "llama3", 0, 40.0), ("llama3", "llama3", 1, 60.0), ("opt", "opt", 0, 80.0)]
    paths = []
    for model, family, seed, ppl in specs:
        rec = make_record(model=model, family=family, seed=seed, ppl_token=ppl, ppl_unigram=400.0)
        paths.append(write_record(tmp_path / "records" / f"{rec['identity']['run_id']}.json", rec))
    return paths


def test_tidy_table_has_one_row_per_record(record_files):
    table = load_records(record_files)
    assert list(table["run_id"]) == sorted(table["run_id"])
    assert len(table) == 3
    assert table["ppl_token"].tolist() == [40.0, 60.0, 80.0]
    assert table.loc[0, "git_commit"] == "0" * 40 and table.loc[0, "device_type"] == "cpu"
    assert table["rouge_l"].isna().all(), "unmeasured values stay missing"


def test_summary_averages_over_seeds(record_files):
    summary = perplexity_summary(load_records(record_files)).set_index("model")
    assert summary.loc["llama3", "seeds"] == 2
    assert summary.loc["llama3", "ppl_token"] == pytest.approx(50.0)
    assert summary.loc["llama3", "ppl_token_std"] == pytest.approx(14.1421356)
    assert summary.loc["opt", "ppl_token_std"] == 0.0
    assert summary.loc["opt", "ratio_to_unigram"] == pytest.approx(0.2)


def test_collate_writes_csv_and_markdown(tmp_path, record_files):
    out = tmp_path / "tables"
    collate(
        record_files,
        all_csv=out / "all.csv",
        perplexity_csv=out / "perplexity.csv",
        perplexity_md=out / "perplexity.md",
    )
    assert len(pd.read_csv(out / "all.csv")) == 3
    assert len(pd.read_csv(out / "perplexity.csv")) == 2
    md = (out / "perplexity.md").read_text()
    assert "| model | family | method |" in md and "| llama3 | llama3 | base |" in md
    assert "50.00" in md


def test_markdown_marks_missing_values():
    md = to_markdown(pd.DataFrame({"name": ["a"], "x": [float("nan")], "y": [1.23456]}))
    assert md.splitlines() == ["| name | x | y |", "|---|---:|---:|", "| a | – | 1.23 |"]


def test_collate_rejects_duplicates_empty_and_invalid(tmp_path, record_files):
    with pytest.raises(ValueError, match="duplicate run ids"):
        load_records([record_files[0], record_files[0]])
    with pytest.raises(ValueError, match="no records"):
        load_records([])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"identity": {}}))
    with pytest.raises(ValueError, match="bad.json"):
        load_records([bad])


def test_figure_is_written(tmp_path, record_files):
    out = plot_perplexity(load_records(record_files), tmp_path / "fig" / "perplexity.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_figure_needs_base_runs(tmp_path, record_files):
    table = load_records(record_files)
    table["method"] = "gqa"
    with pytest.raises(ValueError, match="no 'base' runs"):
        plot_perplexity(table, tmp_path / "x.png")


def test_command_line(tmp_path, record_files, capsys):
    tables = tmp_path / "t"
    args = ["collate", *map(str, record_files), "--all-csv", str(tables / "all.csv"),
            "--perplexity-csv", str(tables / "p.csv"), "--perplexity-md", str(tables / "p.md")]
    assert analysis_main(args) == 0
    assert analysis_main(["plot-perplexity", "--table", str(tables / "all.csv"), "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").exists()
    assert analysis_main(["plot-perplexity", "--table", str(tmp_path / "missing.csv"), "--out", "x.png"]) == 2
    assert "error:" in capsys.readouterr().err

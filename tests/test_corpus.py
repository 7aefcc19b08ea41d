"""Offline corpus: exclusion rules, deterministic module split, fingerprint, atomic output."""

import json
import shutil

import pytest

from harness.data.corpus import (
    build_corpus,
    list_source_files,
    module_name,
    read_fingerprint,
    read_rows,
    read_split,
    split_of,
    stdlib_dir,
)

MODULES = ("colorsys bisect heapq fnmatch shlex textwrap glob keyword string numbers abc copy queue sched "
           "stat graphlib genericpath posixpath calendar").split()
FRACTIONS = {"val_fraction": 0.25, "test_fraction": 0.2}


def make_source(root):
    """A small stdlib-shaped tree: real modules plus everything the corpus must skip."""
    for name in MODULES:
        shutil.copy(stdlib_dir() / f"{name}.py", root / f"{name}.py")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text('"""A package."""\n')
    (root / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    for skipped in ("test", "pkg/tests", "idlelib/idle_test", "site-packages/thing"):
        (root / skipped).mkdir(parents=True)
        (root / skipped / "test_x.py").write_text("assert True\n")
    (root / "cp_fake.py").write_text('""" Python Character Mapping Codec generated from \'X.TXT\' with gencodec.py.\n"""\n')
    (root / "notes.txt").write_text("not python\n")
    return root


def test_exclusions_and_module_names(tmp_path):
    files = [rel for rel, _ in list_source_files(make_source(tmp_path))]
    assert "pkg/mod.py" in files and "pkg/__init__.py" in files and "colorsys.py" in files
    assert not any(part in ("test", "tests", "idle_test", "site-packages") for f in files for part in f.split("/"))
    assert "cp_fake.py" not in files and "notes.txt" not in files
    assert files == sorted(files)
    assert module_name("pkg/__init__.py") == "pkg" and module_name("email/mime/text.py") == "email.mime.text"


def test_split_is_stable_hash_not_python_hash():
    # Pinned values: the split must not change across processes, machines or Python versions.
    assert split_of("shlex", **FRACTIONS) == "test"
    assert split_of("string", **FRACTIONS) == "validation"
    assert split_of("colorsys", **FRACTIONS) == "train"
    assert split_of("colorsys", **FRACTIONS, salt="other") in ("train", "validation", "test")


def test_build_is_deterministic_and_split_by_module(tmp_path):
    (tmp_path / "src").mkdir()
    src = make_source(tmp_path / "src")
    fp1 = build_corpus(tmp_path / "a", source_dir=src, **FRACTIONS)
    fp2 = build_corpus(tmp_path / "b", source_dir=src, **FRACTIONS)
    assert fp1 == fp2 == read_fingerprint(tmp_path / "a")
    for split in ("train", "validation", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    ids = {split: {r["id"] for r in read_rows(tmp_path / "a", split)} for split in ("train", "validation", "test")}
    assert not (ids["train"] & ids["validation"]) and not (ids["train"] & ids["test"])
    assert sum(map(len, ids.values())) == fp1["files"] == len(MODULES) + 2
    for split, members in ids.items():
        assert all(split_of(m, **FRACTIONS) == split for m in members)
    assert fp1["python"] and fp1["split"]["val_fraction"] == 0.25
    texts = read_split(tmp_path / "a", "train")
    assert any("def " in t for t in texts) and len(texts) == len(ids["train"])
    assert not list(tmp_path.glob(".a.tmp-*"))


def test_fingerprint_tracks_content_and_parameters(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_source(src)
    base = build_corpus(tmp_path / "out", source_dir=src, **FRACTIONS)["sha256"]
    assert build_corpus(tmp_path / "out", source_dir=src, val_fraction=0.3, test_fraction=0.2)["sha256"] != base
    (src / "colorsys.py").write_text((src / "colorsys.py").read_text() + "\n# changed\n")
    assert build_corpus(tmp_path / "out", source_dir=src, **FRACTIONS)["sha256"] != base


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        build_corpus(tmp_path / "x", val_fraction=0.0)
    with pytest.raises(ValueError, match="< 1"):
        build_corpus(tmp_path / "x", val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="does not exist"):
        build_corpus(tmp_path / "x", source_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown split"):
        read_split(tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="build_corpus"):
        read_split(tmp_path, "train")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "colorsys.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="empty"):
        build_corpus(tmp_path / "y", source_dir=tmp_path / "one")
    assert not (tmp_path / "y").exists()


def test_real_stdlib_listing_has_no_tests():
    files = list_source_files(stdlib_dir())
    assert len(files) > 300  # 3.11: 668, 3.12: 451 (distutils and others removed)
    paths = [rel for rel, _ in files]
    assert "os.py" in paths and "json/decoder.py" in paths
    assert not any("/test/" in f"/{p}" or "idle_test" in p or "/tests/" in f"/{p}" for p in paths)
    assert json.dumps(paths)  # plain strings, serialisable for the fingerprint

"""Offline default corpus: the Python standard library's own source, split by module.

Every Python installation ships the same real text (code, comments, docstrings), so the
offline profile needs no download. Test packages are excluded (they are mostly fixtures)
and so are the codec tables that ``gencodec.py`` generated (hex literals, not language).

Each module (one ``.py`` file) lands in exactly one split, chosen by a stable hash of its
dotted module name, so the split is identical on every machine and Python process.
The fingerprint hashes the file list and contents together with the Python version and
the split parameters; every downstream result records it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from pathlib import Path

from harness.atomic import atomic_directory

SPLITS = ("train", "validation", "test")
# Directory names that hold tests, fixtures or third-party code, wherever they appear.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Marker line of generated charmap codec tables (Lib/encodings/cp*.py and friends).
GENERATED_MARKER = "gencodec.py"
FINGERPRINT_FILE = "fingerprint.json"
FORMAT_VERSION = 1


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(rel_path: str) -> str:
    """Dotted module name of a relative ``.py`` path (``email/mime/text.py`` -> ``email.mime.text``)."""
    parts = list(Path(rel_path).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1] or ["__init__"]
    return ".".join(parts)


def split_of(module: str, *, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    """Split of one module from a stable hash of its name (sha256, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{salt}{module}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def list_source_files(source_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Sorted ``(relative posix path, text)`` of the corpus files under ``source_dir``."""
    root = Path(source_dir)
    if not root.is_dir():
        raise ValueError(f"corpus source directory does not exist: {str(root)!r}")
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDED_DIRS or rel.parts[0].startswith("config-"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of legacy-encoded fixtures; none outside test dirs in 3.11
        if GENERATED_MARKER in text[:1000]:
            continue
        out.append((rel.as_posix(), text))
    if not out:
        raise ValueError(f"no Python source files found under {str(root)!r}")
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction!r}")


def build_corpus(
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.10,
    test_fraction: float = 0.05,
    source_dir: str | os.PathLike | None = None,
    salt: str = "",
) -> dict:
    """Write ``{train,validation,test}.jsonl`` and ``fingerprint.json`` to ``out_dir``; return the fingerprint.

    Rows are ``{"id": module, "path": relative path, "text": source}`` in sorted path order.
    ``source_dir`` defaults to the running interpreter's standard library.
    """
    _check_fractions(val_fraction, test_fraction)
    source = Path(source_dir) if source_dir is not None else stdlib_dir()
    files = list_source_files(source)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    listing = hashlib.sha256()
    for rel, text in files:
        module = module_name(rel)
        rows[split_of(module, val_fraction=val_fraction, test_fraction=test_fraction, salt=salt)].append(
            {"id": module, "path": rel, "text": text}
        )
        listing.update(f"{rel}\0{hashlib.sha256(text.encode()).hexdigest()}\n".encode())
    for split, split_rows in rows.items():
        if not split_rows:
            raise ValueError(f"split {split!r} is empty: {len(files)} files are too few for "
                             f"val_fraction={val_fraction}, test_fraction={test_fraction}")
    params = {"val_fraction": val_fraction, "test_fraction": test_fraction, "salt": salt,
              "format_version": FORMAT_VERSION}
    python = platform.python_version()
    overall = hashlib.sha256(listing.hexdigest().encode())
    overall.update(json.dumps({"python": python, **params}, sort_keys=True).encode())
    fingerprint = {
        "name": "stdlib" if source_dir is None else "python-source",
        "sha256": overall.hexdigest(),
        "files_sha256": listing.hexdigest(),
        "files": len(files),
        "bytes": sum(len(t.encode()) for _, t in files),
        "python": python,
        "split": params,
        "splits": {s: {"documents": len(r), "bytes": sum(len(x["text"].encode()) for x in r)}
                   for s, r in rows.items()},
        "excluded_dirs": sorted(EXCLUDED_DIRS),
    }
    write_splits(out_dir, rows, FINGERPRINT_FILE, fingerprint)
    return fingerprint


def write_splits(out_dir: str | os.PathLike, rows: dict[str, list[dict]], meta_file: str, meta: dict) -> None:
    """Write ``{split}.jsonl`` per split plus a JSON ``meta_file``, all at once (atomic directory)."""
    with atomic_directory(out_dir) as tmp:
        for split, split_rows in rows.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for row in split_rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / meta_file).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_rows(data_dir: str | os.PathLike, split: str, *, what: str = "corpus") -> list[dict]:
    """Rows of one split written by :func:`write_splits`, in file order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{what} split not found: {path} (run build_{what} first)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_split(data_dir: str | os.PathLike, split: str) -> list[str]:
    """Documents (file texts) of one split, in file order."""
    return [row["text"] for row in read_rows(data_dir, split)]


def read_fingerprint(data_dir: str | os.PathLike) -> dict:
    """The fingerprint written by :func:`build_corpus`."""
    path = Path(data_dir) / FINGERPRINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"corpus fingerprint not found: {path} (run build_corpus first)")
    return json.loads(path.read_text())

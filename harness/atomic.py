"""Atomic writes: a reader (or a resumed job) sees the old file or the whole new one, never a part.

The one place for them (records, predictions, task files, tables, figures, checkpoints, run
tables, whole output directories). Every file writer goes the same way: a temporary file in the
target's directory (so the rename cannot cross file systems), flushed and fsynced,
``os.replace``-d over the target, then the directory fsynced so that the rename itself survives
a crash. The temporary file is removed if writing fails. Files get the usual permissions
(``0o666`` less the umask), as ``open`` gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Replace ``path`` atomically by ``data``: text (UTF-8), bytes, or a function writing to a binary handle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if callable(data):
        write = data
    else:
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)

        def write(fh: IO[bytes]) -> None:
            fh.write(payload)

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def json_text(obj: Any) -> str:
    """The project's JSON file format: indented, sorted keys, no NaN or infinity, final newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (:func:`json_text`) atomically; an unserialisable ``obj`` fails before any file exists."""
    return write_atomic(path, json_text(obj))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, no NaN) atomically."""
    return write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows))


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints: a killed job leaves the previous one whole)."""
    import torch  # here, so that the JSON writers stay usable without torch

    return write_atomic(path, lambda fh: torch.save(obj, fh))


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out_dir`` only on success.

    A killed or failing job leaves ``out_dir`` untouched (or absent) instead of half-written.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; outputs are shared artefacts
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)

"""Atomic file writes: a reader (or a resumed job) sees the old file or the whole new one, never a part.

Every writer here goes the same way: a temporary file in the target's directory (so the rename
cannot cross file systems), flushed and fsynced, ``os.replace``-d over the target, then the
directory fsynced so that the rename itself survives a crash. The temporary file is removed
if writing fails. Files get the usual permissions (``0o666`` less the umask), as ``open`` gives.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Replace ``path`` atomically by what ``write`` writes to a binary file handle; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, lambda fh: fh.write(data))


def json_text(obj: Any) -> str:
    """The project's JSON file format: indented, sorted keys, no NaN or infinity, final newline."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (:func:`json_text`) atomically; an unserialisable ``obj`` fails before any file exists."""
    return write_bytes_atomic(path, json_text(obj).encode("utf-8"))


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (checkpoints: a killed job leaves the previous one whole)."""
    import torch  # here, so that the JSON writers stay usable without torch

    return write_atomic(path, lambda fh: torch.save(obj, fh))

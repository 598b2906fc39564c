"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path``.

    The temporary file lives in the target folder so the rename stays on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # even Ctrl-C: never leave a half-written temp file; re-raised
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_public(path: str | Path, data: bytes) -> Path:
    """Atomically write a file meant to be shared (a certificate, a public key): mode 0644."""
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)
    return Path(path)


def write_secret(path: str | Path, data: bytes) -> Path:
    """Write a private key readable by its owner only (0600), refusing to replace any file.

    The file is created with ``O_EXCL`` and mode 0600 in one call, so no other user can open it
    between creation and a later ``chmod``, and an existing key is never overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(fd, 0o600)  # the umask may have removed bits, never added them; be explicit
        handle.write(data)
        handle.flush()
        os.fsync(fd)
    return path


def read_json(path: Path, error: Callable[[str], Exception], fix: str = "") -> object:
    """A JSON file's content, or ``error`` naming the file, why it is unreadable and ``fix``
    (what to do)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: not readable JSON ({exc})" + (f"; {fix}" if fix else "")) from exc

"""Find the files of an export: every regular file under a folder, any name, no extension needed."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def list_files(src: str | Path, exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Every file under ``src`` (or ``src`` itself if it is a file), sorted for a stable order.

    Symbolic links to folders are not followed (no loops); ``exclude`` folders (the store, when
    it sits inside the export) are left out.
    """
    src = Path(src)
    if src.is_file():
        return [src]
    excluded = {os.path.realpath(p) for p in exclude}
    found: list[Path] = []
    for folder, dirnames, filenames in os.walk(src, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.realpath(os.path.join(folder, d)) not in excluded)
        found.extend(Path(folder) / name for name in sorted(filenames))
    return found

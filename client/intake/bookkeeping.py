"""What earlier ingests into a store already did, so a re-run neither redoes nor loses work.

``STORE/intake/index.json`` maps a keyed fingerprint of each accepted file (its path relative to
the export, size and modification time, HMAC'd with the store secret: no path is stored) to its
series key, and each series key to its store UIDs and the digest of the labels it was built
with. A re-run skips files whose series is in the store with unchanged labels without opening
them; anything else is read again and rewritten only if the result differs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.intake.deid import Pseudonymiser
from shared_model.files import atomic_write_text

INDEX_PATH = Path("intake") / "index.json"
INDEX_VERSION = 1


def file_fingerprint(pseudonymiser: Pseudonymiser, src: str | Path, path: str | Path) -> str:
    """Keyed digest of (relative path, size, mtime ns); '' when the file cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return stat_fingerprint(pseudonymiser, src, path, stat)


def stat_fingerprint(pseudonymiser: Pseudonymiser, src: str | Path, path: str | Path,
                     stat: os.stat_result) -> str:
    """:func:`file_fingerprint` from a stat the caller already has (a reader, as it opens)."""
    relative = _relative(os.fspath(path), os.fspath(src))
    return pseudonymiser.fingerprint(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}")


def _relative(path: str, src: str) -> str:
    """``os.path.relpath(path, src)``; for a normalised path under a normalised folder (what
    list_files gives) the tail of the string, without relpath's two getcwd calls."""
    if (path.startswith(src) and path[len(src):len(src) + 1] == os.sep
            and os.path.normpath(src) == src and os.path.normpath(path) == path):
        return path[len(src) + 1:]
    return os.path.relpath(path, src)


@dataclass
class IntakeIndex:
    """The store's intake bookkeeping (fingerprints and store UIDs only, no PHI)."""

    path: Path
    files: dict[str, str] = field(default_factory=dict)  # file fingerprint -> series key
    series: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> uids, label digest
    _saved: str = ""

    @classmethod
    def load(cls, store_root: str | Path) -> IntakeIndex:
        path = Path(store_root) / INDEX_PATH
        index = cls(path=path)
        if path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                if raw.get("version") == INDEX_VERSION:
                    index.files = dict(raw.get("files", {}))
                    index.series = dict(raw.get("series", {}))
            except (OSError, json.JSONDecodeError, AttributeError):
                pass  # a damaged index only costs a full re-read, never data
        index._saved = index._text()
        return index

    def _text(self) -> str:
        return json.dumps({"version": INDEX_VERSION, "files": self.files, "series": self.series},
                          sort_keys=True, separators=(",", ":"))

    def record_series(self, key: str, study_uid: str, series_uid: str, labels_digest: str,
                      fingerprints: list[str]) -> None:
        self.series[key] = {"study_uid": study_uid, "series_uid": series_uid,
                            "labels": labels_digest}
        for fingerprint in fingerprints:
            if fingerprint:
                self.files[fingerprint] = key

    def forget_series(self, key: str) -> None:
        """Drop a series and the files that pointed at it (they will be read again)."""
        self.series.pop(key, None)
        self.files = {fingerprint: k for fingerprint, k in self.files.items() if k != key}

    def save(self) -> bool:
        """Write the index if it changed; True when it wrote."""
        text = self._text()
        if text == self._saved:
            return False
        atomic_write_text(self.path, text)
        self._saved = text
        return True

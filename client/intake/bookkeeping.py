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


def file_fingerprint(pseudonymiser: Pseudonymiser, src: Path, path: Path) -> str:
    """Keyed digest of (relative path, size, mtime ns); '' when the file cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    relative = os.path.relpath(path, src)
    return pseudonymiser.fingerprint(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}")


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

    def save(self) -> bool:
        """Write the index if it changed; True when it wrote."""
        text = self._text()
        if text == self._saved:
            return False
        atomic_write_text(self.path, text)
        self._saved = text
        return True

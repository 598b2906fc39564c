"""The ingest summary: counts only, as ``STORE/ingest-summary.json`` and as a table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from client.intake.reasons import REASONS
from shared_model.files import atomic_write_text

SUMMARY_NAME = "ingest-summary.json"


@dataclass
class IngestSummary:
    """What one ``fedcmr-client ingest`` run did. No header value, path or UID appears here.

    ``files_seen = files_accepted + sum(skipped.values())``: every file is either in a stored
    series (this run or an earlier one) or skipped with one reason.
    """

    format: str = "dicom"
    files_seen: int = 0
    files_accepted: int = 0
    series: int = 0  # series of this export in the store after the run
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files
    series_skipped: dict[str, int] = field(default_factory=dict)  # QC reason -> series
    # QC reason -> series kept as single frames (for pretraining) because they are no stack
    series_as_frames: dict[str, int] = field(default_factory=dict)
    files_read: int = 0  # opened this run (the rest were known from an earlier run)
    series_written: int = 0  # new or changed this run
    series_unchanged: int = 0
    subjects: int = 0
    labels: dict[str, Any] = field(default_factory=dict)  # counts of labelled series/frames
    label_problems: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    files_per_second: float = 0.0

    def add_skips(self, counts: Counter) -> None:
        merged = Counter(self.skipped) + counts
        self.skipped = dict(sorted(merged.items()))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False)

    def write(self, store_root: str | Path) -> Path:
        return atomic_write_text(Path(store_root) / SUMMARY_NAME, self.to_json() + "\n")

    def table(self) -> Table:
        """The summary as a rich table: totals, then each skip reason with what it means."""
        table = Table(title=f"ingest summary ({self.format})", show_header=True)
        table.add_column("item")
        table.add_column("count", justify="right")
        table.add_column("meaning", overflow="fold")
        rows = [
            ("files seen", self.files_seen, "files found under the source folder"),
            ("files accepted", self.files_accepted, "files whose images are in the store"),
            ("files read", self.files_read, "opened this run (others known from an earlier run)"),
            ("series", self.series, "series of this source in the store"),
            ("series written", self.series_written, "new or changed this run"),
            ("subjects", self.subjects, "pseudonymised subjects of this source"),
        ]
        for name, count, meaning in rows:
            table.add_row(name, str(count), meaning)
        for reason, count in sorted(self.skipped.items()):
            table.add_row(f"skipped: {reason}", str(count), REASONS.get(reason, ""))
        for reason, count in sorted(self.series_as_frames.items()):
            table.add_row(f"kept as frames: {reason}", str(count),
                          f"series with no stack ({REASONS.get(reason, '')}): frames kept "
                          "for pretraining")
        for name, count in sorted(self.labels.items()):
            table.add_row(f"labels: {name}", str(count), "")
        for problem, count in sorted(self.label_problems.items()):
            table.add_row(f"label problem: {problem}", str(count), "labels ignored for these")
        table.add_row("files/s", f"{self.files_per_second:.1f}", f"over {self.seconds:.1f} s")
        return table

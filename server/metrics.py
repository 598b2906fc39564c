"""Per-round metrics on the server: per site and aggregated, as JSON and CSV in the run folder."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from shared_model.files import atomic_write_text

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"


def weighted_mean(items: list[tuple[int, dict[str, float | int]]]) -> dict[str, float]:
    """Example-weighted mean of every metric the sites reported."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for num_examples, metrics in items:
        for key, value in metrics.items():
            if key == "site_index":
                continue
            totals[key] = totals.get(key, 0.0) + num_examples * float(value)
            weights[key] = weights.get(key, 0.0) + num_examples
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}


@dataclass
class RoundRecord:
    round: int
    phase: str
    status: str  # "aggregated", or "skipped" when too few valid replies came back
    seconds: float
    sites: dict[str, dict[str, float | int]]
    aggregate: dict[str, float | int | str | bool | bytes]
    excluded: dict[str, str] = field(default_factory=dict)


class MetricsLog:
    """Appends one record per round and rewrites the files atomically."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.records: list[RoundRecord] = []

    def add(self, record: RoundRecord) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        payload = [r.__dict__ for r in self.records]
        atomic_write_text(self.run_dir / METRICS_JSON, json.dumps(payload, indent=1))
        atomic_write_text(self.run_dir / METRICS_CSV, self._csv())

    def _csv(self) -> str:
        rows = []
        for r in self.records:
            rows.append({"round": r.round, "phase": r.phase, "site": "all", "status": r.status,
                         "round_seconds": round(r.seconds, 3), **r.aggregate})
            for site, metrics in sorted(r.sites.items()):
                rows.append({"round": r.round, "phase": r.phase, "site": site, **metrics})
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


def read_records(run_dir: str | Path) -> list[dict]:
    """The per-round records a run wrote (empty if it wrote none)."""
    path = Path(run_dir) / METRICS_JSON
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

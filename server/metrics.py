"""Per-round records on the server: per site and aggregated, as JSON, CSV and TensorBoard.

Only what nodes reported (allow-listed scalars) and what the server computed appear here.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from shared_model.errors import UserError
from shared_model.files import atomic_write_text, read_json

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def weighted_mean(items: list[tuple[int, dict[str, float | int]]]) -> dict[str, float]:
    """Example-weighted mean of every metric the sites reported."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for num_examples, metrics in items:
        for key, value in metrics.items():
            if key == "site_index" or isinstance(value, (str, bytes)):
                continue
            totals[key] = totals.get(key, 0.0) + num_examples * float(value)
            weights[key] = weights.get(key, 0.0) + num_examples
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}


class RecordKind(StrEnum):
    fit = "fit"  # a training round
    evaluate = "evaluate"  # an evaluation at every site


class RoundStatus(StrEnum):
    aggregated = "aggregated"
    skipped = "skipped"  # too few valid replies: the global model stayed as it was
    halted = "halted"  # SecAgg+ aborted the round (too few sites finished it): the model stayed
    evaluated = "evaluated"


@dataclass
class RoundRecord:
    round: int  # global round number
    phase: str  # "pretrain", "finetune:<task>"
    status: RoundStatus
    seconds: float
    sites: dict[str, dict[str, float | int]]
    aggregate: dict[str, float | int | str | bool | bytes]
    excluded: dict[str, str] = field(default_factory=dict)
    kind: RecordKind = RecordKind.fit

    @classmethod
    def from_json(cls, record: dict) -> RoundRecord:
        """A record as :func:`read_records` returns it."""
        return cls(**{**record, "status": RoundStatus(record["status"]), "kind": RecordKind(record["kind"])})


class MetricsLog:
    """Appends one record per round and rewrites the files atomically; resumes from them."""

    def __init__(self, run_dir: str | Path, resume: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.records: list[RoundRecord] = []
        if resume and (self.run_dir / METRICS_JSON).is_file():
            self.records = [RoundRecord.from_json(r) for r in read_records(self.run_dir)]
        self._writer: SummaryWriter | None = None

    def add(self, record: RoundRecord) -> None:
        self.records.append(record)
        self.write()
        self._tensorboard(record)

    def truncate_after(self, global_round: int) -> None:
        """Forget records of rounds a resumed run will redo."""
        self.records = [r for r in self.records if r.round <= global_round]
        self.write()

    def write(self) -> None:
        payload = [asdict(r) for r in self.records]
        atomic_write_text(self.run_dir / METRICS_JSON, json.dumps(payload, indent=1))
        atomic_write_text(self.run_dir / METRICS_CSV, self._csv())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _tensorboard(self, record: RoundRecord) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))
        prefix = f"{record.phase}/{record.kind}"
        for key, value in record.aggregate.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{key}", value, record.round)
        for site, metrics in record.sites.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "site_index":
                    self._writer.add_scalar(f"{prefix}/{site}/{key}", value, record.round)
        self._writer.flush()

    def _csv(self) -> str:
        rows = []
        for r in self.records:
            base = {"round": r.round, "phase": r.phase, "kind": r.kind}
            rows.append({**base, "site": "all", "status": r.status,
                         "round_seconds": round(r.seconds, 3), **r.aggregate})
            for site, metrics in sorted(r.sites.items()):
                rows.append({**base, "site": site, **metrics})
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()


class RunFileError(UserError, ValueError):
    """A file of a run folder (metrics.json, status.json) that cannot be read; names the file."""


_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "round": int, "phase": str, "status": str, "seconds": (int, float), "sites": dict,
    "aggregate": dict, "excluded": dict, "kind": str}
_RECORD_DEFAULTS = {"excluded": {}, "kind": str(RecordKind.fit)}
_RECORD_CHOICES: dict[str, type[StrEnum]] = {"status": RoundStatus, "kind": RecordKind}


def read_json_file(path: Path, what: str) -> object:
    """A run folder's JSON file, or :class:`RunFileError` naming it (``what``: what to do)."""
    return read_json(path, RunFileError, what)


def read_records(run_dir: str | Path) -> list[dict]:
    """The per-round records a run wrote (none: empty); :class:`RunFileError` if damaged."""
    path = Path(run_dir) / METRICS_JSON
    if not path.is_file():
        return []
    fix = "restore it, or move it away to start the records afresh"
    raw = read_json_file(path, fix)
    if not isinstance(raw, list):
        raise RunFileError(f"{path}: expected a list of round records; {fix}")
    records = []
    for i, record in enumerate(raw):
        if not isinstance(record, dict):
            raise RunFileError(f"{path}: record {i} is not an object; {fix}")
        record = {**_RECORD_DEFAULTS, **record}
        unknown = sorted(set(record) - set(_RECORD_TYPES))
        if unknown:
            raise RunFileError(f"{path}: record {i} has unknown field '{unknown[0]}'; {fix}")
        for name, kind in _RECORD_TYPES.items():
            if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
                raise RunFileError(f"{path}: record {i} field '{name}' is missing or of the "
                                   f"wrong type; {fix}")
        for name, choices in _RECORD_CHOICES.items():
            if record[name] not in {c.value for c in choices}:
                raise RunFileError(f"{path}: record {i} field '{name}' is {record[name]!r}, not one of "
                                   f"{', '.join(choices)}; {fix}")
        records.append(record)
    return records

"""How a federation run ended: ``status.json`` in its folder, written once at the end.

``fedcmr-server status`` and ``fedcmr-sim`` read it back; a run without one is still running or
was interrupted (resume it with ``output.resume=true``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from server.metrics import RunFileError, read_json_file
from shared_model.files import atomic_write_text

STATUS_FILE = "status.json"


class RunStatus(StrEnum):
    released = "released"  # every phase ran and release/ was written
    finished = "finished"  # every phase ran; the plan asked for no release
    # stopped after output.stop_after_round, or a round found too few sites connected
    # (federation.site_wait_s); continue with output.resume=true
    paused = "paused"
    stopped = "stopped"  # the next round would exceed the privacy budget; nothing released
    # a phase ended without one aggregated round (every reply failed or was excluded): its
    # model is the untrained start, so nothing is released
    failed = "failed"


@dataclass(frozen=True)
class Outcome:
    run_dir: Path
    status: RunStatus
    detail: str = ""  # released: the release folder; paused, stopped: why


def write_outcome(outcome: Outcome) -> Outcome:
    atomic_write_text(outcome.run_dir / STATUS_FILE,
                      json.dumps({"status": str(outcome.status), "detail": outcome.detail}, indent=1))
    return outcome


def read_outcome(run_dir: Path) -> Outcome | None:
    """The run's outcome; None while it has none; :class:`RunFileError` naming a damaged file."""
    path = run_dir / STATUS_FILE
    if not path.is_file():
        return None
    fix = "restore it, or delete it (the run rewrites it when it ends)"
    written = read_json_file(path, fix)
    if not isinstance(written, dict) or not isinstance(written.get("status"), str):
        raise RunFileError(f"{path}: no 'status' field; {fix}")
    if written["status"] not in {s.value for s in RunStatus}:
        raise RunFileError(f"{path}: unknown status {written['status']!r}; {fix}")
    detail = written.get("detail", "")
    if not isinstance(detail, str):
        raise RunFileError(f"{path}: field 'detail' is not a string; {fix}")
    return Outcome(run_dir, RunStatus(written["status"]), detail)

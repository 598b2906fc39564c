"""``fedcmr-client ingest``: a DICOM export -> de-identified, checked series in the local store.

scan -> read (process pool: checks, pixels, store grid, pseudonyms) -> group by series ->
order and QC -> labels -> store (array, then manifest) -> summary. Each file is isolated: a bad
one is a counted skip, never a crash, and what was stored stays stored. A re-run of the same
export opens only what an earlier run did not finish (see :mod:`client.intake.bookkeeping`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from client.intake.bookkeeping import IntakeIndex, file_fingerprint
from client.intake.deid import Pseudonymiser, load_or_create_secret, quiet_pydicom
from client.intake.label_files import AppliedLabels, NodeLabels, apply_labels
from client.intake.reading import InstanceReader, InstanceResult, ReadSettings
from client.intake.reasons import SkipSeries
from client.intake.scan import list_files
from client.intake.series import MAP_SEQUENCES, SeriesParts, build_series, intensity_windows
from client.intake.summary import IngestSummary
from client.intake.workers import read_in_workers
from client.store import LocalStore, SeriesRecord

log = logging.getLogger(__name__)

CHUNK_FILES = 16  # files per worker task: fewer round trips, still a smooth progress bar
SERIAL_BELOW = 48  # fewer files than this are read in-process (processes cost more than they save)
PROGRESS_FROM = 200  # show a progress bar from this many files on
INDEX_SAVE_EVERY_S = 5.0


class IntakeError(ValueError):
    """A problem with the ingest's arguments (not with the data); the message says what to do."""


@dataclass
class IngestOptions:
    """One ingest: where from, where to, at which store grid, with how many processes."""

    src: Path
    store: Path
    spacing_mm: float
    crop_px: int
    labels: Path | None = None
    workers: int = 0  # reading processes; 0: up to 2 (the test machines' cores)
    progress: bool = True
    skipped_list: Path | None = None  # node-local CSV of (relative path, reason); never in the store
    console: Console | None = None

    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else max(1, min(2, os.cpu_count() or 1))


def check_paths(options: IngestOptions) -> None:
    """Refuse arguments that cannot work, before anything is written."""
    src, store = options.src.resolve(), options.store.resolve()
    if not options.src.exists():
        raise IntakeError(f"source {options.src} does not exist; pass the folder of the export")
    if src == store or store in src.parents:
        raise IntakeError(f"source {options.src} lies inside the store {options.store}; "
                          "pass the export folder and a separate --out folder")
    if options.labels is not None and not options.labels.exists():
        raise IntakeError(f"label path {options.labels} does not exist; pass the folder holding "
                          "series.csv / studies.csv / landmarks.csv / masks/")
    if options.skipped_list is not None:
        listed = options.skipped_list.resolve()
        if listed == store or store in listed.parents:
            raise IntakeError(f"--skipped-list {options.skipped_list} would put file paths into "
                              "the store; write it outside the store folder")


# ---------------------------------------------------------------- progress

class _Progress:
    """A rich progress bar for long runs, pausable while worker processes are forked."""

    def __init__(self, console: Console | None, total: int, enabled: bool) -> None:
        self._bar: Progress | None = None
        if enabled and total >= PROGRESS_FROM:
            self._bar = Progress(TextColumn("reading"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console or Console(stderr=True),
                                 transient=True)
            self._task = self._bar.add_task("reading", total=total)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        if self._bar is None:
            yield
            return
        self._bar.start()
        try:
            yield
        finally:
            self._bar.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No display thread while a pool forks its workers (a fork copies held locks)."""
        if self._bar is None or not self._bar.live.is_started:
            yield
            return
        self._bar.stop()
        try:
            yield
        finally:
            self._bar.start()


# ---------------------------------------------------------------- reading

def _read_serial(items: list[tuple[int, str]], settings: ReadSettings,
                 progress: _Progress) -> list[InstanceResult]:
    reader = InstanceReader(settings)
    out = []
    with quiet_pydicom():
        for index, path in items:
            out.append(reader.read(index, path))
            progress.advance(1)
    return out


def read_files(items: list[tuple[int, str]], settings: ReadSettings, workers: int,
               progress: _Progress) -> list[InstanceResult]:
    """Read files, results sorted by scan index.

    In worker processes (isolated: a file that kills or hangs its reader costs only itself),
    except for a handful of files, where starting processes costs more than reading.
    """
    if len(items) < SERIAL_BELOW:
        results = _read_serial(items, settings, progress)
    else:
        results = read_in_workers(items, settings, workers, CHUNK_FILES, progress.advance,
                                  progress.paused)
    return sorted(results, key=lambda r: r.index)


# ---------------------------------------------------------------- storing

def _comparable(record: SeriesRecord) -> dict:
    data = asdict(record)
    for name in ("array", "mask", "shape"):
        data.pop(name, None)
    return data


def commit_series(store: LocalStore, record: SeriesRecord, images: np.ndarray,
                  mask: np.ndarray | None) -> bool:
    """Write a series unless the store already holds exactly it; True when it wrote."""
    old = store.manifest.series.get(record.key)
    if (old is not None and _comparable(old) == _comparable(record)
            and bool(old.mask) == (mask is not None)):
        try:
            same = np.array_equal(store.load(record.key), images.astype(np.float16))
            if same and mask is not None:
                same = np.array_equal(store.load_mask(record.key), mask)
        except Exception:  # noqa: BLE001 - unreadable old data: rewrite it
            same = False
        if same:
            return False
    store.add_series(record, images, mask)
    return True


# ---------------------------------------------------------------- the run

@dataclass
class _Run:
    """State of one DICOM ingest."""

    options: IngestOptions
    labels: NodeLabels
    store: LocalStore
    pseudonymiser: Pseudonymiser
    index: IntakeIndex
    summary: IngestSummary
    settings: ReadSettings
    files: list[Path] = field(default_factory=list)
    fingerprints: list[str] = field(default_factory=list)
    skips: Counter = field(default_factory=Counter)
    skipped_files: list[tuple[int, str]] = field(default_factory=list)
    export_keys: set[str] = field(default_factory=set)
    last_index_save: float = 0.0


def _known(run: _Run, i: int) -> str:
    """The series key of file i if an earlier run stored it with today's labels, else ''."""
    key = run.index.files.get(run.fingerprints[i], "")
    entry = run.index.series.get(key)
    if not key or entry is None or not run.store.has(key):
        return ""
    return key if entry.get("labels", "") == run.labels.digest(entry.get("series_uid", "")) else ""


def _collect(run: _Run, results: list[InstanceResult], parts: dict[str, SeriesParts],
             seen: dict[str, set[str]]) -> None:
    for result in results:
        if result.reason:
            run.skips[result.reason] += 1
            run.skipped_files.append((result.index, result.reason))
            continue
        if result.instance in seen.setdefault(result.key, set()):
            run.skips["duplicate_instance"] += 1
            run.skipped_files.append((result.index, "duplicate_instance"))
            continue
        seen[result.key].add(result.instance)
        entry = parts.setdefault(result.key, SeriesParts(
            key=result.key, subject=result.subject, study_uid=result.study_uid,
            series_uid=result.series_uid))
        entry.frames.extend(result.frames)
        entry.files.append(result.index)
        if result.hints is not None:
            entry.hints.append(result.hints)


def _finish(run: _Run, parts: SeriesParts) -> None:
    """QC, labels and store write for one series; its files count as accepted or skipped."""
    options = run.options
    try:
        built = build_series(parts)
    except SkipSeries as skip:
        _skip_series(run, parts, skip.reason)
        return
    except Exception:  # noqa: BLE001 - a series the QC did not foresee costs itself only
        _skip_series(run, parts, "unexpected_error")
        return
    try:
        applied = apply_labels(built, run.labels, options.crop_px, options.spacing_mm)
    except Exception:  # noqa: BLE001 - broken labels cost the labels, never the images
        run.labels.problems["unusable_labels"] += 1
        applied = AppliedLabels()
    info = {**built.info, **applied.info}
    if MAP_SEQUENCES & {built.sequence, applied.classes.get("sequence")}:
        info["intensity_window"] = intensity_windows(built.grid)
    record = SeriesRecord(
        key=built.key, array="", shape=[], sequence=built.sequence, view=built.view,
        subject=built.subject, info=info, labeled_frames=applied.labeled_frames,
        landmarks=applied.landmarks, classes=applied.classes, partial_labels=applied.partial)
    if commit_series(run.store, record, built.images, applied.mask):
        run.summary.series_written += 1
    else:
        run.summary.series_unchanged += 1
    run.index.record_series(built.key, built.study_uid, built.series_uid,
                            run.labels.digest(built.series_uid),
                            [run.fingerprints[i] for i in parts.files])
    run.summary.files_accepted += len(parts.files)
    run.export_keys.add(built.key)
    if time.monotonic() - run.last_index_save > INDEX_SAVE_EVERY_S:
        run.index.save()
        run.last_index_save = time.monotonic()


def _skip_series(run: _Run, parts: SeriesParts, reason: str) -> None:
    run.skips[reason] += len(parts.files)
    run.skipped_files.extend((i, reason) for i in parts.files)
    run.summary.series_skipped[reason] = run.summary.series_skipped.get(reason, 0) + 1


def _apply_study_labels(run: _Run) -> None:
    for key in sorted(run.export_keys):
        study = run.index.series.get(key, {}).get("study_uid", "")
        labels = run.labels.studies.get(study)
        subject = run.store.manifest.series[key].subject
        if labels and any(run.store.manifest.subjects.get(subject, {}).get(k) != v
                          for k, v in labels.items()):
            run.store.set_subject_labels(subject, labels)


def _label_counts(run: _Run) -> dict[str, int]:
    records = [run.store.manifest.series[k] for k in sorted(run.export_keys)]
    return {
        "series_with_mask": sum(1 for r in records if r.mask),
        "labeled_frames": sum(len(r.labeled_frames) for r in records),
        "partially_labeled_frames": sum(len(r.partial_labels) for r in records),
        "landmark_frames": sum(len(r.landmarks) for r in records),
        "series_with_classes": sum(1 for r in records if r.classes),
        "subjects_with_labels": sum(1 for s in {r.subject for r in records}
                                    if run.store.manifest.subjects.get(s)),
    }


def _write_skipped_list(run: _Run) -> None:
    path = run.options.skipped_list
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        for i, reason in sorted(run.skipped_files):
            writer.writerow([os.path.relpath(run.files[i], run.options.src), reason])


def open_store(options: IngestOptions) -> tuple[LocalStore, str]:
    """The store (created if new) and its de-identification secret (created if new)."""
    check_paths(options)
    store = LocalStore.create(options.store, options.spacing_mm, options.crop_px)
    return store, load_or_create_secret(options.store)


def run_dicom_intake(options: IngestOptions, labels: NodeLabels | None = None,
                     fmt: str = "dicom", scan_root: Path | None = None,
                     opened: tuple[LocalStore, str] | None = None) -> IngestSummary:
    """Ingest every DICOM file under ``scan_root`` (default ``options.src``)."""
    started = time.monotonic()
    store, secret = opened or open_store(options)
    pseudonymiser = Pseudonymiser(secret)
    labels = labels or NodeLabels()
    root = scan_root or options.src
    run = _Run(options=options, labels=labels, store=store, pseudonymiser=pseudonymiser,
               index=IntakeIndex.load(options.store), summary=IngestSummary(format=fmt),
               settings=ReadSettings(spacing_mm=options.spacing_mm, crop_px=options.crop_px,
                                     secret=secret, landmark_sops=labels.landmark_sops))
    run.files = list_files(root, exclude=[options.store])
    run.fingerprints = [file_fingerprint(pseudonymiser, root, f) for f in run.files]
    try:
        _ingest_files(run)
    finally:
        run.index.save()
    _apply_study_labels(run)
    return _summarise(run, started)


def _ingest_files(run: _Run) -> None:
    known = {i: key for i in range(len(run.files)) if (key := _known(run, i))}
    to_read = [i for i in range(len(run.files)) if i not in known]
    progress = _Progress(run.options.console, len(to_read), run.options.progress)
    parts: dict[str, SeriesParts] = {}
    seen: dict[str, set[str]] = {}
    workers = run.options.worker_count()
    with progress.running():
        results = read_files([(i, str(run.files[i])) for i in to_read], run.settings, workers, progress)
    _collect(run, results, parts, seen)
    del results
    # A new file joining a series stored earlier: read that series' known files too, rebuild it.
    extra = sorted(i for i, key in known.items() if key in parts)
    if extra:
        for i in extra:
            known.pop(i)
        _collect(run, read_files([(i, str(run.files[i])) for i in extra], run.settings, workers,
                                 _Progress(None, 0, False)), parts, seen)
    run.summary.files_read = len(to_read) + len(extra)
    for key in sorted(parts):
        _finish(run, parts.pop(key))
    run.summary.files_accepted += len(known)
    run.export_keys.update(known.values())


def _summarise(run: _Run, started: float) -> IngestSummary:
    summary = run.summary
    summary.files_seen = len(run.files)
    summary.add_skips(run.skips)
    summary.series = len(run.export_keys)
    summary.subjects = len({run.store.manifest.series[k].subject for k in run.export_keys})
    summary.labels = _label_counts(run)
    matched = {run.index.series.get(k, {}).get("series_uid") for k in run.export_keys}
    unmatched = len(set(run.labels.series) - matched)
    if unmatched:
        run.labels.problems["labels_for_series_not_in_export"] += unmatched
    summary.label_problems = dict(sorted(run.labels.problems.items()))
    summary.series_skipped = dict(sorted(summary.series_skipped.items()))
    summary.seconds = round(time.monotonic() - started, 3)
    summary.files_per_second = round(summary.files_seen / max(summary.seconds, 1e-6), 1)
    summary.write(run.options.store)
    _write_skipped_list(run)
    log.info("ingest: %d files seen, %d accepted, %d series, %d skipped", summary.files_seen,
             summary.files_accepted, summary.series, sum(summary.skipped.values()))
    return summary


def ingest(options: IngestOptions, fmt: str = "dicom") -> IngestSummary:
    """Run one ingest of ``options.src`` in the given format (see :mod:`client.adapters`)."""
    from client.adapters import run_adapter

    return run_adapter(options, fmt)

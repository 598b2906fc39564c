"""``fedcmr-client ingest``: a DICOM export -> de-identified, checked series in the local store.

scan -> read (worker processes: checks, pixels, store grid, pseudonyms) -> group by series
(:mod:`client.intake.assembly`) -> order and QC -> labels -> store (array, then manifest; in a
writer thread, :mod:`client.intake.store_writer`) -> summary. A series whose folders the scan
has left is built and written while the rest is read. Each file is isolated: a bad one is a
counted skip, never a crash, and what was stored stays stored. A re-run of the same export
opens only what an earlier run did not finish (see :mod:`client.intake.bookkeeping`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from client.intake.assembly import SeriesAssembly
from client.intake.bookkeeping import IntakeIndex, file_fingerprint
from client.intake.deid import Pseudonymiser, load_or_create_secret, quiet_pydicom
from client.intake.label_files import AppliedLabels, NodeLabels, apply_labels
from client.intake.reading import InstanceReader, InstanceResult, ReadSettings
from client.intake.reasons import SkipSeries
from client.intake.scan import list_files
from client.intake.series import MAP_SEQUENCES, SeriesParts, build_series, intensity_windows
from client.intake.store_writer import StoreWriter
from client.intake.summary import IngestSummary
from client.intake.workers import read_in_workers
from client.store import LocalStore, SeriesRecord
from shared_model.errors import UserError

log = logging.getLogger(__name__)

CHUNK_FILES = 16  # files per worker task: fewer round trips, still a smooth progress bar
SERIAL_BELOW = 48  # fewer files than this are read in-process (processes cost more than they save)
PROGRESS_FROM = 200  # show a progress bar from this many files on
INDEX_SAVE_EVERY_S = 5.0


class IntakeError(UserError, ValueError):
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
    # nnU-Net datasets: label name -> store structure (beyond the known names), and the
    # sequence/view of its cases where dataset.json does not tell
    label_map: dict[str, str] = field(default_factory=dict)
    sequence: str | None = None
    view: str | None = None
    # Dataset adapters (sunnybrook, nnunet): take only these patients (the dataset's own patient
    # names; None: all), never these, and (nnunet) only cases of these groups of cases.csv
    patients: frozenset[str] | None = None
    exclude_patients: frozenset[str] = frozenset()
    groups: frozenset[str] | None = None

    def takes_patient(self, *names: str, group: str = "") -> bool:
        """Whether a dataset adapter ingests the patient known by ``names`` (a dataset may
        name one patient twice, e.g. Sunnybrook's folder and contour ids), and its group."""
        return ((self.patients is None or bool(self.patients.intersection(names)))
                and not self.exclude_patients.intersection(names)
                and (self.groups is None or group in self.groups))

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

def _read_serial(items: list[tuple[int, str]], settings: ReadSettings, progress: _Progress,
                 deliver: Callable[[list[InstanceResult]], None]) -> list[tuple[int, str]]:
    """Read in this process what is safe to read here; the files it left to a reading process."""
    reader = InstanceReader(settings, in_process=True)
    deferred = []
    with quiet_pydicom():
        for index, path in items:
            result = reader.read_or_defer(index, path)
            if result is None:
                deferred.append((index, path))
                continue
            deliver([result])
            progress.advance(1)
    return deferred


def read_files(items: list[tuple[int, str]], settings: ReadSettings, workers: int,
               progress: _Progress, deliver: Callable[[list[InstanceResult]], None],
               forking: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
    """Read files, handing results to ``deliver`` as they come (not in scan order).

    In worker processes (isolated and bounded in memory and time: a file that kills or hangs its
    reader costs only itself), except for a handful of files, where starting processes costs
    more than reading: those are read here when natively encoded and small, and the rest
    (compressed pixels, large files) still in a worker. ``forking()`` is entered around each
    fork (default: the progress bar pauses).
    """
    if len(items) < SERIAL_BELOW:
        items = _read_serial(items, settings, progress, deliver)
        workers = min(workers, len(items))
    if items:
        read_in_workers(items, settings, workers, CHUNK_FILES, progress.advance,
                        forking or progress.paused, deliver=deliver)


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
    early: dict[str, _Outcome] = field(default_factory=dict)  # settled series, not yet counted
    last_index_save: float = 0.0


@dataclass
class _Outcome:
    """What finishing one series did, counted once it is final (see _report)."""

    key: str
    study_uid: str
    series_uid: str
    files: list[int]  # scan indices
    fingerprints: list[str]
    reason: str = ""  # why QC skipped it; "" when the store holds it
    written: bool = False  # False: the store already held exactly this
    labels_digest: str = ""
    problems: Counter = field(default_factory=Counter)  # label problems found building it
    as_frames: str = ""  # stored as single frames, not a stack: the QC reason why

    @classmethod
    def of(cls, parts: SeriesParts, **kwargs: Any) -> _Outcome:
        return cls(key=parts.key, study_uid=parts.study_uid, series_uid=parts.series_uid,
                   files=list(parts.files), fingerprints=list(parts.fingerprints), **kwargs)


def _known(run: _Run, i: int) -> str:
    """The series key of file i if an earlier run stored it with today's labels, else ''."""
    key = run.index.files.get(run.fingerprints[i], "")
    entry = run.index.series.get(key)
    if not key or entry is None or not run.store.has(key):
        return ""
    return key if entry.get("labels", "") == run.labels.digest(entry.get("series_uid", "")) else ""


def _skip_file(run: _Run, index: int, reason: str) -> None:
    run.skips[reason] += 1
    run.skipped_files.append((index, reason))


def _finish(run: _Run, parts: SeriesParts, writer: StoreWriter, early: bool) -> None:
    """QC and labels for one series here, its store write in the writer's thread.

    ``early``: a settled series (see :mod:`client.intake.assembly`), which may still reopen.
    """
    options = run.options
    problems: Counter = Counter()
    try:
        built = build_series(parts)
    except SkipSeries as skip:
        _report(run, _Outcome.of(parts, reason=skip.reason), writer, early)
        return
    except Exception:  # noqa: BLE001 - a series the QC did not foresee costs itself only
        _report(run, _Outcome.of(parts, reason="unexpected_error"), writer, early)
        return
    try:
        applied = apply_labels(built, replace(run.labels, problems=problems), options.crop_px,
                               options.spacing_mm)
    except Exception:  # noqa: BLE001 - broken labels cost the labels, never the images
        problems["unusable_labels"] += 1
        applied = AppliedLabels()
    info = {**built.info, **applied.info}
    if MAP_SEQUENCES & {built.sequence, applied.classes.get("sequence")}:
        info["intensity_window"] = intensity_windows(built.grid)
    record = SeriesRecord(
        key=built.key, array="", shape=[], sequence=built.sequence, view=built.view,
        subject=built.subject, info=info, labeled_frames=applied.labeled_frames,
        landmarks=applied.landmarks, classes=applied.classes, partial_labels=applied.partial)
    outcome = _Outcome.of(parts, labels_digest=run.labels.digest(built.series_uid),
                          problems=problems, as_frames=str(built.info.get("not_a_stack", "")))

    def written(wrote: bool) -> None:
        outcome.written = wrote
        _report(run, outcome, writer, early)

    images, mask, store = built.images, applied.mask, run.store
    writer.submit(lambda: commit_series(store, record, images, mask), written)


def _report(run: _Run, outcome: _Outcome, writer: StoreWriter, early: bool) -> None:
    """A series outcome, in the main thread: counted now, or (settled) at the end of the run.

    A settled series that reopened was finished again from all its files; if that version
    fails QC, what was written early is taken out of the store again.
    """
    if early:
        run.early[outcome.key] = outcome
        if not outcome.reason:
            _index_series(run, outcome)  # an interrupted run keeps what it wrote
        return
    before = run.early.pop(outcome.key, None)
    if before is not None and not before.reason:
        if outcome.reason:
            store, key = run.store, outcome.key
            writer.submit(lambda: store.remove_series(key), lambda _: None)
            run.index.forget_series(key)
        else:
            outcome.written = outcome.written or before.written
    _count(run, outcome)


def _count(run: _Run, outcome: _Outcome) -> None:
    """Add a final series outcome to the summary, the skip list and the index."""
    run.labels.problems.update(outcome.problems)
    if outcome.reason:
        run.skips[outcome.reason] += len(outcome.files)
        run.skipped_files.extend((i, outcome.reason) for i in outcome.files)
        skipped = run.summary.series_skipped
        skipped[outcome.reason] = skipped.get(outcome.reason, 0) + 1
        return
    if outcome.as_frames:
        kept = run.summary.series_as_frames
        kept[outcome.as_frames] = kept.get(outcome.as_frames, 0) + 1
    if outcome.written:
        run.summary.series_written += 1
    else:
        run.summary.series_unchanged += 1
    _index_series(run, outcome)
    run.summary.files_accepted += len(outcome.files)
    run.export_keys.add(outcome.key)


def _index_series(run: _Run, outcome: _Outcome) -> None:
    run.index.record_series(outcome.key, outcome.study_uid, outcome.series_uid,
                            outcome.labels_digest, outcome.fingerprints)
    if time.monotonic() - run.last_index_save > INDEX_SAVE_EVERY_S:
        run.index.save()
        run.last_index_save = time.monotonic()


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
                     opened: tuple[LocalStore, str] | None = None,
                     excluded_folders: tuple[Path, ...] = ()) -> IngestSummary:
    """Ingest every DICOM file under ``scan_root`` (default ``options.src``), except those in
    ``excluded_folders`` (patients an adapter leaves out)."""
    started = time.monotonic()
    store, secret = opened or open_store(options)
    pseudonymiser = Pseudonymiser(secret)
    labels = labels or NodeLabels()
    root = scan_root or options.src
    run = _Run(options=options, labels=labels, store=store, pseudonymiser=pseudonymiser,
               index=IntakeIndex.load(options.store), summary=IngestSummary(format=fmt),
               settings=ReadSettings(spacing_mm=options.spacing_mm, crop_px=options.crop_px,
                                     secret=secret, landmark_sops=labels.landmark_sops,
                                     scan_root=str(root)))
    run.files = list_files(root, exclude=[options.store, *excluded_folders])
    if run.index.files:  # an earlier run stored files: find them before reading anything
        run.fingerprints = [file_fingerprint(pseudonymiser, root, f) for f in run.files]
    else:  # a new store: the readers fingerprint the files they accept, in parallel
        run.fingerprints = [""] * len(run.files)
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
    stored_before = frozenset(run.store.manifest.series)  # only new series settle early
    with StoreWriter() as writer:
        assembly = SeriesAssembly(
            folder_of=_folder_numbers(run.files), may_settle=lambda key: key not in stored_before,
            on_skip=lambda i, reason: _skip_file(run, i, reason),
            on_settled=lambda parts: _finish(run, parts, writer, early=True))
        with progress.running():
            _read_pass(run, assembly, to_read, progress, writer, settling=True)
        # A new file joining a series stored earlier: read that series' known files too, rebuild it.
        extra = [i for i, key in known.items() if key in assembly.parts]
        for i in extra:
            known.pop(i)
        again = sorted(extra + assembly.reread())
        _read_pass(run, assembly, again, _Progress(None, 0, False), writer, settling=False)
        run.summary.files_read = len(to_read) + len(extra)  # files, however often opened
        writer.wait()  # every settled series is reported before any is finished again
        for key in sorted(assembly.parts):
            _finish(run, assembly.parts.pop(key), writer, early=False)
    for outcome in run.early.values():  # settled and never reopened: final
        _count(run, outcome)
    run.early.clear()
    run.summary.files_accepted += len(known)
    run.export_keys.update(known.values())


def _read_pass(run: _Run, assembly: SeriesAssembly, indices: list[int], progress: _Progress,
               writer: StoreWriter, settling: bool) -> None:
    if not indices:
        return

    @contextlib.contextmanager
    def forking() -> Iterator[None]:
        writer.wait()  # no store write in flight while a process is forked
        with progress.paused():
            yield

    assembly.expect(indices, settling)
    read_files([(i, str(run.files[i])) for i in indices], run.settings,
               run.options.worker_count(), progress, assembly.deliver, forking)
    assembly.close_pass()


def _folder_numbers(files: list[Path]) -> list[int]:
    """Each file's folder, numbered in scan order (list_files lists a folder's files together)."""
    numbers, last, number = [], None, -1
    for path in files:
        folder = os.path.dirname(path)
        if folder != last:
            number, last = number + 1, folder
        numbers.append(number)
    return numbers


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

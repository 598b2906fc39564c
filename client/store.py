"""The node's local store: preprocessed image arrays plus a JSON manifest.

Layout::

    STORE/manifest.json        what is in the store (series, geometry, labels), no PHI
    STORE/arrays/<key>.npy     float16 (slices, phases, H, W), intensities scaled so that the
                               image's 1st..99th percentiles map to 0..1, at ``spacing_mm``

Arrays are written with ``allow_pickle=False`` and read the same way; the manifest is rewritten
atomically after each series, so an interrupted writer loses at most the series in flight.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared_model.errors import UserError
from shared_model.files import atomic_write, atomic_write_text, read_json
from shared_model.labels import parse_frame_key

if TYPE_CHECKING:  # torch is imported where frames become tensors, so that the intake's
    import torch  # reading processes start without it

STORE_FORMAT = "fedcmr-store"
STORE_VERSION = 1
MANIFEST_NAME = "manifest.json"


def intensity_window(image: np.ndarray, low: float = 1.0,
                     high: float = 99.0) -> tuple[float, float]:
    """The ``low``..``high`` percentiles that :func:`normalise_intensity` maps to 0..1.

    Kept with a series where the raw scale is physical (T1/T2 maps in ms), so that
    ``raw = stored * (hi - lo) + lo`` recovers it.
    """
    flat = np.asarray(image, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return 0.0, 0.0
    # np.percentile's default (linear) rule without its overhead: the intake calls this for
    # every frame it reads. Same float32 differences and float64 products as numpy's.
    windows = []
    for percent in (low, high):
        position = percent / 100.0 * (flat.size - 1)
        below = math.floor(position)
        windows.append((below, min(below + 1, flat.size - 1), position - below))
    (b0, a0, f0), (b1, a1, f1) = windows
    v = _order_statistics(flat, (b0, a0, b1, a1))
    return (float(v[0]) + float(v[1] - v[0]) * f0, float(v[2]) + float(v[3] - v[2]) * f1)


def _order_statistics(flat: np.ndarray, ranks: tuple[int, int, int, int]) -> list[np.float32]:
    """The values of rank r0 <= r1 <= r2 <= r3 in ``flat`` (r1 - r0 and r3 - r2 at most 1).

    For a frame, the two tails alone (:func:`_tail_statistics`); else two single-rank
    partitions, where a sort costs twice as much and numpy's multi-rank partition more; a sort
    for tiny inputs or where a value is not finite (NaN sorts last there; a min or max over the
    partitions would return it instead).
    """
    r0, r1, r2, r3 = ranks
    if flat.size >= _TAIL_SAMPLE and r1 < r2 and not np.isnan(flat).any():
        tails = _tail_statistics(flat, ranks)
        if tails is not None:
            return tails
    if flat.size >= 64 and r1 < r2:
        part = np.partition(flat, r1)
        upper = np.partition(part[r1 + 1:], r2 - r1 - 1)  # the values of rank > r1
        k = r2 - r1 - 1
        ordered = [part[:r1].max() if r0 < r1 else part[r1], part[r1],
                   upper[k], upper[k + 1:].min() if r3 > r2 else upper[k]]
        if math.isfinite(ordered[0]) and math.isfinite(ordered[3]):
            return ordered
    part = np.sort(flat)
    return [part[r] for r in ranks]


_TAIL_SAMPLE = 1024  # values of a strided sample that place the thresholds of the two tails


def _tail_statistics(flat: np.ndarray, ranks: tuple[int, int, int, int]) -> list[np.float32] | None:
    """The same order statistics from the values at or below a low threshold and at or above a
    high one (a few % of a frame each; ~45 us for 128 x 128 where two partitions take ~180 us).

    Exact: every value <= t comes before every value > t in sorted order, so the values <= t
    are the first ``count`` of it (and those >= t the last). The thresholds come from a strided
    sample with a margin; None where a tail came out too short to hold its ranks (the caller
    partitions the whole array instead). No NaN in ``flat`` (a comparison with it is false).
    """
    r0, r1, r2, r3 = ranks
    n = flat.size
    sample = flat[::max(1, n // _TAIL_SAMPLE)]
    m = sample.size
    low_k = min(m - 1, int(r1 * m / n * 1.5) + 16)
    high_k = max(0, m - 1 - int((n - 1 - r2) * m / n * 1.5) - 16)
    thresholds = np.partition(sample, (low_k, high_k))
    low = flat[flat <= thresholds[low_k]]
    high = flat[flat >= thresholds[high_k]]
    if low.size <= r1 or high.size < n - r2:
        return None
    below = np.partition(low, (r0, r1))
    offset = n - high.size  # the rank in ``flat`` of high's smallest value
    above = np.partition(high, (r2 - offset, r3 - offset))
    return [below[r0], below[r1], above[r2 - offset], above[r3 - offset]]


def normalise_intensity(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map an image's ``low``..``high`` percentiles to 0..1, the store's intensity scale."""
    lo, hi = intensity_window(image, low, high)
    return ((image - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a handle: np.save would append ".npy" to a temporary file name.
    # allow_pickle=False: arrays only; never change this (a store must not run code on load).
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


class StoreError(UserError, RuntimeError):
    """A store that is missing, of another format, or inconsistent; the message says which."""


@dataclass
class SeriesRecord:
    """One acquisition in the store. ``sequence``/``view`` are normalised labels, not headers.

    Labels, when the node has them, sit beside the image array: ``mask`` is a uint8 array of the
    same (slices, phases, H, W) shape with values from ``shared_model.labels.MASK_VALUES``,
    annotated only on ``labeled_frames``; ``landmarks`` maps a frame key ``"s,t"`` to
    ``{name: [row, col]}`` in store pixels; ``classes`` holds series-level class labels
    (e.g. ``{"lge_pathology": "scar"}``).

    A frame in ``labeled_frames`` has every structure of its series' labels drawn, so a pixel
    left 0 there is background. Frames where only some structures were drawn (Sunnybrook's
    end-systolic frames have an endocardial contour but no epicardial one) are listed apart in
    ``partial_labels`` (frame key -> the structure names drawn there): a task may use them only
    for those structures.
    """

    key: str
    array: str  # path relative to the store root
    shape: list[int]  # slices, phases, H, W
    sequence: str = "unknown"
    view: str = "unknown"
    subject: str = ""  # a store-local pseudonym, never a header value
    info: dict[str, Any] = field(default_factory=dict)
    mask: str = ""  # path relative to the store root; "" when unlabelled
    labeled_frames: list[list[int]] = field(default_factory=list)  # [slice, phase] pairs
    landmarks: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    partial_labels: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class LabeledFrame:
    """One annotated frame of a series: where it is and which structures it has drawn."""

    key: str
    slice: int
    phase: int
    structures: tuple[str, ...]  # names from MASK_VALUES; () for a fully labelled frame
    complete: bool  # True: every structure of the series' labels is drawn here


@dataclass(frozen=True)
class LandmarkFrame:
    """The landmarks of one frame, (row, col) in store pixels."""

    key: str
    slice: int
    phase: int
    points: dict[str, tuple[float, float]]


@dataclass
class Manifest:
    spacing_mm: float
    crop_px: int
    series: dict[str, SeriesRecord] = field(default_factory=dict)
    subjects: dict[str, dict[str, str]] = field(default_factory=dict)  # pseudonym -> labels
    format: str = STORE_FORMAT
    version: int = STORE_VERSION


class LocalStore:
    """Read and append to a store folder."""

    def __init__(self, root: str | Path, manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def create(cls, root: str | Path, spacing_mm: float, crop_px: int) -> LocalStore:
        """Open the store at ``root``, creating it if it does not exist yet."""
        root = Path(root)
        if (root / MANIFEST_NAME).exists():
            store = cls.open(root)
            if (store.manifest.spacing_mm, store.manifest.crop_px) != (spacing_mm, crop_px):
                raise StoreError(
                    f"{root}: store was built at {store.manifest.spacing_mm} mm / "
                    f"{store.manifest.crop_px} px, not {spacing_mm} mm / {crop_px} px; "
                    "use a new store folder or the same data settings")
            return store
        for folder in ("arrays", "masks"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        store = cls(root, Manifest(spacing_mm=spacing_mm, crop_px=crop_px))
        store.save_manifest()
        return store

    @classmethod
    def open(cls, root: str | Path) -> LocalStore:
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            raise StoreError(f"{root}: no {MANIFEST_NAME}; build the store with "
                             "`fedcmr-client ingest` first")
        raw = read_json(path, StoreError, "re-run `fedcmr-client ingest` into a new store")
        if not isinstance(raw, dict) or raw.get("format") != STORE_FORMAT:
            raise StoreError(f"{path}: not a FedCMR store manifest")
        if raw.get("version") != STORE_VERSION:
            raise StoreError(f"{path}: store version {raw.get('version')} is not supported "
                             f"(expected {STORE_VERSION}); re-ingest into a new folder")
        try:
            series = {k: SeriesRecord(**v) for k, v in raw.get("series", {}).items()}
            manifest = Manifest(spacing_mm=raw["spacing_mm"], crop_px=raw["crop_px"],
                                series=series, subjects=raw.get("subjects", {}))
        except (KeyError, TypeError) as exc:
            raise StoreError(f"{path}: malformed manifest ({exc}); re-ingest into a new folder") from exc
        return cls(root, manifest)

    def save_manifest(self) -> None:
        data = asdict(self.manifest)
        atomic_write_text(self.root / MANIFEST_NAME, json.dumps(data, indent=1, sort_keys=True))

    def has(self, key: str) -> bool:
        return key in self.manifest.series

    def add_series(self, record: SeriesRecord, array: np.ndarray,
                   mask: np.ndarray | None = None) -> SeriesRecord:
        """Write one series' array (slices, phases, H, W), and its mask if any, then record it.

        Arrays are written before the manifest names them, so a crash in between leaves an
        orphan file, never a manifest entry without its data.
        """
        if array.ndim != 4:
            raise StoreError(f"series {record.key}: expected a 4-D array, got {array.shape}")
        record.array = f"arrays/{record.key}.npy"
        record.shape = [int(n) for n in array.shape]
        data = np.ascontiguousarray(array, dtype=np.float16)
        atomic_write(self.root / record.array, lambda tmp: _save_npy(tmp, data))
        if mask is not None:
            if mask.shape != array.shape:
                raise StoreError(f"series {record.key}: mask shape {mask.shape} differs from "
                                 f"the image's {array.shape}")
            record.mask = f"masks/{record.key}.npy"
            labels = np.ascontiguousarray(mask, dtype=np.uint8)
            atomic_write(self.root / record.mask, lambda tmp: _save_npy(tmp, labels))
        self.manifest.series[record.key] = record
        self.save_manifest()
        return record

    def remove_series(self, key: str) -> bool:
        """Forget a series and delete its files; True when it was there.

        The manifest stops naming the files before they are deleted, so a crash in between
        leaves orphan files, never a manifest entry without its data.
        """
        record = self.manifest.series.pop(key, None)
        if record is None:
            return False
        self.save_manifest()
        for relative in (record.array, record.mask):
            if relative:
                (self.root / relative).unlink(missing_ok=True)
        return True

    def set_subject_labels(self, subject: str, labels: dict[str, str]) -> None:
        self.manifest.subjects.setdefault(subject, {}).update(labels)
        self.save_manifest()

    def _load_npy(self, key: str, relative: str) -> np.ndarray:
        record = self.manifest.series[key]
        path = self.root / relative
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise StoreError(f"{path}: unreadable array ({exc}); re-ingest series {key}") from exc
        if list(array.shape) != record.shape:
            raise StoreError(f"{path}: shape {array.shape} differs from the manifest's "
                             f"{record.shape}; re-ingest series {key}")
        return array

    def load(self, key: str) -> np.ndarray:
        """The series' images, float16 (slices, phases, H, W)."""
        return self._load_npy(key, self.manifest.series[key].array)

    def load_mask(self, key: str) -> np.ndarray:
        """The series' mask, uint8 (slices, phases, H, W); only ``labeled_frames`` are annotated."""
        record = self.manifest.series[key]
        if not record.mask:
            raise StoreError(f"series {key} has no mask")
        return self._load_npy(key, record.mask)

    def records(self, sequence: str | None = None, view: str | None = None) -> list[SeriesRecord]:
        """The series, sorted by key; filtered by sequence/view (label files first, then headers)."""
        def label(record: SeriesRecord, name: str) -> str:
            return record.classes.get(name) or getattr(record, name)

        return [r for _, r in sorted(self.manifest.series.items())
                if (sequence is None or label(r, "sequence") == sequence)
                and (view is None or label(r, "view") == view)]

    def iter_labeled_frames(self, structures: Iterable[str] = (),
                            include_partial: bool = False) -> Iterator[LabeledFrame]:
        """Frames with a mask, series by series (sorted), in (slice, phase) order.

        ``structures`` (names from MASK_VALUES) keeps partial frames only when they have all of
        them drawn; with ``include_partial=False`` only completely labelled frames come out.
        """
        wanted = set(structures)
        for record in self.records():
            if not record.mask:
                continue
            frames = [LabeledFrame(record.key, s, t, (), True) for s, t in record.labeled_frames]
            if include_partial:
                for fkey, names in record.partial_labels.items():
                    if wanted <= set(names):
                        s, t = parse_frame_key(fkey)
                        frames.append(LabeledFrame(record.key, s, t, tuple(names), False))
            yield from sorted(frames, key=lambda f: (f.slice, f.phase))

    def iter_landmark_frames(self, names: Iterable[str] = ()) -> Iterator[LandmarkFrame]:
        """Frames with landmarks (only those having every name in ``names``), series by series."""
        wanted = set(names)
        for record in self.records():
            for fkey, points in sorted(record.landmarks.items(), key=lambda kv: parse_frame_key(kv[0])):
                if wanted <= set(points):
                    s, t = parse_frame_key(fkey)
                    yield LandmarkFrame(record.key, s, t,
                                        {n: (float(p[0]), float(p[1])) for n, p in points.items()})

    def class_labels(self, name: str) -> dict[str, str]:
        """Series key -> a label-file class (e.g. ``lge_pathology``), for series that have it."""
        return {r.key: r.classes[name] for r in self.records() if r.classes.get(name)}

    def subject_labels(self, name: str) -> dict[str, str]:
        """Subject pseudonym -> a study label (e.g. ``disease``), for subjects that have it."""
        return {s: labels[name] for s, labels in sorted(self.manifest.subjects.items())
                if labels.get(name)}

    def unlabeled_frames(self, size: int) -> torch.Tensor:
        """Every frame of every series as (N, 1, size, size) float32 for self-supervision."""
        import torch

        from shared_model.augment import resize_to

        frames = []
        for key in sorted(self.manifest.series):
            array = self.load(key)
            frames.append(torch.from_numpy(array.reshape(-1, *array.shape[-2:]).astype(np.float32)))
        if not frames:
            raise StoreError(f"{self.root}: the store holds no series")
        stacked = torch.cat(frames)[:, None]
        return resize_to(stacked, size)

"""What a clinical task is: which series feed it, what its label is, and how it is scored.

Four kinds of task cover the nine of the paper:

- ``FrameClassificationTask``: one frame -> one class (sequence, cine view)
- ``SegmentationTask``: one frame -> a class per pixel (SAX, LAX, LGE, mapping)
- ``LandmarkTask``: one frame -> points, as heatmaps with sub-pixel decoding (RV insertion, ...)
- ``BagClassificationTask``: the frames of a series or study -> one class (LGE pathology,
  cardiac disease), pooled over slices and frames

A task module builds one of these and registers it; the model, loss and metric follow from the
kind. Inputs are :class:`SeriesData`, plain arrays a node's store hands over (shared_model
never reads the store itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F

from shared_model.errors import UserError
from shared_model.labels import MASK_VALUES, UNKNOWN


class UnknownTaskError(UserError, KeyError):
    """A task name that is not registered; the message lists the known ones."""


class TaskDataError(UserError, ValueError):
    """Too few labelled samples or subjects for a task; the message says what is missing."""


class TaskKind(str, Enum):
    frame_classification = "frame_classification"
    segmentation = "segmentation"
    landmarks = "landmarks"
    bag_classification = "bag_classification"


@dataclass
class SeriesData:
    """One series as the model side sees it: arrays plus labels, in store pixels.

    ``images`` is (slices, phases, H, W) float; ``mask`` the same shape in uint8 with values
    from MASK_VALUES (annotated on ``labeled_frames`` only); ``landmarks`` maps ``(s, t)`` to
    ``{name: (row, col)}``; ``classes`` holds label-file classes (they win over the
    header-derived ``sequence``/``view``); ``subject_labels`` the study's labels (disease).
    ``partial_frames`` are frames with only some structures drawn (pixels outside them are
    "not those structures", not background).
    """

    key: str
    subject: str
    images: np.ndarray
    spacing_mm: float
    sequence: str = UNKNOWN
    view: str = UNKNOWN
    mask: np.ndarray | None = None
    labeled_frames: list[tuple[int, int]] = field(default_factory=list)
    landmarks: dict[tuple[int, int], dict[str, tuple[float, float]]] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    subject_labels: dict[str, str] = field(default_factory=dict)
    # frames where only some structures are drawn: (s, t) -> names from MASK_VALUES
    partial_frames: dict[tuple[int, int], tuple[str, ...]] = field(default_factory=dict)
    # what a complete frame has drawn; () = the structures found in the mask's labelled frames
    label_structures: tuple[str, ...] = ()

    def drawn_structures(self) -> tuple[str, ...]:
        """The structures every frame of ``labeled_frames`` has drawn (absent ones as 0)."""
        if self.label_structures or self.mask is None or not self.labeled_frames:
            return self.label_structures
        values = set()
        for s, t in self.labeled_frames:
            values.update(np.unique(self.mask[s, t]).tolist())
        return tuple(name for name, value in MASK_VALUES.items() if value in values)

    def label(self, name: str) -> str | None:
        """A class label: label files first, then (for sequence/view) the headers."""
        value = self.classes.get(name)
        if value is None and name in ("sequence", "view"):
            value = getattr(self, name)
        return None if value in (None, "", UNKNOWN) else value


@dataclass
class TaskData:
    """Tensors for one task, at the model's input size.

    ``inputs``: (N, 1, S, S) for frame tasks, (N, K, 1, S, S) for bag tasks. ``targets``:
    class indices (N,), label maps (N, S, S), or landmark coordinates (N, L, 2) in pixels of the
    input with ``valid`` (N, L). For segmentation ``valid`` (N, C) says which foreground classes
    are drawn on each frame (a partial label leaves the others unknown: their pixels carry 0).
    ``subjects`` names each sample's subject (for splits).
    ``spacing_mm`` is the input's pixel spacing (store spacing scaled by the resize).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    subjects: list[str]
    spacing_mm: float
    valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def subset(self, index: Sequence[int] | torch.Tensor) -> TaskData:
        idx = torch.as_tensor(index, dtype=torch.long)
        return TaskData(self.inputs[idx], self.targets[idx], [self.subjects[i] for i in idx.tolist()],
                        self.spacing_mm, None if self.valid is None else self.valid[idx])


def resize_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) float -> (N, 1, size, size), antialiased."""
    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None]
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_labels(maps: np.ndarray, size: int) -> torch.Tensor:
    """(N, H, W) integer label maps -> (N, size, size) by nearest neighbour at pixel centres."""
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.int64))[:, None].float()
    if x.shape[-1] == size and x.shape[-2] == size:
        return x[:, 0].long()
    return F.interpolate(x, size=(size, size), mode="nearest-exact")[:, 0].long()


def evenly_spaced(items: Sequence, count: int) -> list:
    """At most ``count`` items spread evenly over the sequence (deterministic)."""
    if len(items) <= count:
        return list(items)
    idx = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in idx]


@dataclass(frozen=True)
class Task:
    """Common to every task: a registry name, a title and its class/structure names."""

    name: str
    title: str
    kind: TaskKind

    def build(self, series: Sequence[SeriesData], size: int) -> TaskData:
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    @property
    def convex_classes(self) -> tuple[int, ...]:
        """Output classes that predictions draw as one convex region (segmentation only)."""
        return ()


@dataclass(frozen=True)
class FrameClassificationTask(Task):
    """Label from ``SeriesData.label(label_name)``; a few frames per series."""

    kind: TaskKind = TaskKind.frame_classification

    label_name: str = ""
    classes: tuple[str, ...] = ()
    frames_per_series: int = 4
    accept: Callable[[SeriesData], bool] = lambda s: True

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def build(self, series: Sequence[SeriesData], size: int) -> TaskData:
        frames, targets, subjects, spacing = [], [], [], None
        for item in series:
            label = item.label(self.label_name)
            if label not in self.classes or not self.accept(item):
                continue
            s_count, t_count = item.images.shape[:2]
            keys = [(s, t) for s in range(s_count) for t in range(t_count)]
            for s, t in evenly_spaced(keys, self.frames_per_series):
                frames.append(item.images[s, t])
                targets.append(self.classes.index(label))
                subjects.append(item.subject)
            spacing = item.spacing_mm * item.images.shape[-1] / size
        return _frame_data(frames, torch.tensor(targets, dtype=torch.long), subjects, spacing, size)


@dataclass(frozen=True)
class SegmentationTask(Task):
    """Exclusive classes from mask values; metrics over (possibly merged) structures.

    ``classes`` maps class index i+1 (0 is background) to the mask values it covers;
    ``structures`` names what Dice/HD95 are reported for, as sets of class indices.
    """

    kind: TaskKind = TaskKind.segmentation

    sequences: tuple[str, ...] = ()
    views: tuple[str, ...] = ()
    classes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    structures: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # classes drawn as one convex region in predictions (client.inference): a cavity whose
    # expert contour runs smoothly around the papillary muscles and trabeculae within it
    convex: tuple[str, ...] = ()

    @property
    def num_outputs(self) -> int:
        return len(self.classes) + 1

    @property
    def convex_classes(self) -> tuple[int, ...]:
        names = [name for name, _ in self.classes]
        return tuple(names.index(name) + 1 for name in self.convex)

    @property
    def structure_classes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return self.structures or tuple((name, (i + 1,)) for i, (name, _) in enumerate(self.classes))

    def accepts(self, item: SeriesData) -> bool:
        return (item.mask is not None and item.label("sequence") in self.sequences
                and (not self.views or item.label("view") in self.views))

    def class_map(self, mask: np.ndarray, drawn: Sequence[bool] | None = None) -> np.ndarray:
        """Mask values -> class indices (0 elsewhere); classes not ``drawn`` stay 0."""
        out = np.zeros(mask.shape, dtype=np.int64)
        for index, (_, values) in enumerate(self.classes, start=1):
            if drawn is None or drawn[index - 1]:
                out[np.isin(mask, values)] = index
        return out

    def drawn_classes(self, structures: Sequence[str]) -> list[bool]:
        """Per foreground class: is it drawn on a frame that has ``structures`` drawn?"""
        values = {MASK_VALUES[n] for n in structures if n in MASK_VALUES}
        return [bool(values & set(class_values)) for _, class_values in self.classes]

    def build(self, series: Sequence[SeriesData], size: int) -> TaskData:
        frames, maps, drawn, subjects, spacing = [], [], [], [], None
        for item in series:
            if not self.accepts(item):
                continue
            complete = self.drawn_classes(item.drawn_structures())
            labelled = [(f, complete) for f in item.labeled_frames]
            labelled += [(f, self.drawn_classes(names)) for f, names in sorted(item.partial_frames.items())]
            for (s, t), classes in labelled:
                if not any(classes):
                    continue
                assert item.mask is not None  # accepts() takes masked series only
                frames.append(item.images[s, t])
                maps.append(self.class_map(item.mask[s, t], classes))
                drawn.append(classes)
                subjects.append(item.subject)
            spacing = item.spacing_mm * item.images.shape[-1] / size
        targets = resize_labels(np.stack(maps), size) if maps else torch.zeros(0, size, size, dtype=torch.long)
        data = _frame_data(frames, targets, subjects, spacing, size)
        data.valid = torch.tensor(drawn, dtype=torch.bool).reshape(-1, len(self.classes))
        return data


@dataclass(frozen=True)
class LandmarkTask(Task):
    """Points per frame; a frame contributes the landmarks it has (others are masked out)."""

    kind: TaskKind = TaskKind.landmarks

    landmarks: tuple[str, ...] = ()
    sequences: tuple[str, ...] = ("cine",)

    @property
    def num_outputs(self) -> int:
        return len(self.landmarks)

    def build(self, series: Sequence[SeriesData], size: int) -> TaskData:
        frames, coords, valid, subjects, spacing = [], [], [], [], None
        for item in series:
            if item.label("sequence") not in self.sequences:
                continue
            scale = size / item.images.shape[-1]
            for (s, t), points in sorted(item.landmarks.items()):
                present = [name in points for name in self.landmarks]
                if not any(present):
                    continue
                frames.append(item.images[s, t])
                # pixel centres: store (r, c) -> input ((r + .5) * scale - .5)
                coords.append([[(points[n][0] + 0.5) * scale - 0.5, (points[n][1] + 0.5) * scale - 0.5]
                               if n in points else [0.0, 0.0] for n in self.landmarks])
                valid.append(present)
                subjects.append(item.subject)
            spacing = item.spacing_mm / scale
        targets = torch.tensor(coords, dtype=torch.float32).reshape(-1, len(self.landmarks), 2)
        data = _frame_data(frames, targets, subjects, spacing, size)
        data.valid = torch.tensor(valid, dtype=torch.bool).reshape(-1, len(self.landmarks))
        return data


@dataclass(frozen=True)
class BagClassificationTask(Task):
    """A bag of ``bag_size`` frames per series (or per subject) -> one class.

    ``label_of`` reads the label; ``frames_of`` lists the (slice, phase) frames that enter the
    bag; with ``per_subject`` all accepted series of a subject pool into one bag.
    """

    kind: TaskKind = TaskKind.bag_classification

    classes: tuple[str, ...] = ()
    bag_size: int = 8
    per_subject: bool = False
    label_of: Callable[[SeriesData], str | None] = lambda s: None
    frames_of: Callable[[SeriesData], list[tuple[int, int]]] = lambda s: []

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def build(self, series: Sequence[SeriesData], size: int) -> TaskData:
        groups: dict[str, list[tuple[SeriesData, tuple[int, int]]]] = {}
        labels: dict[str, str] = {}
        spacing = None
        for item in series:
            label = self.label_of(item)
            if label not in self.classes:
                continue
            group = item.subject if self.per_subject else item.key
            groups.setdefault(group, []).extend((item, f) for f in self.frames_of(item))
            labels[group] = label
            spacing = item.spacing_mm * item.images.shape[-1] / size
        bags, targets, subjects = [], [], []
        for group, members in sorted(groups.items()):
            if not members:
                continue
            chosen = evenly_spaced(members, self.bag_size)
            while len(chosen) < self.bag_size:  # repeat frames of short series
                chosen += chosen[: self.bag_size - len(chosen)]
            bags.append(resize_frames(np.stack([m.images[s, t] for m, (s, t) in chosen]), size))
            targets.append(self.classes.index(labels[group]))
            subjects.append(chosen[0][0].subject)
        inputs = torch.stack(bags) if bags else torch.zeros(0, self.bag_size, 1, size, size)
        return TaskData(inputs, torch.tensor(targets, dtype=torch.long), subjects, spacing or 0.0)


def _frame_data(frames: list[np.ndarray], targets: torch.Tensor, subjects: list[str],
                spacing: float | None, size: int) -> TaskData:
    inputs = resize_frames(np.stack(frames), size) if frames else torch.zeros(0, 1, size, size)
    return TaskData(inputs, targets, subjects, spacing or 0.0)


def mask_value(*names: str) -> tuple[int, ...]:
    return tuple(MASK_VALUES[n] for n in names)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task '{task.name}' is registered twice")
    TASKS[task.name] = task
    return task

"""Task 9: the study's cardiac disease (ACDC classes) from its SAX cine, pooled over slices
and over phases across the cardiac cycle."""

import numpy as np

from shared_model.labels import DISEASES
from shared_model.tasks.base import BagClassificationTask, SeriesData, register


def _label(series: SeriesData) -> str | None:
    if series.label("sequence") == "cine" and series.label("view") == "sax":
        return series.subject_labels.get("disease")
    return None


def _frames(series: SeriesData) -> list[tuple[int, int]]:
    """Every slice at four phases spread over the cycle (end-diastole first)."""
    slices, phases = series.images.shape[:2]
    picked = sorted(set(np.linspace(0, phases - 1, min(4, phases)).round().astype(int).tolist()))
    return [(s, t) for t in picked for s in range(slices)]


TASK = register(BagClassificationTask(
    name="disease", title="Cardiac disease detection", classes=DISEASES, bag_size=16,
    per_subject=True, label_of=_label, frames_of=_frames))

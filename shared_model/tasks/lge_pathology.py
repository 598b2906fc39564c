"""Task 8: is there scar in an LGE series? All slices pooled into one decision."""

from shared_model.labels import LGE_PATHOLOGY
from shared_model.tasks.base import BagClassificationTask, SeriesData, register


def _label(series: SeriesData) -> str | None:
    return series.classes.get("lge_pathology") if series.label("sequence") == "lge" else None


def _frames(series: SeriesData) -> list[tuple[int, int]]:
    return [(s, 0) for s in range(series.images.shape[0])]


TASK = register(BagClassificationTask(
    name="lge_pathology", title="LGE pathology detection", classes=LGE_PATHOLOGY, bag_size=8,
    label_of=_label, frames_of=_frames))

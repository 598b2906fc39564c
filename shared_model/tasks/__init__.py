"""The nine clinical tasks, registered by name; a tenth is one new module imported here."""

from shared_model.tasks import (  # noqa: F401 - importing registers each task
    disease,
    landmarks,
    lax_seg,
    lge_pathology,
    lge_seg,
    mapping_seg,
    sax_seg,
    sequence,
    view,
)
from shared_model.tasks.base import (
    TASKS,
    SeriesData,
    Task,
    TaskData,
    TaskDataError,
    TaskKind,
    UnknownTaskError,
)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task '{name}'; known: {', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "SeriesData", "Task", "TaskData", "TaskDataError", "TaskKind", "UnknownTaskError", "get_task"]

"""Task 1: which acquisition a frame comes from (cine, LGE, T1/T2 map, T2w, perfusion)."""

from shared_model.labels import SEQUENCES
from shared_model.tasks.base import FrameClassificationTask, register

TASK = register(FrameClassificationTask(
    name="sequence", title="Sequence classification", label_name="sequence", classes=SEQUENCES))

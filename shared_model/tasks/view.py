"""Task 2: the view of a cine frame (SAX, 2-, 3-, 4-chamber)."""

from shared_model.labels import VIEWS
from shared_model.tasks.base import FrameClassificationTask, register

TASK = register(FrameClassificationTask(
    name="view", title="Cine view classification", label_name="view", classes=VIEWS,
    accept=lambda series: series.label("sequence") == "cine"))

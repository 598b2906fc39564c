"""Task 7: RV insertion points on SAX; mitral valve hinge points and LV apex on LAX."""

from shared_model.labels import LANDMARKS
from shared_model.tasks.base import LandmarkTask, register

TASK = register(LandmarkTask(name="landmarks", title="Landmark localisation", landmarks=LANDMARKS))

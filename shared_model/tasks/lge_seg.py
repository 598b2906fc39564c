"""Task 5: LGE short-axis segmentation of the myocardium and the scar within it.

Classes are exclusive (remote myocardium, scar); the reported myocardium is their union.
"""

from shared_model.tasks.base import SegmentationTask, mask_value, register

TASK = register(SegmentationTask(
    name="lge_seg", title="LGE SAX segmentation", sequences=("lge",), views=("sax",),
    classes=(("remote_myo", mask_value("lv_myo")), ("scar", mask_value("scar"))),
    structures=(("myocardium", (1, 2)), ("scar", (2,)))))

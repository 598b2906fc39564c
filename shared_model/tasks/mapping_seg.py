"""Task 6: myocardium (and blood pool) on native T1 and T2 maps."""

from shared_model.tasks.base import SegmentationTask, mask_value, register

TASK = register(SegmentationTask(
    name="mapping_seg", title="Mapping SAX segmentation", sequences=("t1_map", "t2_map"),
    views=(), classes=(("lv_blood", mask_value("lv_blood")), ("lv_myo", mask_value("lv_myo", "scar")))))

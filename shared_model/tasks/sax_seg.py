"""Task 3: cine short-axis segmentation of LV blood pool, LV myocardium and RV."""

from shared_model.tasks.base import SegmentationTask, mask_value, register

TASK = register(SegmentationTask(
    name="sax_seg", title="Cine SAX segmentation", sequences=("cine",), views=("sax",),
    classes=(("lv_blood", mask_value("lv_blood")), ("lv_myo", mask_value("lv_myo", "scar")),
             ("rv_blood", mask_value("rv_blood"))),
    # the LV endocardial contour encloses the papillary muscles and trabeculae (Sunnybrook's
    # and ACDC's convention), which a model trained on few patients tends to cut out
    convex=("lv_blood",)))

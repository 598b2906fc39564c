"""Task 4: cine long-axis segmentation (LV, myocardium, RV, LA, RA as visible per view)."""

from shared_model.tasks.base import SegmentationTask, mask_value, register

TASK = register(SegmentationTask(
    name="lax_seg", title="Cine LAX segmentation", sequences=("cine",), views=("2ch", "3ch", "4ch"),
    classes=(("lv_blood", mask_value("lv_blood")), ("lv_myo", mask_value("lv_myo", "scar")),
             ("rv_blood", mask_value("rv_blood")), ("la_blood", mask_value("la_blood")),
             ("ra_blood", mask_value("ra_blood")))))

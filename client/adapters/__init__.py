"""Dataset adapters: how each supported source layout reaches the store.

``dicom``: any DICOM export (plus optional ``--labels`` folder); ``sunnybrook``: the Sunnybrook
Cardiac Data folder (DICOM + contours); ``acdc`` / ``mnms``: NIfTI challenge layouts;
``nnunet``: an nnU-Net v2 / MSD raw dataset (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from client.intake.summary import IngestSummary

if TYPE_CHECKING:
    from client.intake.pipeline import IngestOptions

FORMATS: tuple[str, ...] = ("dicom", "sunnybrook", "acdc", "mnms", "nnunet")


def run_adapter(options: IngestOptions, fmt: str) -> IngestSummary:
    """Ingest ``options.src`` laid out as ``fmt`` into ``options.store``."""
    from client.intake.pipeline import IntakeError, open_store, run_dicom_intake

    if options.labels is not None and fmt in ("sunnybrook", "acdc", "nnunet"):
        raise IntakeError(f"--labels is not used with --format {fmt} (its labels come with the "
                          "dataset folder); leave it out")
    if fmt == "dicom":
        from client.intake.deid import Pseudonymiser
        from client.intake.label_files import read_label_folder

        opened = open_store(options)
        labels = None
        if options.labels is not None:
            labels = read_label_folder(options.labels, Pseudonymiser(opened[1]))
        return run_dicom_intake(options, labels, fmt="dicom", opened=opened)
    if fmt == "sunnybrook":
        from client.adapters.sunnybrook import ingest_sunnybrook

        return ingest_sunnybrook(options)
    if fmt in ("acdc", "mnms"):
        from client.adapters.nifti_datasets import ingest_nifti

        return ingest_nifti(options, fmt)
    if fmt == "nnunet":
        from client.adapters.nnunet import ingest_nnunet

        return ingest_nnunet(options, options.label_map, options.sequence, options.view)
    raise IntakeError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}")

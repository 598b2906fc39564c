"""Node intake: DICOM export -> de-identified, quality-checked series in the local store.

Entry point: :func:`client.intake.pipeline.ingest` (the ``fedcmr-client ingest`` command).
Kept free of imports here: worker processes import :mod:`client.intake.reading` alone.
"""

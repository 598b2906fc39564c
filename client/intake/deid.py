"""De-identification: the one mapping from a hospital's identifiers to the store's.

What reaches the store from a DICOM header is an allow-list: geometry numbers (spacing, matrix,
slice positions relative to the stack, trigger times), field strength as a number, the vendor
reduced to a fixed vocabulary, header-derived sequence/view labels from a fixed vocabulary, and
identifiers replaced as PS3.15 Annex E (basic profile) asks: UIDs (action U) and the patient ID
go through dicognito's anonymizer, seeded with a per-store secret, so the same hospital UID maps
to the same store UID on every run and every node process. Every other attribute of the basic
profile (names, dates, times, descriptions, institution, device and operator details, private
tags, nested sequences) has action X/Z/D there and is simply never copied. Images whose header
says ``BurnedInAnnotation = YES`` are excluded (see :mod:`client.intake.reading`).

The secret lives in ``STORE/intake/secret`` (mode 0600); losing it means a re-run maps to new
pseudonyms (the old series are not found again), leaking it lets someone who also holds the
original export link the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path

from dicognito.anonymizer import Anonymizer
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileMetaDataset

from shared_model.errors import UserError

SECRET_PATH = Path("intake") / "secret"
_CACHE_LIMIT = 100_000


class SecretError(UserError, ValueError):
    """A store's de-identification secret that cannot be used; says how to recover."""


def load_or_create_secret(store_root: str | Path) -> str:
    """The store's de-identification secret (hex), created with mode 0600 on first use."""
    path = Path(store_root) / SECRET_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        text = path.read_text(encoding="ascii").strip()
        if len(text) < 32:
            raise SecretError(f"{path}: de-identification secret is damaged; restore it from a "
                              "backup or ingest into a new store folder") from None
        return text
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    return path.read_text(encoding="ascii").strip()


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while reading foreign headers.

    pydicom quotes offending values (UIDs, dates) in its validation warnings; none of that may
    reach a log. Validation is switched off for reading and for the pseudonymiser's own writes.
    """
    settings = pydicom_config.settings
    saved = (settings.reading_validation_mode, settings.writing_validation_mode)
    logger = logging.getLogger("pydicom")
    saved_disabled = logger.disabled
    settings.reading_validation_mode = pydicom_config.IGNORE
    settings.writing_validation_mode = pydicom_config.IGNORE
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved
        logger.disabled = saved_disabled


class Pseudonymiser:
    """dicognito, seeded with the store's secret; results cached per process (in memory only)."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode("ascii")
        self._anonymizer = Anonymizer(seed=secret)
        self._uids: dict[str, str] = {}
        self._patients: dict[str, str] = {}

    def _anonymize(self, **values: str) -> Dataset:
        with quiet_pydicom():  # pydicom would quote an invalid UID in a warning
            dataset = Dataset()
            dataset.file_meta = FileMetaDataset()
            for keyword, value in values.items():
                setattr(dataset, keyword, value)
            self._anonymizer.anonymize(dataset)
        return dataset

    def uid(self, uid: str) -> str:
        """A hospital UID -> its store UID (dicognito's UID remapping, action U of Annex E)."""
        uid = uid.strip().rstrip("\x00")
        if uid not in self._uids:
            if len(self._uids) > _CACHE_LIMIT:
                self._uids.clear()
            self._uids[uid] = str(self._anonymize(SeriesInstanceUID=uid).SeriesInstanceUID)
        return self._uids[uid]

    def subject(self, patient_id: str, study_uid: str) -> str:
        """The store's subject pseudonym: dicognito's replacement for PatientID, lower case.

        An export without PatientID gets one subject per study (never one shared subject).
        """
        source = patient_id.strip() or f"study:{study_uid.strip()}"
        if source not in self._patients:
            if len(self._patients) > _CACHE_LIMIT:
                self._patients.clear()
            self._patients[source] = str(self._anonymize(PatientID=source).PatientID).lower()
        return self._patients[source]

    def fingerprint(self, value: str) -> str:
        """A keyed digest for bookkeeping (duplicate detection, file index); not reversible."""
        return hmac.new(self._secret, value.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).hexdigest()[:32]


def series_key(subject: str, store_series_uid: str) -> str:
    """The store key of a series: its subject pseudonym plus a digest of its store UID."""
    digest = hashlib.sha256(store_series_uid.encode("ascii", "replace")).hexdigest()[:12]
    return f"{subject}-{digest}"

"""Write rendered series as a hospital's PACS export would hold them (pydicom).

One series per acquisition, Explicit VR Little Endian, uncompressed. Classic MR Image Storage
(one file per frame) by default; sites with ``enhanced_multiframe`` write cine and LGE series as
one Enhanced MR Image Storage instance with per-frame functional groups (position, orientation,
trigger delay). Geometry tags are the real planes (LPS mm). Headers carry realistic but synthetic
PHI in the places de-identification must clean: patient and physician names, IDs, birth date,
institution, station, accession/study IDs, a private block (with a nested private sequence) and
standard nested sequences. UIDs and file names are deterministic functions of the seed; file
names are hex without extension, in nested folders, so nothing can rely on them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from sim.planes import Plane
from sim.sites import SiteProfile
from sim.study import SeriesData

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0033, "FEDCMR SIM PHI"
FAMILY = ("MUELLER", "OKAFOR", "SANTOS", "NAKAMURA", "KOWALSKI", "DUBOIS", "ANDERSSON", "ROSSI",
          "HUANG", "OBRIEN", "PETROVA", "HASSAN", "LINDQVIST", "FERREIRA", "TANAKA", "MORALES")
GIVEN = ("ANNA", "JONAS", "MARIA", "KENJI", "FATIMA", "LUCAS", "INGRID", "TOMASZ", "AMARA",
         "DIEGO", "CHLOE", "OMAR", "SOFIA", "PIOTR", "LENA", "YUSUF")

# SeriesDescription per vendor, sequence and view (what the scanner's protocol tree calls it).
DESCRIPTIONS = {
    "SIEMENS": {"cine": "cine_tf2d_{view}", "lge": "de_tfl_psir_sax_MAG",
                "t1_map": "MOLLI_5(3)3b_sax_T1 MAP", "t2_map": "T2map_flash_sax_T2 MAP",
                "t2w": "t2_tse_db_stir_sax", "perfusion": "tfl_perf_rest_3sl"},
    "GE MEDICAL SYSTEMS": {"cine": "FIESTA CINE {VIEW}", "lge": "MDE PSIR SA",
                           "t1_map": "SMART1MAP", "t2_map": "T2 MAP SA", "t2w": "TRIPLE IR FSE SA",
                           "perfusion": "FGRE-ET PERFUSION"},
    "Philips": {"cine": "sBTFE_{philips_view}", "lge": "PSIR_TFE_SA", "t1_map": "T1map_MOLLI_SA",
                "t2_map": "T2map_GraSE_SA", "t2w": "BB_STIR_SA", "perfusion": "PERF_SR_TFE"},
}
SOFTWARE = {"SIEMENS": "syngo MR XA31", "Philips": "5.7.1"}
COILS = {"SIEMENS": "Body_18", "Philips": "dS Torso"}
PHILIPS_VIEWS = {"sax": "SA", "2ch": "2CH", "3ch": "LVOT", "4ch": "4CH"}
# ScanningSequence, SequenceVariant, TR ms, TE ms, flip deg, ImageType tail, Siemens name.
PROTOCOLS = {
    "cine": ("GR", ["SK", "SS"], 3.0, 1.3, 55.0, ["M", "ND"], "*tfi2d1_{phases}"),
    "lge": (["GR", "IR"], ["SK", "SP", "MP"], 8.5, 3.2, 20.0, ["M", "ND"], "*tfl2d1r"),
    "t1_map": (["GR", "IR"], ["SK", "SP", "MP"], 2.7, 1.1, 35.0, ["T1 MAP", "ND"], "*tfi2d1_192"),
    "t2_map": ("GR", ["SK", "SP", "MP"], 2.9, 1.3, 70.0, ["T2 MAP", "ND"], "*tfi2d1_T2prep"),
    "t2w": (["SE", "IR"], ["SK", "SP", "MP"], 1800.0, 70.0, 180.0, ["M", "ND"], "*tse2d1_17"),
    "perfusion": ("GR", ["SK", "SP", "MP", "OSP"], 2.5, 1.1, 12.0, ["M", "ND"], "*tfl2d1_16"),
}

# SequenceName of other vendors: (GE, Philips).
SEQUENCE_NAMES = (
    {"cine": "fiestacine", "lge": "fgre_ir", "t1_map": "smart1map", "t2_map": "t2prep_map",
     "t2w": "fse_ir_db", "perfusion": "fgre_et"},
    {"cine": "B-TFE", "lge": "T1TFE", "t1_map": "MOLLI", "t2_map": "GraSE", "t2w": "TSE",
     "perfusion": "SR-TFE"},
)


def cohort_uid(seed: int, *parts: object) -> str:
    """A UID that depends only on the seed and the parts (pydicom's root, hashed entropy)."""
    return str(generate_uid(entropy_srcs=["fedcmr-cohort", str(seed), *map(str, parts)]))


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _date(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _time(seconds: float) -> str:
    seconds = seconds % 86400
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


@dataclass(frozen=True)
class StudyIdentity:
    """Who and where: every value a de-identifier must remove or replace, plus study keys."""

    site_index: int
    subject_index: int
    patient_name: str
    patient_id: str
    other_patient_ids: str
    ehr_id: str
    issuer: str
    birth_date: str
    sex: str
    age_years: int
    weight_kg: float
    height_m: float
    institution: str
    institution_address: str
    referring_physician: str
    operator: str
    station: str
    accession: str
    study_id: str
    requested_procedure_id: str
    scheduled_step_id: str
    private_note: str
    study_date: dt.date
    study_start_s: float
    study_uid: str
    frame_of_reference_uid: str

    def phi_strings(self) -> list[str]:
        """The planted identifying strings (each at least 6 characters)."""
        return [self.patient_name, self.patient_id, self.other_patient_ids, self.ehr_id,
                self.issuer, self.birth_date, self.institution, self.institution_address,
                self.referring_physician, self.operator, self.station, self.accession,
                self.study_id, self.requested_procedure_id, self.scheduled_step_id,
                self.private_note]


def plant_identity(rng: np.random.Generator, seed: int, site_index: int, subject_index: int,
                   site: SiteProfile) -> StudyIdentity:
    """Synthetic, distinctive identity of one subject at one site (tagged SITE<i>, S<nnn>)."""
    tag, num = f"SITE{site_index}", f"S{subject_index:03d}"
    family, given = str(rng.choice(FAMILY)), str(rng.choice(GIVEN))
    doc_family, doc_given = str(rng.choice(FAMILY)), str(rng.choice(GIVEN))
    study_date = dt.date(2023, 1, 2) + dt.timedelta(days=int(rng.integers(0, 700)))
    age = int(rng.integers(19, 85))
    birth = study_date - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 364)))

    def digits(n: int) -> str:
        return "".join(str(d) for d in rng.integers(0, 10, size=n).tolist())

    return StudyIdentity(
        site_index=site_index, subject_index=subject_index,
        patient_name=f"{family}-{tag}{num}^{given}", patient_id=f"{tag}-MRN-{num}{digits(5)}",
        other_patient_ids=f"{tag}-INS-{digits(7)}", ehr_id=f"{tag}-EHR-{num}{digits(4)}",
        issuer=f"{tag} EHR REGISTRY", birth_date=_date(birth), sex=str(rng.choice(["F", "M"])),
        age_years=age, weight_kg=round(float(rng.uniform(50, 110)), 1),
        height_m=round(float(rng.uniform(1.52, 1.95)), 2),
        institution=site.institution.format(i=site_index),
        institution_address=f"{10 + site_index} Harbour Road, {tag} City",
        referring_physician=f"{doc_family}^{doc_given}^DR-{tag}-{num}",
        operator=f"{str(rng.choice(FAMILY))}^TECH-{tag}", station=f"{tag}-MR{site_index:02d}",
        accession=f"{tag}A{num}{digits(3)}", study_id=f"{tag}ST{subject_index:03d}",
        requested_procedure_id=f"{tag}-RP-{num}", scheduled_step_id=f"{tag}-SPS-{num}",
        private_note=f"Reviewed for {given} {family} {tag}-{num}", study_date=study_date,
        study_start_s=float(rng.integers(7 * 3600, 16 * 3600)),
        study_uid=cohort_uid(seed, site_index, subject_index, "study"),
        frame_of_reference_uid=cohort_uid(seed, site_index, subject_index, "frame-of-reference"))


def series_description(site: SiteProfile, sequence: str, view: str, number: int,
                       rng: np.random.Generator) -> str:
    """The vendor's name for the series, or (``uninformative_rate`` of the time) nothing useful."""
    if rng.uniform() < site.uninformative_rate:
        return str(rng.choice([f"Series {number}", f"WIP {number}", "fl2d", "Cardiac"]))
    template = DESCRIPTIONS.get(site.vendor, DESCRIPTIONS["SIEMENS"])[sequence]
    return template.format(view=view, VIEW=view.upper(), philips_view=PHILIPS_VIEWS[view])


def _patient_study(ds: Dataset, ident: StudyIdentity, site: SiteProfile) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.IssuerOfPatientID = ident.issuer
    ds.PatientBirthDate = ident.birth_date
    ds.PatientSex = ident.sex
    ds.PatientAge = f"{ident.age_years:03d}Y"
    ds.PatientWeight = _ds(ident.weight_kg)
    ds.PatientSize = _ds(ident.height_m)
    ds.OtherPatientIDs = ident.other_patient_ids
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = ident.ehr_id, ident.issuer
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.StudyInstanceUID = ident.study_uid
    ds.StudyDate = _date(ident.study_date)
    ds.StudyTime = _time(ident.study_start_s)
    ds.StudyID = ident.study_id
    ds.AccessionNumber = ident.accession
    ds.StudyDescription = "CARDIAC MRI"
    ds.ReferringPhysicianName = ident.referring_physician
    ds.InstitutionName = ident.institution
    ds.InstitutionAddress = ident.institution_address
    ds.StationName = ident.station
    ds.OperatorsName = ident.operator
    request = Dataset()
    request.RequestedProcedureID = ident.requested_procedure_id
    request.ScheduledProcedureStepID = ident.scheduled_step_id
    request.AccessionNumber = ident.accession
    ds.RequestAttributesSequence = Sequence([request])
    ds.Manufacturer = site.vendor
    ds.ManufacturerModelName = site.model
    ds.DeviceSerialNumber = f"{40000 + 7 * ident.site_index}"
    ds.SoftwareVersions = SOFTWARE.get(site.vendor, "MR30.1")
    ds.MagneticFieldStrength = _ds(site.field_strength_t)
    ds.ImagingFrequency = _ds(42.577 * site.field_strength_t)
    ds.ImagedNucleus = "1H"
    ds.FrameOfReferenceUID = ident.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEART"
    ds.BurnedInAnnotation = "NO"
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", ident.private_note)
    nested = Dataset()
    nested.PatientName, nested.PatientID = ident.patient_name, ident.patient_id
    block.add_new(0x11, "SQ", Sequence([nested]))


@dataclass(frozen=True)
class SeriesHeader:
    """Per-series values that the writer needs besides the rendered data."""

    number: int
    uid: str
    description: str
    start_s: float  # seconds after midnight
    inversion_ms: float | None
    rr_ms: float


def _series_common(ds: Dataset, series: SeriesData, head: SeriesHeader, site: SiteProfile,
                   ident: StudyIdentity) -> None:
    scanning, variant, tr, te, flip, image_type, name = PROTOCOLS[series.sequence]
    phases = series.pixels.shape[1]
    ds.Modality = "MR"
    ds.SeriesInstanceUID = head.uid
    ds.SeriesNumber = head.number
    ds.SeriesDescription = head.description
    ds.ProtocolName = head.description
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _date(ident.study_date)
    ds.SeriesTime = _time(head.start_s)
    ds.ScanningSequence, ds.SequenceVariant = scanning, variant
    ds.ScanOptions = ["CG", "PFP"] if series.sequence != "perfusion" else ["CG", "SAT"]
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = (name.format(phases=phases) if site.vendor == "SIEMENS"
                       else SEQUENCE_NAMES[site.vendor == "Philips"][series.sequence])
    ds.RepetitionTime = _ds(2 * head.rr_ms if series.sequence == "t2w" else tr)
    ds.EchoTime = _ds(te)
    high_field_cine = site.field_strength_t > 2 and series.sequence == "cine"
    ds.FlipAngle = _ds(flip * (0.8 if high_field_cine else 1))  # SAR limits bSSFP at 3 T
    if head.inversion_ms is not None:
        ds.InversionTime = _ds(head.inversion_ms)
    ds.EchoTrainLength = 17 if series.sequence == "t2w" else 1
    ds.NumberOfAverages = _ds(1)
    ds.SliceThickness = _ds(site.slice_thickness_mm)
    ds.SpacingBetweenSlices = _ds(site.spacing_between_slices_mm)
    ds.PixelSpacing = [_ds(series.planes[0].spacing[0]), _ds(series.planes[0].spacing[1])]
    ds.NominalInterval = int(round(head.rr_ms))
    ds.HeartRate = int(round(60000 / head.rr_ms))
    ds.CardiacNumberOfImages = 1 if series.dynamic else phases
    ds.ReceiveCoilName = COILS.get(site.vendor, "Cardiac 32")
    ds.TransmitCoilName = "Body"
    ds.Rows, ds.Columns = series.planes[0].rows, series.planes[0].cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, site.bits_stored, site.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = _ds(0), _ds(series.rescale_slope)
    ds.RescaleType = "US"
    low, high = np.percentile(series.pixels[:, 0, ::3, ::3], [1, 99.5])
    ds.WindowCenter, ds.WindowWidth = _ds((low + high) / 2), _ds(max(high - low, 1))
    derived = series.sequence in ("t1_map", "t2_map")
    ds.ImageType = ["DERIVED" if derived else "ORIGINAL", "PRIMARY", *image_type]
    if series.dynamic:
        ds.NumberOfTemporalPositions = phases


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    meta.ImplementationVersionName = "FEDCMR_SIM_1"
    return meta


@dataclass(frozen=True)
class InstanceRef:
    """Where a frame (slice, phase) of a series ended up."""

    slice: int
    phase: int
    sop_uid: str
    frame: int | None  # 1-based frame number in an Enhanced instance, None for single-frame


def instance_path(root: Path, site: SiteProfile, seed: int, study_uid: str, series_uid: str,
                  sop_uid: str) -> Path:
    """PACS-like location: nested hex folders and an extension-less hex file name."""
    h = lambda text: hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()  # noqa: E731
    if site.layout == "hashed":
        digest = h(sop_uid).upper()
        return root / digest[:2] / digest[2:4] / digest[4:20]
    return root / h(study_uid)[:8] / h(series_uid)[:8] / h(sop_uid)[:16]


def _acquisition_order(series: SeriesData, site: SiteProfile) -> list[int]:
    order = list(range(len(series.planes)))
    return order[::-1] if site.apex_first and series.view == "sax" else order


def _frame_time(series: SeriesData, head: SeriesHeader, k: int, s: int, t: int) -> float:
    """Acquisition time (s after midnight): a breath-hold per slice, a heartbeat per dynamic."""
    if series.dynamic:
        return head.start_s + (t * head.rr_ms + series.trigger_ms[s, t]) / 1000
    return head.start_s + 14.0 * k + series.trigger_ms[s, t] / 1000


def _encode(elem: DataElement) -> bytes:
    """One data element as Explicit VR Little Endian bytes (pydicom's own encoder)."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    return fp.getvalue()


def _encode_all(ds: Dataset) -> dict[int, bytes]:
    return {int(elem.tag): _encode(elem) for elem in ds}


class ClassicWriter:
    """Writes the single-frame files of one series fast, byte for byte what ``save_as`` writes:
    the elements all frames share are encoded once, per slice and per frame only their own
    (position; UID, timing, pixels), merged in tag order behind the preamble and file meta."""

    def __init__(self, shared: Dataset) -> None:
        self.shared = _encode_all(shared)
        meta = _file_meta(MR_IMAGE_STORAGE, "1.2")
        self.meta = _encode_all(meta)
        del self.meta[0x00020003]

    def write(self, path: Path, sop_uid: str, *parts: dict[int, bytes]) -> None:
        meta = dict(self.meta)
        meta[0x00020003] = _encode(DataElement(0x00020003, "UI", sop_uid))
        body = b"".join(meta[tag] for tag in sorted(meta))
        group_length = _encode(DataElement(0x00020000, "UL", len(body)))
        encoded = dict(self.shared)
        for part in parts:
            encoded.update(part)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"\0" * 128 + b"DICM" + group_length + body)
            handle.write(b"".join(encoded[tag] for tag in sorted(encoded)))


def _slice_elements(plane: Plane) -> dict[int, bytes]:
    ds = Dataset()
    ds.ImageOrientationPatient = [_ds(v) for v in plane.orientation]
    ds.ImagePositionPatient = [_ds(v) for v in plane.position]
    ds.SliceLocation = _ds(float(plane.position @ plane.normal))
    return _encode_all(ds)


def write_classic(root: Path, series: SeriesData, head: SeriesHeader, site: SiteProfile,
                  ident: StudyIdentity, seed: int) -> list[InstanceRef]:
    """One MR Image Storage file per frame."""
    shared = Dataset()
    _patient_study(shared, ident, site)
    _series_common(shared, series, head, site, ident)
    shared.SOPClassUID = MR_IMAGE_STORAGE
    shared.AcquisitionNumber = 1
    writer = ClassicWriter(shared)
    refs, number = [], 0
    for k, s in enumerate(_acquisition_order(series, site)):
        per_slice = _slice_elements(series.planes[s])
        for t in range(series.pixels.shape[1]):
            number += 1
            uid = cohort_uid(seed, head.uid, s, t)
            own = Dataset()
            own.add_new(0x00080018, "UI", uid)  # SOPInstanceUID
            own.add_new(0x00200013, "IS", number)  # InstanceNumber
            own.add_new(0x00181060, "DS", _ds(series.trigger_ms[s, t]))  # TriggerTime
            when = _time(_frame_time(series, head, k, s, t))
            own.add_new(0x00080032, "TM", when)  # AcquisitionTime
            own.add_new(0x00080033, "TM", when)  # ContentTime
            if series.dynamic:
                own.add_new(0x00200100, "IS", t + 1)  # TemporalPositionIdentifier
            own.add_new(0x7FE00010, "OW", series.pixels[s, t].tobytes())
            writer.write(instance_path(root, site, seed, ident.study_uid, head.uid, uid), uid,
                         per_slice, _encode_all(own))
            refs.append(InstanceRef(s, t, uid, None))
    return refs


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _frame_group(series: SeriesData, plane: Plane, position: int, s: int, t: int) -> Dataset:
    group = Dataset()
    group.FrameContentSequence = Sequence([_item(
        StackID="1", InStackPositionNumber=position, TemporalPositionIndex=t + 1,
        DimensionIndexValues=[position, t + 1])])
    group.PlanePositionSequence = Sequence([_item(
        ImagePositionPatient=[_ds(v) for v in plane.position])])
    group.PlaneOrientationSequence = Sequence([_item(
        ImageOrientationPatient=[_ds(v) for v in plane.orientation])])
    group.CardiacSynchronizationSequence = Sequence([_item(
        NominalCardiacTriggerDelayTime=_ds(series.trigger_ms[s, t]))])
    return group


def _enhanced_modules(ds: Dataset, series: SeriesData, head: SeriesHeader, seed: int) -> None:
    ds.ImageType = [ds.ImageType[0], "PRIMARY", "M", "NONE"]
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation, ds.VolumetricProperties = "MONOCHROME", "VOLUME"
    ds.VolumeBasedCalculationTechnique, ds.ComplexImageComponent = "NONE", "MAGNITUDE"
    ds.AcquisitionContrast = "T1" if series.sequence == "lge" else "MIXED"
    ds.AcquisitionDateTime = ds.SeriesDate + ds.SeriesTime
    organisation = cohort_uid(seed, head.uid, "dimension-organisation")
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=organisation)])
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=organisation, DimensionIndexPointer=Tag(0x0020, 0x9057),
              FunctionalGroupPointer=Tag(0x0020, 0x9111)),
        _item(DimensionOrganizationUID=organisation, DimensionIndexPointer=Tag(0x0020, 0x9128),
              FunctionalGroupPointer=Tag(0x0020, 0x9111))])
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([_item(
        PixelSpacing=ds.PixelSpacing, SliceThickness=ds.SliceThickness,
        SpacingBetweenSlices=ds.SpacingBetweenSlices)])
    shared.MRTimingAndRelatedParametersSequence = Sequence([_item(
        RepetitionTime=ds.RepetitionTime, FlipAngle=ds.FlipAngle, EchoTrainLength=1)])
    shared.MREchoSequence = Sequence([_item(EffectiveEchoTime=ds.EchoTime)])
    shared.PixelValueTransformationSequence = Sequence([_item(
        RescaleIntercept=ds.RescaleIntercept, RescaleSlope=ds.RescaleSlope, RescaleType="US")])
    shared.FrameVOILUTSequence = Sequence([_item(WindowCenter=ds.WindowCenter,
                                                 WindowWidth=ds.WindowWidth)])
    shared.MRImageFrameTypeSequence = Sequence([_item(
        FrameType=ds.ImageType, PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE", ComplexImageComponent="MAGNITUDE",
        AcquisitionContrast=ds.AcquisitionContrast)])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    for keyword in ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RepetitionTime",
                    "FlipAngle", "EchoTime", "RescaleIntercept", "RescaleSlope", "RescaleType",
                    "WindowCenter", "WindowWidth", "EchoTrainLength"):
        delattr(ds, keyword)


def write_enhanced(root: Path, series: SeriesData, head: SeriesHeader, site: SiteProfile,
                   ident: StudyIdentity, seed: int) -> list[InstanceRef]:
    """One Enhanced MR Image Storage instance holding every frame of the series."""
    ds = Dataset()
    _patient_study(ds, ident, site)
    _series_common(ds, series, head, site, ident)
    _enhanced_modules(ds, series, head, seed)
    uid = cohort_uid(seed, head.uid, "enhanced")
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, uid)
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR_IMAGE_STORAGE, uid
    ds.InstanceNumber = 1
    ds.ContentTime = ds.SeriesTime
    order = _acquisition_order(series, site)
    spatial = {s: rank + 1 for rank, s in enumerate(sorted(
        order, key=lambda i: float(series.planes[i].position @ series.planes[i].normal)))}
    groups, frames, refs = [], [], []
    for s in order:
        for t in range(series.pixels.shape[1]):
            groups.append(_frame_group(series, series.planes[s], spatial[s], s, t))
            frames.append(series.pixels[s, t])
            refs.append(InstanceRef(s, t, uid, len(frames)))
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack(frames).tobytes()
    ds["PixelData"].VR = "OW"
    path = instance_path(root, site, seed, ident.study_uid, head.uid, uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return refs

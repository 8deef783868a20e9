"""Reading, orienting, masking and normalizing MR volumes; slice datasets.

* Volumes are read 16-bit safe: NIfTI through nibabel (scl_slope/inter applied,
  float32 result), DICOM series folders through pydicom (RescaleSlope /
  RescaleIntercept applied to the raw integer pixels; never through 8-bit images).
* :func:`to_canonical` permutes / flips axes (``nibabel.orientations``, no
  resampling) so that array axes run towards ``CANONICAL`` = L, P, S: axis 2 is
  the axial slice axis and each axial slice is indexed (towards Left, towards
  Posterior), i.e. a DICOM axial image transposed.
* :func:`normalize` divides by a robust percentile inside a head mask; the
  parameters are returned in a :class:`Normalization` that travels with the
  result so intensities can be mapped back.

Paired layout: ``DIR/<subject>/T1.nii.gz`` and ``T2.nii.gz`` (or ``T1/`` and
``T2/`` DICOM series folders) on the same grid.  Unpaired layout: two folders of
volumes (``DIR/T1/*`` and ``DIR/T2/*``), or the paired layout used without pairing.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterable, Sequence

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage
from skimage.filters import threshold_otsu

__all__ = [
    "CANONICAL",
    "DataError",
    "InputNorm",
    "Normalization",
    "Subject",
    "Volume",
    "discover_paired",
    "canonical_shape",
    "discover_unpaired",
    "fragmentary_slices",
    "from_canonical",
    "head_mask",
    "input_volume",
    "target_volume",
    "load_volume",
    "normalize",
    "thick_stack",
    "tissue_peak",
    "to_canonical",
]

log = logging.getLogger(__name__)

CANONICAL: tuple[str, str, str] = ("L", "P", "S")
"""Model orientation: axis 0 -> patient Left, axis 1 -> Posterior, axis 2 -> Superior."""

NORM_PERCENTILE = 99.5
CONTRASTS = ("T1", "T2")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DataError(ValueError):
    """Unreadable or inconsistent input data; ``str(err)`` is one line."""


@dataclass
class Volume:
    """A volume in physical units (float32) with its voxel->RAS+ affine."""

    data: np.ndarray
    affine: np.ndarray
    source: str = ""


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith(_NIFTI_SUFFIXES)


def _load_nifti(path: Path) -> Volume:
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))  # applies scl_slope / scl_inter
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return Volume(data, np.asarray(img.affine, dtype=np.float64), str(path))


def _load_dicom_folder(folder: Path) -> Volume:
    """One single-frame DICOM series folder -> volume (i = column, j = row, k = slice)."""
    import pydicom

    datasets = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=False)
        except Exception:
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            datasets.append(ds)
    if not datasets:
        raise DataError(f"{folder}: no DICOM images with position/orientation found")
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} series; give one series per folder")
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    slices = []
    for ds in datasets:
        arr = ds.pixel_array.astype(np.float32)  # raw stored integers, 16-bit safe
        slope = float(ds.get("RescaleSlope", 1) or 1)
        inter = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(arr * slope + inter)
    shape0 = slices[0].shape
    if any(s.shape != shape0 for s in slices):
        raise DataError(f"{folder}: slices have different sizes")
    # (rows, cols, slices) -> (cols, rows, slices): i along row_dir, j along col_dir
    data = np.stack(slices, axis=-1).transpose(1, 0, 2)
    dr, dc = (float(v) for v in datasets[0].PixelSpacing)  # row spacing, column spacing
    p0 = np.asarray(datasets[0].ImagePositionPatient, dtype=np.float64)
    if len(datasets) > 1:
        step = np.asarray(datasets[-1].ImagePositionPatient, dtype=np.float64) - p0
        step = step / (len(datasets) - 1)
    else:
        step = normal * float(datasets[0].get("SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * dc
    lps[:3, 1] = col_dir * dr
    lps[:3, 2] = step
    lps[:3, 3] = p0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) -> RAS+ (NIfTI)
    return Volume(np.ascontiguousarray(data), affine, str(folder))


def load_volume(path: str | Path) -> Volume:
    """A NIfTI file or a DICOM series folder, in physical units, float32."""
    p = Path(path)
    if _is_nifti(p):
        return _load_nifti(p)
    if p.is_dir():
        return _load_dicom_folder(p)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    raise DataError(f"{p}: not a NIfTI file (.nii, .nii.gz) or a DICOM series folder")


def _orientation_transform(affine: np.ndarray) -> np.ndarray:
    current = nio.io_orientation(affine)
    return nio.ornt_transform(current, nio.axcodes2ornt(CANONICAL))


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute / flip *data* into :data:`CANONICAL` axes; returns (data, new affine)."""
    t = _orientation_transform(affine)
    out = nio.apply_orientation(data, t)
    new_affine = affine @ nio.inv_ornt_aff(t, data.shape)
    return np.ascontiguousarray(out), new_affine


def canonical_shape(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    """Shape a volume of *shape* / *affine* has after :func:`to_canonical`."""
    t = _orientation_transform(affine)
    out = [0, 0, 0]
    for axis, (target, _) in enumerate(t):
        out[int(target)] = int(shape[axis])
    return out[0], out[1], out[2]


def from_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical`; *affine* is the ORIGINAL affine of the volume."""
    inverse = nio.ornt_transform(nio.axcodes2ornt(CANONICAL), nio.io_orientation(affine))
    return np.ascontiguousarray(nio.apply_orientation(data, inverse))


def head_mask(data: np.ndarray) -> np.ndarray:
    """Foreground (head / brain) mask: Otsu on a smoothed volume, holes filled per slice.

    Works for skull-stripped and non-stripped volumes; the largest connected
    component is kept.
    """
    vol = np.clip(data, 0, None).astype(np.float32)
    if not np.any(vol > 0):
        return np.zeros(data.shape, dtype=bool)
    smooth = ndimage.gaussian_filter(vol, 1.0)
    positive = smooth[smooth > 0]
    hi = np.percentile(positive, 99.5)
    thr = threshold_otsu(np.clip(positive, 0, hi))
    # Otsu between background and tissue tends to sit high on T2 (bright CSF); lower it
    mask = smooth > 0.5 * thr
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    mask = ndimage.binary_closing(mask, iterations=2)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


@dataclass(frozen=True)
class Normalization:
    """``normalized = clip(value - low, 0) / (high - low)``; :meth:`invert` maps back."""

    low: float
    high: float
    percentile: float = NORM_PERCENTILE

    def apply(self, data: np.ndarray) -> np.ndarray:
        return (np.clip(data - self.low, 0, None) / (self.high - self.low)).astype(np.float32)

    def invert(self, normalized: np.ndarray) -> np.ndarray:
        return (np.asarray(normalized, dtype=np.float32) * (self.high - self.low) + self.low).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def normalize(data: np.ndarray, mask: np.ndarray | None = None,
              percentile: float = NORM_PERCENTILE) -> tuple[np.ndarray, Normalization]:
    """Divide by the *percentile* of the values inside *mask* (a head mask when None).

    Values below zero are clipped (background); the result is float32, typically
    in [0, ~1.3].  The :class:`Normalization` returned maps it back.
    """
    if mask is None:
        mask = head_mask(data)
    inside = data[mask] if mask.any() else data[data > 0]
    if inside.size == 0:
        return np.zeros(data.shape, np.float32), Normalization(0.0, 1.0, percentile)
    high = float(np.percentile(inside, percentile))
    if not np.isfinite(high) or high <= 0:
        high = float(np.max(inside)) or 1.0
    norm = Normalization(0.0, high, percentile)
    return norm.apply(data), norm


class InputNorm(str, Enum):
    """How a network's *input* volume is scaled (the target is always :func:`normalize`-d).

    ``percentile``: divided by its 99.5th percentile inside the head mask (v1/v2 checkpoints).
    ``tissue-peak``: divided by its main tissue peak (:func:`tissue_peak`), so that the same
    tissue means the same input value whether the scan is skull-stripped or whole-head (the
    99.5th percentile of a whole-head T1 is scalp fat, of a skull-stripped one white matter).
    """

    PERCENTILE = "percentile"
    TISSUE_PEAK = "tissue-peak"


INPUT_CLIP = 4.0
"""Harmonised inputs are clipped to [0, INPUT_CLIP] (fat, vessels and artefacts above that carry no tissue contrast)."""


def tissue_peak(data: np.ndarray, mask: np.ndarray, lower_percentile: float = 40.0) -> float:
    """The main tissue peak: the mode of the smoothed histogram of the values inside *mask* between
    their *lower_percentile* and 99.5th percentile (white matter on T1, grey matter on T2; the
    lower part of the histogram, dominated by background-like voxels in whole-head scans, is ignored)."""
    inside = np.asarray(data[mask] if mask.any() else data[data > 0], dtype=np.float64)
    if inside.size == 0:
        return 1.0
    lo, hi = np.percentile(inside, [lower_percentile, NORM_PERCENTILE])
    if not hi > lo:
        return float(hi) if hi > 0 else 1.0
    hist, edges = np.histogram(inside[(inside >= lo) & (inside <= hi)], bins=200, range=(lo, hi))
    i = int(np.argmax(ndimage.gaussian_filter1d(hist.astype(np.float64), 3.0)))
    peak = 0.5 * (edges[i] + edges[i + 1])
    return float(peak) if peak > 0 else float(hi)


def input_volume(data: np.ndarray, mask: np.ndarray, method: InputNorm) -> np.ndarray:
    """Scale a (canonical) volume for the network input as *method* says; float32."""
    if method is InputNorm.PERCENTILE:
        return normalize(data, mask)[0]
    peak = tissue_peak(data, mask)
    return np.clip(np.asarray(data, dtype=np.float32) / np.float32(peak), 0.0, INPUT_CLIP).astype(np.float32)


TARGET_SPAN = 5.0
"""Tissue-peak targets are ``value / (TARGET_SPAN * tissue peak)``, clipped to [0, 1]: CSF, the brightest
tissue on T2, lies at 3-5 times the main tissue peak in the shared data."""


def target_volume(data: np.ndarray, mask: np.ndarray, method: InputNorm) -> tuple[np.ndarray, float]:
    """A training target scaled as *method* says, in [0, 1], and the divisor used (physical units per unit).

    ``percentile``: :func:`normalize` (the 99.5th percentile is 1; whether that is scalp fat or CSF depends
    on the scan, so the network must guess the scan type from the input).  ``tissue-peak``: divided by
    ``TARGET_SPAN`` times the main tissue peak, the same tissue scale for every scan."""
    if method is InputNorm.PERCENTILE:
        normed, norm = normalize(data, mask)
        return np.clip(normed, 0.0, 1.0), norm.high
    divisor = TARGET_SPAN * tissue_peak(data, mask)
    return np.clip(np.asarray(data, dtype=np.float32) / np.float32(divisor), 0.0, 1.0).astype(np.float32), divisor


def parse_input_norm(value: object) -> InputNorm:
    try:
        return InputNorm(str(value or InputNorm.PERCENTILE.value))
    except ValueError:
        raise DataError(f"input normalization: {value!r} is not one of "
                        f"{', '.join(m.value for m in InputNorm)}") from None


@dataclass
class Subject:
    """A paired subject: both contrasts on one grid, canonical, normalized."""

    name: str
    t1: np.ndarray  # normalized float32, canonical orientation
    t2: np.ndarray
    mask: np.ndarray  # head mask (canonical)
    norm_t1: Normalization
    norm_t2: Normalization
    affine: np.ndarray  # canonical affine
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # voxel size (mm) along the canonical axes
    _inputs: dict[tuple[str, InputNorm], np.ndarray] = field(default_factory=dict, repr=False)
    _divisors: dict[tuple[str, InputNorm], float] = field(default_factory=dict, repr=False)

    def image(self, contrast: str) -> np.ndarray:
        return self.t1 if contrast == "T1" else self.t2

    def normalization(self, contrast: str) -> Normalization:
        return self.norm_t1 if contrast == "T1" else self.norm_t2

    def input_image(self, contrast: str, method: InputNorm) -> np.ndarray:
        """*contrast* scaled as a network input (:func:`input_volume` inside that contrast's own head mask)."""
        if method is InputNorm.PERCENTILE:
            return self.image(contrast)
        key = (contrast, method)
        if key not in self._inputs:
            img = self.image(contrast)
            self._inputs[key] = input_volume(img, head_mask(img), method)
        return self._inputs[key]

    def target_image(self, contrast: str, method: InputNorm) -> tuple[np.ndarray, float]:
        """*contrast* scaled as a training target (:func:`target_volume`) and its divisor in physical units."""
        if method is InputNorm.PERCENTILE:
            return np.clip(self.image(contrast), 0.0, 1.0), self.normalization(contrast).high
        key = ("target-" + contrast, method)
        if key not in self._inputs:
            img = self.image(contrast)
            vol, div = target_volume(img, head_mask(img), method)
            self._inputs[key] = vol
            self._divisors[key] = div * self.normalization(contrast).high  # image() is already divided by high
        return self._inputs[key], self._divisors[key]


def _find_contrast(folder: Path, contrast: str) -> Path | None:
    for suffix in _NIFTI_SUFFIXES:
        for name in (contrast, contrast.lower()):
            p = folder / f"{name}{suffix}"
            if p.is_file():
                return p
    for name in (contrast, contrast.lower()):
        p = folder / name
        if p.is_dir():
            return p
    return None


def discover_paired(root: str | Path) -> list[Path]:
    """Subject folders under *root* holding both T1 and T2."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: data folder does not exist")
    subjects = [d for d in sorted(r.iterdir()) if d.is_dir() and _find_contrast(d, "T1") and _find_contrast(d, "T2")]
    if not subjects:
        raise DataError(f"{r}: no subject folders with T1 and T2 (expected <subject>/T1.nii.gz and T2.nii.gz)")
    return subjects


def load_subject(folder: Path) -> Subject:
    """Read both contrasts, check the grid, reorient, mask and normalize."""
    p1, p2 = _find_contrast(folder, "T1"), _find_contrast(folder, "T2")
    if p1 is None or p2 is None:
        raise DataError(f"{folder}: needs both T1 and T2")
    v1, v2 = load_volume(p1), load_volume(p2)
    if v1.data.shape != v2.data.shape or not np.allclose(v1.affine, v2.affine, atol=1e-3):
        raise DataError(f"{folder}: T1 and T2 are not on the same grid ({v1.data.shape} vs {v2.data.shape})")
    d1, aff = to_canonical(v1.data, v1.affine)
    d2, _ = to_canonical(v2.data, v2.affine)
    m1, m2 = head_mask(d1), head_mask(d2)
    # each contrast is normalized inside its own mask, exactly as inference does
    n1, norm1 = normalize(d1, m1)
    n2, norm2 = normalize(d2, m2)
    mask = m1 | m2
    spacing = tuple(float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    return Subject(folder.name, n1, n2, mask, norm1, norm2, aff, spacing)  # type: ignore[arg-type]


def load_subjects(folders: Iterable[Path]) -> list[Subject]:
    return [load_subject(f) for f in folders]


def discover_unpaired(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Unpaired collections: ``root/T1/*`` and ``root/T2/*`` volumes, or a paired layout."""
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: data folder does not exist")
    a, b = r / "T1", r / "T2"
    if a.is_dir() and b.is_dir():
        def vols(d: Path) -> list[Path]:
            return [p for p in sorted(d.iterdir()) if _is_nifti(p) or p.is_dir()]
        va, vb = vols(a), vols(b)
        if not va or not vb:
            raise DataError(f"{r}: T1/ and T2/ must each hold at least one volume")
        return va, vb
    subjects = discover_paired(r)
    return [_find_contrast(s, "T1") for s in subjects], [_find_contrast(s, "T2") for s in subjects]  # type: ignore[misc]


def load_normalized(path: Path) -> tuple[np.ndarray, np.ndarray, Normalization]:
    """One volume -> (normalized canonical data, canonical mask, normalization)."""
    v = load_volume(path)
    d, _ = to_canonical(v.data, v.affine)
    mask = head_mask(d)
    n, norm = normalize(d, mask)
    return n, mask, norm


def slice_stack(volume: np.ndarray, k: int, context: int) -> np.ndarray:
    """Axial slice *k* with *context* neighbours each side (edge slices repeated): (C, X, Y)."""
    nz = volume.shape[2]
    idx = np.clip(np.arange(k - context, k + context + 1), 0, nz - 1)
    return np.moveaxis(volume[:, :, idx], 2, 0)


def thick_stack(volume: np.ndarray, k: int, context: int, thickness: int) -> np.ndarray:
    """Like :func:`slice_stack`, but as a 2-D acquisition of *thickness* slices would see the volume:
    each of the ``2 * context + 1`` slices is the mean of *thickness* neighbouring thin slices, and
    neighbours lie *thickness* slices apart (edges repeated).  ``thickness=1`` is :func:`slice_stack`."""
    if thickness <= 1:
        return slice_stack(volume, k, context)
    nz = volume.shape[2]
    first = k - thickness // 2
    out = []
    for j in range(-context, context + 1):
        idx = np.clip(np.arange(first + j * thickness, first + (j + 1) * thickness), 0, nz - 1)
        out.append(volume[:, :, idx].mean(axis=2))
    return np.stack(out).astype(np.float32)


FRAGMENT_MEAN_AREA = 0.45
"""Below this mean inferior slice area (relative to the largest slice) a brain mask is judged to
have lost its lower part (see :func:`fragmentary_slices`).  On the shared data the intact masks,
skull-stripped or whole-head, score 0.54-0.80 and brats_sri24_case, whose brain extraction failed
on the lowest third of the slices, 0.37."""


def fragmentary_slices(mask: np.ndarray) -> list[int]:
    """Inferior axial slices of a brain mask whose extraction failed, or ``[]`` when it did not.

    A failed skull stripping leaves only fragments of the brain in the lowest slices: their mask
    area falls far below that of an intact brain, whose inferior slices (temporal lobes,
    cerebellum) still average more than half of the largest slice.  When the slices below the
    largest one average less than :data:`FRAGMENT_MEAN_AREA` of it, those of them covering less
    than half of it are fragmentary: they would teach (and score) a model on a truncated brain,
    so training and evaluation leave them out.
    """
    area = mask.reshape(-1, mask.shape[2]).sum(axis=0).astype(np.float64)
    if not area.any():
        return []
    top = int(np.argmax(area))
    present = np.nonzero(area)[0]
    below = np.arange(int(present[0]), top)
    if below.size == 0 or area[below].mean() / area[top] >= FRAGMENT_MEAN_AREA:
        return []
    return [int(k) for k in below if area[k] < 0.5 * area[top]]


def useful_slices(mask: np.ndarray, min_fraction: float = 0.02) -> list[int]:
    """Axial slices whose head mask covers at least *min_fraction* of the slice and that are not
    :func:`fragmentary_slices`."""
    frac = mask.reshape(-1, mask.shape[2]).mean(axis=0)
    bad = set(fragmentary_slices(mask))
    return [int(k) for k in np.nonzero(frac >= min_fraction)[0] if int(k) not in bad]


def split_names(names: Sequence[str], val: Sequence[str]) -> tuple[list[str], list[str]]:
    missing = sorted(set(val) - set(names))
    if missing:
        raise DataError(f"--val-subjects: {', '.join(missing)} not found among {', '.join(names)}")
    return [n for n in names if n not in val], [n for n in names if n in val]

"""QC checks read from the DICOM headers of a series: acquisition facts that change the contrast the model sees.

:func:`header_checks` returns :class:`ml.qc.Check` items, like the image checks of :func:`ml.inference.assess`,
so both go into one :func:`ml.qc.summarize`.  Every reason names the header fact that caused it and never a patient
attribute.  A check whose facts the headers do not state is left out (no verdict), except where a stated fact
alone is telling (an inversion-recovery sequence without its inversion time).

Checks and why each verdict:

* ``contrast_agent`` (warn): ContrastBolusAgent, -Route, -Volume, -StartTime, -TotalDose, ContrastBolusAgentSequence,
  or, in Enhanced MR, a Contrast/Bolus Usage item with ContrastBolusAgentAdministered = YES.  The shipped models were
  trained on images without contrast agent; a post-contrast image is still the weighting the model expects, but
  enhancing tissue and vessels are bright where the model has learnt other tissue, so the synthesis may misdraw
  exactly the lesions.  Warn, so the series is delivered labelled, not held: contrast studies are everyday work.
* ``inversion_recovery`` (fail): an inversion time above 1500 ms (InversionTime, or InversionTimes in the Enhanced
  MR Modifier Sequence) makes a FLAIR-like image: fluid is nulled, which is neither a T1 nor a T2 contrast, so the
  whole synthesis is systematically wrong (dark CSF where a T2 has bright CSF).  T1-weighted inversion recovery
  (MPRAGE, IR-FSPGR) inverts at 300-1200 ms and passes.  An inversion-recovery sequence (ScanningSequence IR,
  InversionRecovery YES) that states no inversion time warns.  (MP2RAGE's second inversion image, TI near 2500 ms,
  is not a T1 either.)
* ``field_strength`` (warn): MagneticFieldStrength outside 1.0-3.5 T; the training scans are 1.5 and 3 T.
  Relaxation times change with the field, so the contrast differs by degrees, not in kind.
* ``slice_geometry`` (warn): slices more than 30 degrees from axial (slice normal against the head-foot axis) and
  thicker (or further apart) than 3 mm.  The network works on axial planes; such a series reaches it with one
  in-plane axis sampled at the slice thickness, which it has never seen.  The image checks (``orientation``,
  ``in_plane_voxel``) see the same from the geometry; this check says it from the protocol.  Warn: the anatomy is
  there, coarsely.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ml.qc import Check, Verdict
from vocab import Direction

__all__ = ["FIELD_RANGE_T", "FLAIR_TI_MS", "OBLIQUE_DEG", "THICK_MM", "header_checks"]

FLAIR_TI_MS = 1500.0
"""Inversion times above this null fluid (FLAIR-like); T1-weighted inversion recovery stays below ~1200 ms."""
FIELD_RANGE_T = (1.0, 3.5)
"""Field strengths (T) judged like the training scans (1.5 and 3 T)."""
OBLIQUE_DEG = 30.0
"""Slice normals further than this from the head-foot axis are not axial (as ml.qc's orientation check)."""
THICK_MM = 3.0
"""Slices thicker or further apart than this, acquired off axial, leave the network a coarse in-plane axis."""

_NO = {"", "NONE", "NO", "N/A", "NA", "0", "NIL", "UNKNOWN"}
_CONTRAST_TEXT = ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusStartTime")
_CONTRAST_AMOUNT = ("ContrastBolusVolume", "ContrastBolusTotalDose")


def _items(ds: Dataset) -> Iterator[Dataset]:
    """The dataset, then the shared and the first frame's functional groups item and the first item of each macro in
    them (PlaneOrientationSequence, MRModifierSequence, ...)."""
    yield ds
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(group)
        if not seq:
            continue
        yield seq[0]
        for element in seq[0]:
            if element.VR == "SQ" and element.value:
                yield element.value[0]


def _find(ds: Dataset, keyword: str) -> Any:
    """First non-empty value of *keyword* in *ds* or its functional groups; None when absent."""
    for item in _items(ds):
        value = item.get(keyword)
        if value is not None and value != "" and not (hasattr(value, "__len__") and len(value) == 0):
            return value
    return None


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        v = float(value[0] if isinstance(value, (list, tuple, MultiValue)) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return v if np.isfinite(v) else None


def _words(value: Any) -> set[str]:
    if value is None:
        return set()
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return {str(v).strip().upper() for v in values}


def _contrast_given(ds: Dataset) -> str | None:
    """The header fact that says contrast agent was given, or None."""
    for keyword in _CONTRAST_TEXT:
        value = _find(ds, keyword)
        if value is not None and str(value).strip().upper() not in _NO:
            return keyword
    for keyword in _CONTRAST_AMOUNT:
        amount = _float(_find(ds, keyword))
        if amount is not None and amount > 0:
            return keyword
    if ds.get("ContrastBolusAgentSequence"):
        return "ContrastBolusAgentSequence"
    for item in _items(ds):
        for usage in item.get("ContrastBolusUsageSequence") or []:
            if "YES" in _words(usage.get("ContrastBolusAgentAdministered")):
                return "ContrastBolusUsageSequence (agent administered)"
    return None


def _contrast_check(headers: Sequence[Dataset], source: str) -> Check:
    cause = next((c for c in (_contrast_given(ds) for ds in headers) if c), None)
    if cause is None:
        return Check("contrast_agent", 0.0, "no contrast agent", Verdict.PASS)
    return Check("contrast_agent", 1.0, "no contrast agent", Verdict.WARN,
                 f"contrast agent given ({cause}): the {source} model was trained on images without contrast agent")


def _inversion_check(ds: Dataset, source: str) -> Check | None:
    ti = _float(_find(ds, "InversionTime"))
    if ti is None or ti <= 0:
        ti = _float(_find(ds, "InversionTimes"))
    is_ir = "IR" in _words(_find(ds, "ScanningSequence")) or "YES" in _words(_find(ds, "InversionRecovery"))
    threshold = f"inversion time <= {FLAIR_TI_MS:.0f} ms"
    if ti is not None and ti > FLAIR_TI_MS:
        return Check("inversion_recovery", ti, threshold, Verdict.FAIL,
                     f"inversion recovery with a long inversion time ({ti:.0f} ms, FLAIR-like): "
                     f"fluid is nulled, not a {source} contrast")
    if ti is not None and ti > 0:
        return Check("inversion_recovery", ti, threshold, Verdict.PASS)
    if is_ir:
        return Check("inversion_recovery", 0.0, threshold, Verdict.WARN,
                     f"inversion recovery sequence without a stated inversion time: may be FLAIR-like, "
                     f"not a {source} contrast")
    return None


def _field_check(ds: Dataset) -> Check | None:
    tesla = _float(_find(ds, "MagneticFieldStrength"))
    if tesla is None or tesla <= 0:
        return None
    lo, hi = FIELD_RANGE_T
    ok = lo <= tesla <= hi
    return Check("field_strength", tesla, f"{lo:g}-{hi:g} T", Verdict.PASS if ok else Verdict.WARN,
                 "" if ok else f"field strength {tesla:g} T outside the training range (1.5-3 T)")


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-6 else None


def _slice_spacing(headers: Sequence[Dataset], normal: np.ndarray) -> float | None:
    """Thickness or spacing, whichever is larger: the stated ones, else the median step between positions."""
    ds = headers[0]
    stated = [v for v in (_float(_find(ds, "SliceThickness")), _float(_find(ds, "SpacingBetweenSlices")))
              if v is not None and v > 0]
    if stated:
        return max(stated)
    positions = [_find(h, "ImagePositionPatient") for h in headers]
    along = sorted(float(np.dot(np.asarray([float(x) for x in p]), normal)) for p in positions if p is not None)
    steps = np.diff(along)
    steps = steps[steps > 1e-3]
    return float(np.median(steps)) if steps.size else None


def _geometry_check(headers: Sequence[Dataset]) -> Check | None:
    iop = _find(headers[0], "ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    try:
        cosines = np.asarray([float(v) for v in iop], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    normal = _unit(np.cross(cosines[:3], cosines[3:]))
    if normal is None:
        return None
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))  # LPS: z is the head-foot axis
    spacing = _slice_spacing(headers, normal)
    threshold = f"<= {OBLIQUE_DEG:.0f} deg from axial, or slices <= {THICK_MM:g} mm"
    if angle <= OBLIQUE_DEG or spacing is None or spacing <= THICK_MM:
        return Check("slice_geometry", angle, threshold, Verdict.PASS)
    plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
    return Check("slice_geometry", angle, threshold, Verdict.WARN,
                 f"{plane}-like slices ({angle:.0f} deg from axial) of {spacing:.3g} mm: "
                 f"the model works on axial planes and was trained on them")


def header_checks(headers: Sequence[Dataset], direction: Direction) -> list[Check]:
    """The header checks of one series (*headers*: its datasets, pixel data not needed) for a synthesis in
    *direction*; [] for no headers."""
    if not headers:
        return []
    source = Direction(direction).source.value
    checks: list[Check | None] = [_contrast_check(headers, source), _inversion_check(headers[0], source),
                                  _field_check(headers[0]), _geometry_check(headers)]
    return [c for c in checks if c is not None]

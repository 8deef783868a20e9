"""Quality control of a synthesis: is the input like what the model was trained on, and is the
prediction stable?

Each check has a name, a value, a threshold and a verdict (``pass``, ``warn``, ``fail``); the
summary verdict is the worst of them, with the reasons of every check that did not pass.

* **Input against the training distribution** (:func:`input_reference` at training time, stored
  in the checkpoint metadata as ``qc_reference``; ``python -m ml.reference`` recomputes it for a
  checkpoint from its training subjects; :func:`check_input` at inference): the histogram of the
  network input inside the head mask, in percentile units (:func:`percentile_units`), against the
  nearest training volume's, the tissue contrast order (:func:`quartile_skewness`: on a T1 the bulk of the head,
  brain tissue, is bright and a minority, fluid and bone, dark; inverted intensities reverse that), the spatial
  structure (:func:`spatial_correlation`: neighbouring voxels of an image correlate, those of noise do not), the
  head-mask volume fraction, the in-plane voxel size, the slice thickness, the in-plane size and the slice orientation.
* **Prediction stability** (:func:`flip_disagreement`): the prediction on the left-right mirrored
  input, mirrored back, compared with the prediction (test-time augmentation); a brain is nearly
  symmetric, so a model that has learnt the contrast gives nearly the same image.  Its thresholds belong to the
  model (:func:`flip_thresholds`): multiples of the largest flip disagreement the model shows on its own training
  volumes (``flip_disagreement_max`` in the reference, :func:`ml.inference.flip_reference`).

Header facts that change the contrast (contrast agent, FLAIR-like inversion) are DICOM-side
checks and live with the node's QC stage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .data import INPUT_CLIP

__all__ = ["Check", "QCResult", "Verdict", "check_input", "flip_disagreement", "flip_thresholds", "histogram_thresholds",
           "input_reference", "percentile_units", "quartile_skewness", "spatial_correlation", "summarize"]

BINS = 64
HIST_RANGE = (0.0, INPUT_CLIP)  # in percentile units (1 = the 99.5th percentile inside the head mask)


class Verdict(str, enum.Enum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"

    @property
    def rank(self) -> int:
        return {"pass": 0, "warn": 1, "fail": 2}[self.value]


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: str
    verdict: Verdict
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "threshold": self.threshold, "verdict": self.verdict.value, "reason": self.reason}


@dataclass(frozen=True)
class QCResult:
    verdict: Verdict
    reasons: tuple[str, ...]
    checks: tuple[Check, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "reasons": list(self.reasons),
                "checks": {c.name: c.to_dict() for c in self.checks}}


def summarize(checks: Sequence[Check]) -> QCResult:
    worst = max((c.verdict for c in checks), key=lambda v: v.rank, default=Verdict.PASS)
    return QCResult(worst, tuple(c.reason for c in checks if c.verdict is not Verdict.PASS), tuple(checks))


HIST_PERCENTILE = 99.5


def percentile_units(values: np.ndarray) -> np.ndarray:
    """*values* (the network input inside the head mask) divided by their own HIST_PERCENTILE-th percentile.

    The histogram check compares inputs in these units whatever the network's own input scaling.  Tissue-peak
    scaling (``ml.data.InputNorm.TISSUE_PEAK``) puts the main tissue peak at 1 on purpose, and so maps a
    post-contrast T1, whose enhancing vessels and tissue fill the bright tail, onto a native T1; divided by a high
    percentile, that bright tail shifts the whole histogram.  For a percentile-scaled input (v1/v2 checkpoints)
    this changes nothing: its 99.5th percentile inside the mask is already 1."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    high = float(np.percentile(values, HIST_PERCENTILE))
    return values / high if np.isfinite(high) and high > 0 else values


HISTOGRAM_UNITS = "percentile-99.5"
"""``histogram_units`` of a reference made by :func:`input_reference`.  A reference without it (made before the
histogram was taken in percentile units) holds histograms of the network input as scaled, and the check compares
the input in those units."""


def _histogram(normed: np.ndarray, mask: np.ndarray, percentile: bool = True) -> np.ndarray:
    values = percentile_units(normed[mask]) if percentile else normed[mask]
    h, _ = np.histogram(np.clip(values, *HIST_RANGE), bins=BINS, range=HIST_RANGE)
    total = h.sum()
    return h / total if total else h.astype(np.float64)


def _w1(p: np.ndarray, q: np.ndarray) -> float:
    """Wasserstein-1 distance of two histograms on the same bins, in percentile units."""
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / BINS
    return float(np.abs(np.cumsum(p) - np.cumsum(q)).sum() * width)


def quartile_skewness(normed: np.ndarray, mask: np.ndarray) -> float:
    """Bowley's quartile skewness of the intensities inside *mask*, ``(q3 + q1 - 2 q2) / (q3 - q1)`` in [-1, 1]:
    negative when the median lies nearer the bright quartile (the bulk of the head bright, a minority dark: a T1,
    whose brain tissue is brighter than fluid and bone), positive when it lies nearer the dark one.  Quartiles, so
    the bright scalp fat of a whole-head scan, a minority, barely moves it; inverting the intensities negates it."""
    if not mask.any():
        return 0.0
    q1, q2, q3 = np.percentile(normed[mask], [25.0, 50.0, 75.0])
    return float((q3 + q1 - 2.0 * q2) / (q3 - q1)) if q3 > q1 else 0.0


def spatial_correlation(normed: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of in-plane neighbours inside *mask*: each voxel with the next one along either in-plane
    axis (canonical axes 0 and 1; both voxels in the mask), the mean of the two axes.  An MR image is smooth on the
    scale of a voxel (anatomy, the point-spread function), so its neighbours correlate strongly; independent noise
    gives about 0.  0 when the mask has no pair of neighbours or no variation."""
    values = []
    for first, second in ((np.s_[:-1], np.s_[1:]), (np.s_[:, :-1], np.s_[:, 1:])):  # neighbours along axis 0, 1
        both = mask[first] & mask[second]
        if both.sum() < 2:
            continue
        x, y = normed[first][both].astype(np.float64), normed[second][both].astype(np.float64)
        if x.std() > 0 and y.std() > 0:
            values.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(values)) if values else 0.0


def _axial_angle(affine: np.ndarray) -> float:
    """Degrees between the slice normal (third array axis) and the patient's head-foot axis."""
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    return float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))


def _facts(normed: np.ndarray, mask: np.ndarray, affine: np.ndarray, acquisition: np.ndarray) -> dict[str, Any]:
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return {"histogram": _histogram(normed, mask), "quartile_skewness": quartile_skewness(normed, mask),
            "spatial_correlation": spatial_correlation(normed, mask), "mask_fraction": float(mask.mean()),
            "in_plane_mm": float(max(zooms[0], zooms[1])), "thickness_mm": float(zooms[2]),
            "in_plane_size": int(max(normed.shape[0], normed.shape[1])), "axial_angle": _axial_angle(acquisition)}


Volume = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(network input, head mask, canonical affine, acquisition affine): the input as the network sees it (canonical
axes, axis 2 axial) and the affine of the array as acquired (its third axis is the slice direction)."""


def _nearest(hist: np.ndarray, others: Sequence[np.ndarray]) -> float:
    return min(_w1(hist, o) for o in others)


def input_reference(volumes: Sequence[Volume], contrast: str | None = None) -> dict[str, Any]:
    """Compact reference of the training inputs (of *contrast*, e.g. ``"T1"``, named in the reasons when given).

    Besides the mean histogram it keeps every training volume's histogram (``histograms``, BINS numbers each) and
    ``histogram_nn_max``: how far the most isolated training volume lies from its nearest other training volume.
    The training inputs are a mixture (whole-head scans, whose brightest tissue is scalp fat, and skull-stripped
    ones, whose brightest tissue is white matter), so a distance to their mean says little; a distance to the
    nearest training volume says whether a scan like this one was seen.  ``quartile_skewness`` is the range of the
    training volumes' :func:`quartile_skewness` (the tissue contrast order), ``spatial_correlation`` that of their
    :func:`spatial_correlation`."""
    if not volumes:
        raise ValueError("input_reference: no training volumes")
    facts = [_facts(*v) for v in volumes]
    hists = [f["histogram"] for f in facts]
    mean = np.mean(hists, axis=0)
    spread = max(_w1(h, mean) for h in hists)
    nn_max = max((_nearest(h, hists[:i] + hists[i + 1:]) for i, h in enumerate(hists)), default=0.0) \
        if len(hists) > 1 else 0.0
    def rng(key: str) -> list[float]:
        return [float(min(f[key] for f in facts)), float(max(f[key] for f in facts))]
    return {"histogram": [float(x) for x in mean], "histogram_range": list(HIST_RANGE),
            "histogram_units": HISTOGRAM_UNITS,
            "histogram_w1_max": float(spread), "histograms": [[round(float(x), 6) for x in h] for h in hists],
            "histogram_nn_max": float(nn_max), "quartile_skewness": rng("quartile_skewness"),
            "spatial_correlation": [round(x, 6) for x in rng("spatial_correlation")], "mask_fraction": rng("mask_fraction"),
            "in_plane_mm": rng("in_plane_mm"), "thickness_mm": rng("thickness_mm"),
            "in_plane_size": rng("in_plane_size"), "axial_angle_max": float(max(f["axial_angle"] for f in facts)),
            "n_volumes": len(facts), **({"contrast": str(contrast)} if contrast else {})}


def _range_check(name: str, value: float, bounds: Sequence[float], slack: float, what: str, unit: str) -> Check:
    lo, hi = float(bounds[0]), float(bounds[1])
    lo_s, hi_s = lo / slack, hi * slack
    ok = lo_s <= value <= hi_s
    return Check(name, value, f"[{lo_s:.3g}, {hi_s:.3g}]{unit}", Verdict.PASS if ok else Verdict.WARN,
                 "" if ok else f"{what} {value:.3g}{unit} outside the training range {lo:.3g}-{hi:.3g}{unit}")


HISTOGRAM_FLOOR = 0.03
"""Smallest histogram distance ever judged unusual (percentile units): a reference of near-identical training volumes
would otherwise flag every scan."""
HISTOGRAM_SLACK = 0.5
"""The histogram check warns beyond the largest nearest-neighbour distance among the training volumes widened by this
fraction of the spread of those distances (largest minus smallest), the rule of the tissue-order check
(``TISSUE_ORDER_SLACK``): the largest of six such distances is a poor estimate of how far a new scan of the same kind
may lie (a new one exceeds it with probability about 1/7)."""
HISTOGRAM_FAIL_FACTOR = 3.0
"""The histogram check fails beyond this many times the largest nearest-neighbour distance among the training volumes."""


def histogram_thresholds(reference: Mapping[str, Any]) -> tuple[float, float]:
    """(warn, fail) of the input-histogram check for a reference with per-volume ``histograms``: each training
    volume's distance to its nearest other training volume (leave one out) spans [low, high]; warn above
    ``high + HISTOGRAM_SLACK * (high - low)``, fail above ``HISTOGRAM_FAIL_FACTOR * high`` (neither below
    HISTOGRAM_FLOOR or its multiple)."""
    hists = [np.asarray(h, dtype=np.float64) for h in reference["histograms"]]
    nn = [_nearest(h, hists[:i] + hists[i + 1:]) for i, h in enumerate(hists)] if len(hists) > 1 else [0.0]
    high, low = max(nn), min(nn)
    return (max(high + HISTOGRAM_SLACK * (high - low), HISTOGRAM_FLOOR),
            HISTOGRAM_FAIL_FACTOR * max(high, HISTOGRAM_FLOOR))


def _histogram_check(hist: np.ndarray, reference: Mapping[str, Any]) -> Check:
    """Distance of the input's histogram to the nearest training volume's (``histograms`` in the reference), judged
    by :func:`histogram_thresholds`.  An older reference without per-volume histograms is compared by its mean
    histogram and mean-distance spread."""
    if reference.get("histograms"):
        others = [np.asarray(h, dtype=np.float64) for h in reference["histograms"]]
        value, what = _nearest(hist, others), "nearest training scan"
        warn, fail = histogram_thresholds(reference)
    else:
        value, what = _w1(hist, np.asarray(reference["histogram"], dtype=np.float64)), "training mean"
        base = max(float(reference["histogram_w1_max"]), 0.05)
        warn, fail = 1.5 * base, 3.0 * base
    verdict = Verdict.FAIL if value > fail else Verdict.WARN if value > warn else Verdict.PASS
    return Check("intensity_histogram", value, f"warn > {warn:.3g}, fail > {fail:.3g}", verdict,
                 "" if verdict is Verdict.PASS else
                 f"input intensities unlike the training data (histogram distance {value:.3g} to the {what}, "
                 f"warn above {warn:.3g})")


TISSUE_ORDER_SLACK = 0.5
"""The tissue-order check warns beyond the training range widened by this fraction of its width on each side: a
handful of training volumes spans the range poorly (a new one of the same kind lies outside the range of six with
probability 2/7)."""
TISSUE_ORDER_FLOOR = 0.1
"""Smallest widening (quartile-skewness units): a reference of near-identical training volumes would otherwise
flag every scan."""


def _tissue_order_check(value: float, reference: Mapping[str, Any]) -> Check:
    """The input's :func:`quartile_skewness` against the training range (``quartile_skewness`` in the reference)."""
    lo, hi = (float(x) for x in reference["quartile_skewness"])
    slack = max(TISSUE_ORDER_SLACK * (hi - lo), TISSUE_ORDER_FLOOR)
    lo_s, hi_s = lo - slack, hi + slack
    threshold = f"warn outside [{lo_s:+.3g}, {hi_s:+.3g}]"
    if lo_s <= value <= hi_s:
        return Check("tissue_order", value, threshold, Verdict.PASS)
    contrast = str(reference.get("contrast") or "scan")
    bulk = "dark and a minority bright" if value > hi_s else "bright and a minority dark"
    return Check("tissue_order", value, threshold, Verdict.WARN,
                 f"tissue contrast order unlike any training {contrast}: the bulk of the head is {bulk} "
                 f"(quartile skewness {value:+.2f}, training {lo:+.2f} to {hi:+.2f}): intensities inverted, "
                 f"or another contrast?")


STRUCTURE_WARN_FACTOR = 0.5
"""The spatial-structure check warns below this fraction of the smallest :func:`spatial_correlation` among the
training volumes (0.71-0.95 on the real T1s and T2s of ``../shared/data/mri``; independent noise: about 0)..."""
STRUCTURE_FAIL_FACTOR = 0.25
"""... and fails below this fraction: an input with next to no spatial structure is not an image of a head."""


def _structure_check(value: float, reference: Mapping[str, Any]) -> Check:
    """The input's :func:`spatial_correlation` against the smallest training one (``spatial_correlation``)."""
    low = float(reference["spatial_correlation"][0])
    warn, fail = STRUCTURE_WARN_FACTOR * low, STRUCTURE_FAIL_FACTOR * low
    verdict = Verdict.FAIL if value < fail else Verdict.WARN if value < warn else Verdict.PASS
    return Check("spatial_structure", value, f"warn < {warn:.3g}, fail < {fail:.3g}", verdict,
                 "" if verdict is Verdict.PASS else
                 f"no image structure: neighbouring voxels correlate at r = {value:.2f}, every training scan at "
                 f"least {low:.2f} (noise, or a corrupt image?)")


def check_input(volume: Volume, reference: Mapping[str, Any]) -> list[Check]:
    """Compare one input with the training reference (a reference from before a check existed, without
    ``quartile_skewness`` or ``spatial_correlation``, skips that check; one without ``histogram_units`` is compared
    by histograms of the input as the network sees it, the units it was made in)."""
    f = _facts(*volume)
    hist = f["histogram"] if reference.get("histogram_units") == HISTOGRAM_UNITS else _histogram(*volume[:2], False)
    checks = [_histogram_check(hist, reference)]
    if "quartile_skewness" in reference:
        checks.append(_tissue_order_check(f["quartile_skewness"], reference))
    if "spatial_correlation" in reference:
        checks.append(_structure_check(f["spatial_correlation"], reference))
    checks.append(_range_check("head_fraction", f["mask_fraction"], reference["mask_fraction"], 1.5,
                               "head mask fraction", ""))
    checks.append(_range_check("in_plane_voxel", f["in_plane_mm"], reference["in_plane_mm"], 1.5, "in-plane voxel",
                               " mm"))
    checks.append(_range_check("slice_thickness", f["thickness_mm"], reference["thickness_mm"], 1.5,
                               "slice spacing", " mm"))
    checks.append(_range_check("in_plane_size", f["in_plane_size"], reference["in_plane_size"], 2.0,
                               "in-plane size", " px"))
    limit = max(30.0, float(reference["axial_angle_max"]) + 15.0)
    angle_ok = f["axial_angle"] <= limit
    checks.append(Check("orientation", f["axial_angle"], f"<= {limit:.0f} deg from axial",
                        Verdict.PASS if angle_ok else Verdict.WARN,
                        "" if angle_ok else f"slices {f['axial_angle']:.0f} deg from axial (trained on axial slices)"))
    return checks


def flip_disagreement(pred: np.ndarray, pred_flipped_back: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference of the two predictions inside *mask*, relative to the mean prediction there."""
    if not mask.any():
        return 0.0
    level = float(np.mean(pred[mask])) or 1.0
    return float(np.mean(np.abs(pred[mask] - pred_flipped_back[mask])) / level)


FLIP_WARN_FACTOR = 2.0
"""The flip check warns beyond this multiple of the largest flip disagreement the model shows on its own training
volumes.  Those figures are in-sample (the model was fitted to those scans), so a new scan of a training protocol
is expected somewhat above them; the factor is a round number fixed before it was tested on held-out subjects
(MODEL_CARD.md, "Quality control"), not fitted to them."""
FLIP_FAIL_FACTOR = 5.0
"""... and fails beyond this multiple (2.5 times the warning level, the ratio of the fixed thresholds before)."""
FLIP_WARN_FIXED, FLIP_FAIL_FIXED = 0.10, 0.25
"""Thresholds for a checkpoint whose reference has no training flip figure (trained before it was stored)."""


def flip_thresholds(reference: Mapping[str, Any] | None, warn: float | None = None,
                    fail: float | None = None) -> tuple[float, float, str]:
    """(warn, fail, basis) of the flip check for a model with this training *reference*: FLIP_WARN_FACTOR and
    FLIP_FAIL_FACTOR times its ``flip_disagreement_max``, or the fixed FLIP_WARN_FIXED / FLIP_FAIL_FIXED without one.
    *warn* / *fail*, when given (``[qc] flip_warn`` / ``flip_fail``), replace the model's; fail is never below warn.
    *basis* says where the figures come from, for the threshold text and the reason."""
    top = float((reference or {}).get("flip_disagreement_max") or 0.0)
    if top > 0:
        w, f = FLIP_WARN_FACTOR * top, FLIP_FAIL_FACTOR * top
        basis = f"{FLIP_WARN_FACTOR:g} and {FLIP_FAIL_FACTOR:g} x the model's largest on its training scans, {top:.3g}"
    else:
        w, f, basis = FLIP_WARN_FIXED, FLIP_FAIL_FIXED, "fixed: the checkpoint has no training figure"
    if warn is not None and fail is not None:
        basis = "[qc] flip_warn / flip_fail"
    elif warn is not None:
        basis = f"[qc] flip_warn; fail: {basis}"
    elif fail is not None:
        basis = f"[qc] flip_fail; warn: {basis}"
    w = w if warn is None else float(warn)
    f = f if fail is None else float(fail)
    return w, max(f, w), basis

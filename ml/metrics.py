"""Image-similarity metrics with one documented normalization.

Normalization (:func:`unit_range`): each volume is divided by its 99.5th
percentile inside the mask and clipped to [0, 1].  PSNR uses peak 1.  SSIM is
``skimage.metrics.structural_similarity`` on each axial slice (2-D; slices
are often thick, so no window across slices) with a Gaussian window (sigma
1.5, ``use_sample_covariance=False``, ``data_range=1``), the per-voxel maps averaged.
Masked figures average the per-voxel error (MSE/MAE) or the SSIM map over the
mask; masked PSNR is ``10 log10(1 / masked MSE)``.

The DICOM paper instead reports whole-image MSE / MAE / PSNR after min-max
scaling each volume to [0, 1]; :func:`compare` returns those too as
``paper_mse``, ``paper_mae`` and ``paper_psnr`` so the two can be set side by side.

:func:`quality` is the project's figure of merit (the quality issue's definition,
:data:`QUALITY_TEXT`): its own mask (nonzero in truth and source, eroded once), PSNR
over the mask and SSIM per axial slice on the mask's bounding box.  Every model
choice is judged by it, per subject, cross-validated by subject.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

__all__ = ["NORMALIZATION_TEXT", "QUALITY_TEXT", "compare", "quality", "quality_mask", "reference_blur", "reference_shift",
           "unit_range"]

NORMALIZATION_TEXT = (
    "each volume divided by its 99.5th percentile inside the mask, clipped to [0, 1]; "
    "PSNR peak 1; SSIM per axial slice, Gaussian window sigma 1.5 (skimage, use_sample_covariance=False, data_range=1)"
)


def unit_range(volume: np.ndarray, mask: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """``clip(volume / p(volume[mask]), 0, 1)`` as float64."""
    v = np.asarray(volume, dtype=np.float64)
    inside = v[mask] if mask.any() else v.ravel()
    p = float(np.percentile(inside, percentile)) if inside.size else 0.0
    if p <= 0:
        return np.zeros_like(v)
    return np.clip(v / p, 0.0, 1.0)


def _ssim_map(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-voxel SSIM, computed slice by slice over the last (axial) axis."""
    out = np.empty_like(t)
    for k in range(t.shape[-1]):
        _, out[..., k] = structural_similarity(
            t[..., k], p[..., k], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True
        )
    return out


def _minmax(volume: np.ndarray) -> np.ndarray:
    v = np.asarray(volume, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    return np.zeros_like(v) if hi <= lo else (v - lo) / (hi - lo)


def _psnr(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def compare(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, *, normalized: bool = False) -> dict[str, float]:
    """MSE, MAE, PSNR, SSIM on the whole image and inside *mask* (keys ``*_masked``).

    Unless *normalized*, both volumes are first brought to [0, 1] with :func:`unit_range`.
    """
    if pred.shape != truth.shape or mask.shape != truth.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, truth {truth.shape}, mask {mask.shape}")
    mask = mask.astype(bool)
    if normalized:
        p = np.clip(np.asarray(pred, np.float64), 0, 1)
        t = np.clip(np.asarray(truth, np.float64), 0, 1)
    else:
        p, t = unit_range(pred, mask), unit_range(truth, mask)
    err = p - t
    sq, ab = err**2, np.abs(err)
    ssim_map = _ssim_map(p, t)
    out = {
        "mse": float(sq.mean()),
        "mae": float(ab.mean()),
        "ssim": float(ssim_map.mean()),
    }
    out["psnr"] = _psnr(out["mse"])
    pm, tm = _minmax(pred), _minmax(truth)
    out["paper_mse"] = float(((pm - tm) ** 2).mean())
    out["paper_mae"] = float(np.abs(pm - tm).mean())
    out["paper_psnr"] = _psnr(out["paper_mse"])
    if mask.any():
        out["mse_masked"] = float(sq[mask].mean())
        out["mae_masked"] = float(ab[mask].mean())
        out["ssim_masked"] = float(ssim_map[mask].mean())
        out["psnr_masked"] = _psnr(out["mse_masked"])
    return out


# --------------------------------------------------------------------- the quality metric

QUALITY_TEXT = (
    "quality metric: mask M = (truth != 0) & (source != 0), eroded once in 3-D (6-connected); each volume divided by "
    "its own 99.5th percentile inside M and clipped to [0, 1]; PSNR (peak 1) over the voxels of M; SSIM "
    "(skimage, gaussian_weights, sigma 1.5, use_sample_covariance=False, data_range 1) per axial slice on the "
    "bounding box of M, averaged over the slices that contain mask voxels"
)


def quality_mask(truth: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``M = (truth != 0) & (source != 0)``, eroded once in 3-D with the 6-connected structure."""
    if truth.shape != source.shape:
        raise ValueError(f"shape mismatch: truth {truth.shape}, source {source.shape}")
    m = (np.asarray(truth) != 0) & (np.asarray(source) != 0)
    return ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1), iterations=1)


def quality(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The project's figure of merit: ``{"psnr": dB, "ssim": mean slice SSIM}`` (see :data:`QUALITY_TEXT`).

    *mask* is :func:`quality_mask` of the truth and the source; volumes are (X, Y, Z) with Z axial.
    """
    if pred.shape != truth.shape or mask.shape != truth.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape}, truth {truth.shape}, mask {mask.shape}")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError("quality mask is empty (truth and source share no nonzero voxel)")
    p, t = unit_range(pred, mask), unit_range(truth, mask)
    psnr = _psnr(float(((p - t)[mask] ** 2).mean()))
    xs, ys, zs = (np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0] for axis in range(3))
    box = (slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1))
    scores = []
    for k in zs:
        if not mask[:, :, k].any():
            continue
        pk, tk = p[box + (k,)], t[box + (k,)]
        if min(pk.shape) < 11:  # smaller than the 11x11 SSIM window (sigma 1.5): cannot be scored
            continue
        scores.append(structural_similarity(tk, pk, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False))
    return {"psnr": psnr, "ssim": float(np.mean(scores)) if scores else float("nan")}


def reference_shift(truth: np.ndarray) -> np.ndarray:
    """The truth moved by one voxel in-plane (along axis 0), zero-filled: a "nearly perfect" reference."""
    out = np.zeros_like(truth)
    out[1:] = truth[:-1]
    return out


def reference_blur(truth: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """The truth blurred in-plane by a Gaussian of *sigma* voxels (no blur across slices)."""
    return ndimage.gaussian_filter(np.asarray(truth, dtype=np.float32), sigma=(sigma, sigma, 0.0))

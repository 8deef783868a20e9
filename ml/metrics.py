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
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity

__all__ = ["NORMALIZATION_TEXT", "compare", "unit_range"]

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

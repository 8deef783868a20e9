"""Training losses for the paired U-Net.

``l1``: mean absolute error.  ``l1+ssim``: ``L1 + w * (1 - SSIM)``, SSIM with the
same Gaussian window as the evaluation metric (sigma 1.5, 11 x 11, data range 1,
the usual constants K1 = 0.01, K2 = 0.03), computed on the whole training patch.
L1 keeps intensities right; the SSIM term rewards local contrast and structure,
which pure L1 trades for a smooth image.
"""

from __future__ import annotations

import enum

import torch
from torch.nn import functional as F

__all__ = ["Loss", "parse_loss", "ssim", "training_loss"]


class Loss(str, enum.Enum):
    L1 = "l1"
    L1_SSIM = "l1+ssim"


def parse_loss(value: str | Loss) -> Loss:
    if isinstance(value, Loss):
        return value
    try:
        return Loss(str(value).lower())
    except ValueError:
        raise ValueError(f"--loss: {value!r} is not one of {', '.join(m.value for m in Loss)}") from None


def _gaussian_window(sigma: float, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, *, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """Mean SSIM of two (N, 1, H, W) batches in [0, 1] (valid-window Gaussian filtering)."""
    g = _gaussian_window(sigma, size, x.device, x.dtype)
    gx, gy = g.view(1, 1, 1, size), g.view(1, 1, size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gx), gy)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean()


def training_loss(kind: Loss, pred: torch.Tensor, target: torch.Tensor, ssim_weight: float = 1.0) -> torch.Tensor:
    l1 = F.l1_loss(pred, target)
    if kind is Loss.L1:
        return l1
    return l1 + ssim_weight * (1.0 - ssim(pred.clamp(0, 1), target))

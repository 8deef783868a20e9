"""A label burned into synthetic pixels, so that a synthetic image stays
recognisable where its attributes are not shown (a viewer hiding the series
description, a screenshot, an export to a report)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def burn_in_label(pixels: np.ndarray, text: str = "SYNTHETIC", value: int | None = None) -> np.ndarray:
    """Return a copy of *pixels* (slices, rows, cols; unsigned integers) with *text* in the top-left corner.

    The text is about 1/20 of the image height (at least 7 pixels), drawn at
    *value* (default: the series' 99.5th percentile, i.e. bright in a normal window)
    over a dark box so it stays legible whatever the anatomy behind it.
    """
    if pixels.ndim != 3 or pixels.dtype.kind != "u":
        raise ValueError(f"pixels: expected a 3-D unsigned integer array, got {pixels.dtype} {pixels.shape}")
    _, rows, cols = pixels.shape
    if value is None:
        nonzero = pixels[pixels > 0]
        value = int(np.percentile(nonzero, 99.5)) if nonzero.size else int(np.iinfo(pixels.dtype).max)
    size = max(7, rows // 20)
    font = ImageFont.load_default(size=size)
    mask = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(mask)
    margin = max(1, size // 4)
    box = draw.textbbox((margin, margin), text, font=font)
    pad = max(1, size // 6)
    background = np.zeros((rows, cols), bool)
    background[max(0, box[1] - pad):min(rows, box[3] + pad), max(0, box[0] - pad):min(cols, box[2] + pad)] = True
    draw.text((margin, margin), text, fill=255, font=font)
    ink = np.asarray(mask) > 127
    out = pixels.copy()
    out[:, background] = 0
    out[:, ink] = value
    return out

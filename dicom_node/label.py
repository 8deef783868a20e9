"""A label burned into synthetic pixels, so that a synthetic image stays
recognisable where its attributes are not shown (a viewer hiding the series
description, a screenshot, an export to a report).

The label says ``SYNTHETIC <contrast>``, and ``SYNTHETIC <contrast> - QC WARN``
(or ``QC FAIL``) when the series' quality control did not pass
(:func:`synthetic_label`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["burn_in_label", "label_mask", "synthetic_label"]


def synthetic_label(target: str, qc_verdict: str | None = None) -> str:
    """The label text of a synthetic *target* series, naming a QC verdict other than ``pass``."""
    text = f"SYNTHETIC {target}"
    return text if qc_verdict in (None, "pass") else f"{text} - QC {qc_verdict.upper()}"


def label_mask(rows: int, cols: int, text: str) -> tuple[np.ndarray, np.ndarray]:
    """(ink, box): where the label's letters are and the dark box behind them, as (rows, cols) booleans.

    The text is about 1/20 of the image height (at least 7 pixels) in the top-left corner; a label
    wider than the image is broken into lines at its `` - `` separators.
    """
    size = max(7, rows // 20)
    font = ImageFont.load_default(size=size)
    mask = Image.new("L", (cols, rows), 0)
    draw = ImageDraw.Draw(mask)
    margin = max(1, size // 4)
    if " - " in text and draw.textbbox((margin, margin), text, font=font)[2] > cols - margin:
        text = text.replace(" - ", "\n")
    box = draw.textbbox((margin, margin), text, font=font)
    pad = max(1, size // 6)
    background = np.zeros((rows, cols), bool)
    background[max(0, box[1] - pad):min(rows, box[3] + pad), max(0, box[0] - pad):min(cols, box[2] + pad)] = True
    draw.text((margin, margin), text, fill=255, font=font)
    return np.asarray(mask) > 127, background


def burn_in_label(pixels: np.ndarray, text: str = "SYNTHETIC", value: int | None = None) -> np.ndarray:
    """Return a copy of *pixels* (slices, rows, cols; unsigned integers) with *text* in the top-left corner
    (:func:`label_mask`), drawn at *value* (default: the series' 99.5th percentile, i.e. bright in a
    normal window) over a dark box so it stays legible whatever the anatomy behind it.
    """
    if pixels.ndim != 3 or pixels.dtype.kind != "u":
        raise ValueError(f"pixels: expected a 3-D unsigned integer array, got {pixels.dtype} {pixels.shape}")
    _, rows, cols = pixels.shape
    if value is None:
        nonzero = pixels[pixels > 0]
        value = int(np.percentile(nonzero, 99.5)) if nonzero.size else int(np.iinfo(pixels.dtype).max)
    ink, background = label_mask(rows, cols, text)
    out = pixels.copy()
    out[:, background] = 0
    out[:, ink] = value
    return out

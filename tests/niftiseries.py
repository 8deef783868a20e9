"""Turn a NIfTI-ordered volume (i, j, k with a voxel -> RAS+ affine) into a classic MR Image Storage series, so that
real volumes from ../shared/data reach the node's code the way a scanner's series would (16-bit pixels with a
rescale, one image per k)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicomgen import SeriesSpec, make_series

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def series_from_volume(data: np.ndarray, affine_ras: np.ndarray, weighting: str = "T1",
                       **tags: Any) -> list[Dataset]:
    """One dataset per slice k of *data* (i = column, j = row), geometry from *affine_ras*; *tags* are set on every
    dataset (a value of None deletes the attribute)."""
    vol = np.asarray(data, dtype=np.float64)
    nx, ny, nz = vol.shape
    lps = RAS_TO_LPS @ np.asarray(affine_ras, dtype=np.float64)
    dc, dr = float(np.linalg.norm(lps[:3, 0])), float(np.linalg.norm(lps[:3, 1]))
    row_dir, col_dir, step = lps[:3, 0] / dc, lps[:3, 1] / dr, lps[:3, 2]
    lo, hi = float(vol.min()), float(vol.max())
    slope = (hi - lo) / 65535.0 or 1.0
    stored = np.rint((vol - lo) / slope).astype(np.uint16)
    datasets = make_series(SeriesSpec(weighting=weighting, slices=nz, rows=ny, cols=nx,  # type: ignore[arg-type]
                                      slice_spacing=float(np.linalg.norm(step))))
    for k, ds in enumerate(datasets):
        pos = lps[:3, 3] + step * k
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_dir, *col_dir)]
        ds.SliceLocation = round(float(pos @ np.cross(row_dir, col_dir)), 4)
        ds.PixelSpacing = [round(dr, 6), round(dc, 6)]
        ds.BitsStored, ds.HighBit = 16, 15
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}"[:16], f"{lo:.10g}"[:16]
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # (rows, cols) = (j, i)
        for keyword, value in tags.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return datasets

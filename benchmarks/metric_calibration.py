#!/usr/bin/env python3
"""How hard is the quality target?  Score degraded copies of the truth with the evaluation's own metric.

For each held-out subject the true target-contrast volume is compared, with
``ml.metrics.compare`` (the same normalization and mask as ``dicomnode evaluate``),
with copies of itself that are slightly wrong in known ways:

* shifted by one voxel in-plane (a registration error of one voxel),
* blurred with a Gaussian of sigma 1 voxel in-plane, and in 3-D,
* an intensity-only mapping: the mean target intensity for each source intensity,
  fitted on the training subjects (a lookup table, no spatial context).

A synthesis model has to beat these to reach a given PSNR / SSIM; the figures put the
target of the issue (masked PSNR >= 26 dB, SSIM >= 0.88) into perspective.

Usage: python benchmarks/metric_calibration.py [--data ../shared/data/mri] [--direction t1-to-t2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ml.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from ml.data import DataError, load_subject  # noqa: E402
from ml.inference import default_checkpoint  # noqa: E402
from ml.metrics import compare  # noqa: E402

BINS = np.linspace(0.0, 1.5, 301)


def fit_lookup(subjects: list, src: str, tgt: str) -> np.ndarray:
    """Mean normalized target value per normalized source-intensity bin, inside the masks."""
    sums = np.zeros(len(BINS) - 1)
    counts = np.zeros(len(BINS) - 1)
    for s in subjects:
        x = np.clip(s.image(src)[s.mask], BINS[0], BINS[-1] - 1e-6)
        idx = np.digitize(x, BINS) - 1
        sums += np.bincount(idx, weights=s.image(tgt)[s.mask], minlength=len(sums))
        counts += np.bincount(idx, minlength=len(counts))
    lut = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    # empty bins take the value of the nearest filled one
    filled = np.flatnonzero(counts)
    return lut[filled[np.abs(np.arange(len(lut))[:, None] - filled[None, :]).argmin(axis=1)]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mri")
    ap.add_argument("--direction", choices=["t1-to-t2", "t2-to-t1"], default="t1-to-t2")
    args = ap.parse_args()
    src, tgt = ("T1", "T2") if args.direction == "t1-to-t2" else ("T2", "T1")
    try:
        # the split of the shipped model, so the figures sit beside its model card
        training = load_checkpoint(default_checkpoint(args.direction))[1]["training"]
        lut = fit_lookup([load_subject(args.data / n) for n in training["train_subjects"]], src, tgt)
        held_out = [load_subject(args.data / n) for n in training["val_subjects"]]
    except (CheckpointError, DataError, KeyError, OSError) as exc:
        print(f"metric_calibration: {exc}", file=sys.stderr)
        return 2
    print(f"# {args.direction}; masked PSNR (dB) / masked SSIM / whole PSNR (dB), normalization of ml.metrics")
    print("| subject | reference | PSNR masked | SSIM masked | PSNR whole |")
    print("|---|---|---|---|---|")
    for s in held_out:
        name = s.name
        truth = s.image(tgt)
        idx = np.digitize(np.clip(s.image(src), BINS[0], BINS[-1] - 1e-6), BINS) - 1
        cases = {
            "truth shifted 1 voxel in-plane": np.roll(truth, 1, axis=0),
            "truth blurred, sigma 1 voxel in-plane": ndimage.gaussian_filter(truth, (1.0, 1.0, 0.0)),
            "truth blurred, sigma 1 voxel 3-D": ndimage.gaussian_filter(truth, 1.0),
            "intensity lookup (fitted on training subjects)": np.where(s.mask, lut[idx], 0.0),
        }
        for label, vol in cases.items():
            m = compare(vol, truth, s.mask)
            print(f"| {name} | {label} | {m['psnr_masked']:.2f} | {m['ssim_masked']:.3f} | {m['psnr']:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

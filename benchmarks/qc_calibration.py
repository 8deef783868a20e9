"""Does the QC uncertainty track the real error?  Spearman rank correlation on real subjects and
degraded copies of their inputs (noise, in-plane blur, a bias field).

Usage: ``python benchmarks/qc_calibration.py MODEL --data DIR [--direction D] [--every 4] [--kinds ...]
[--subjects A B ...] [--json OUT]``

MODEL is ``default`` (the shipped model), a checkpoint, or a cross-validation folder (``dicomnode train --folds``:
each subject is then synthesized by the fold model that never saw it).  Only subjects the model did not train on
are used.  The real error is the quality metric against the true target contrast (``1 - SSIM`` and ``-PSNR``, so
that larger is worse) on the slices :func:`ml.inference.assess_detail` predicts (every *every*-th axial slice:
the QC measures its uncertainty on exactly those predictions); the uncertainties are its flip disagreement and
input-histogram distance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats

from ml.data import _find_contrast, head_mask, load_volume, to_canonical
from ml.evaluate import evaluation_mask
from ml.inference import assess_detail, load_model
from ml.metrics import quality


def _degrade(kind: str, vol: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "original":
        return vol
    level = float(np.percentile(vol[mask], 50)) if mask.any() else 1.0
    if kind == "noise":
        return np.abs(vol + rng.normal(0, 0.08 * level, vol.shape)).astype(np.float32)
    if kind == "blur":
        return np.asarray(ndimage.gaussian_filter(vol, (1.5, 1.5, 0)), dtype=np.float32)
    if kind == "bias":
        x = np.linspace(-1, 1, vol.shape[0])[:, None, None]
        y = np.linspace(-1, 1, vol.shape[1])[None, :, None]
        return (vol * np.exp(0.35 * x + 0.25 * y * y)).astype(np.float32)
    raise ValueError(kind)


def _model_for(source: Path, subject: str, direction: str):  # type: ignore[no-untyped-def]
    """The model that did not train on *subject*, or None."""
    if str(source) != "default" and source.is_dir() and any(source.glob("fold-*")):
        for fold in sorted(source.glob("fold-*")):
            meta = json.loads((fold / "model.json").read_text())
            if subject in meta["training"]["val_subjects"]:
                return load_model(fold, direction, device="cpu", engine="auto")
        return None
    model = load_model("default" if str(source) == "default" else source, direction, device="cpu", engine="auto")
    return None if subject in model.metadata["training"]["train_subjects"] else model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--direction", default="t1-to-t2")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--kinds", nargs="*", default=["original", "noise", "blur", "bias"])
    ap.add_argument("--subjects", nargs="*", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    names = args.subjects or sorted(p.name for p in args.data.iterdir() if p.is_dir())
    for subject in names:
        if subject == "mni152_template":  # a template, not a subject
            continue
        model = _model_for(args.model, subject, args.direction)
        if model is None:
            continue
        vs = load_volume(_find_contrast(args.data / subject, model.source))  # type: ignore[arg-type]
        vt = load_volume(_find_contrast(args.data / subject, model.target))  # type: ignore[arg-type]
        source, aff = to_canonical(vs.data, vs.affine)
        truth, _ = to_canonical(vt.data, vt.affine)
        mask = head_mask(source) | head_mask(truth)
        qm = evaluation_mask(truth, source, mask)
        for kind in args.kinds:
            degraded = _degrade(kind, source, mask, rng)
            detail = assess_detail(model, degraded, aff, every=args.every)
            ks = detail.slices
            q = quality(detail.prediction, truth[:, :, ks], qm[:, :, ks])
            checks = detail.result.to_dict()["checks"]
            row = {"subject": subject, "input": kind, "psnr": q["psnr"], "ssim": q["ssim"], "slices": len(ks),
                   "verdict": detail.result.verdict.value, **{name: c["value"] for name, c in checks.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out: dict[str, Any] = {"model": str(args.model), "direction": args.direction, "every": args.every,
                           "rows": rows, "spearman": {}}
    for measure in ("flip_disagreement", "intensity_histogram"):
        pairs = [(r[measure], 1 - r["ssim"], -r["psnr"]) for r in rows if measure in r]
        if len(pairs) >= 3:
            u, e_ssim, e_psnr = map(np.asarray, zip(*pairs))
            out["spearman"][measure] = {"vs_1_minus_ssim": float(stats.spearmanr(u, e_ssim).statistic),
                                        "vs_minus_psnr": float(stats.spearmanr(u, e_psnr).statistic), "n": len(pairs)}
    print(json.dumps(out["spearman"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

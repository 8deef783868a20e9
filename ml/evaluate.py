"""Evaluate a checkpoint on paired subjects against two naive baselines.

For every subject: the model's synthetic volume, the *inverted source*
baseline (``1 - source`` inside the head mask, after the normalization below)
and the *histogram-matched source* baseline
(``skimage.exposure.match_histograms(source, truth)`` on the whole volume) are
compared with the truth by :func:`ml.metrics.compare` (normalization: each
volume divided by its 99.5th percentile inside the mask, clipped to [0, 1];
PSNR peak 1; SSIM Gaussian sigma 1.5), whole image and inside the mask (the
union of the source and truth head masks: the brain for skull-stripped data,
the head for the others), plus the DICOM paper's min-max whole-image figures.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from skimage.exposure import match_histograms

from .data import DataError, _find_contrast, discover_paired, fragmentary_slices, head_mask, load_volume, to_canonical
from .inference import LoadedModel, assess, synthesize
from .metrics import (NORMALIZATION_TEXT, QUALITY_TEXT, compare, quality, quality_mask, reference_blur, reference_shift,
                      unit_range)

__all__ = ["METHODS", "REFERENCES", "evaluate", "evaluate_folds", "save_panel"]

log = logging.getLogger(__name__)

METHODS = ("model", "inverted_source", "histogram_matched_source")
REFERENCES = ("reference_shift1", "reference_blur1")
""""Nearly perfect" rows, quality metric only: the truth moved by one voxel in-plane, and the
truth blurred in-plane by a Gaussian of sigma 1 voxel."""


def save_panel(path: Path, source: np.ndarray, synthetic: np.ndarray, truth: np.ndarray, mask: np.ndarray,
               k: int | None = None) -> None:
    """PNG of axial slice *k* (default: the one with the most head): source | synthetic | truth | |synthetic - truth|."""
    import imageio.v3 as iio

    if k is None:
        k = int(np.argmax(mask.reshape(-1, mask.shape[2]).sum(axis=0)))
    panels = [unit_range(v, mask)[:, :, k] for v in (source, synthetic, truth)]
    panels.append(np.clip(np.abs(panels[1] - panels[2]), 0, 1))
    # canonical axes are (towards Left, towards Posterior): transpose to radiological display
    row = np.concatenate([p.T for p in panels], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (row * 255 + 0.5).astype(np.uint8))


def _mean(per: dict[str, dict[str, Any]], names: Sequence[str], stat: Callable[..., Any] = np.mean) -> dict[str, dict[str, float]]:
    if not names:
        return {}
    out: dict[str, dict[str, float]] = {}
    for method in (*METHODS, *REFERENCES):
        if method not in per[names[0]]:
            continue
        keys = per[names[0]][method].keys()
        out[method] = {k: float(stat([per[n][method][k] for n in names])) for k in keys}
    return out


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def evaluation_mask(truth: np.ndarray, source: np.ndarray, head: np.ndarray) -> np.ndarray:
    """The quality metric's mask, less the :func:`~ml.data.fragmentary_slices` of a failed brain extraction."""
    m = quality_mask(truth, source)
    frag = fragmentary_slices(head)
    if frag:
        m[:, :, frag] = False
    return m


def evaluate(model: LoadedModel, data: str | Path, *, subjects: Sequence[str] | None = None,
             png_dir: Path | None = None, batch_size: int = 16,
             progress: Callable[[str], None] | None = None, qc: bool = True) -> dict[str, Any]:
    """Metrics per subject and means (all subjects, and held-out = not in the model's training set), with
    the QC verdict of each synthesis (:func:`ml.inference.assess`) beside its real error."""
    folders = discover_paired(data)
    if subjects:
        missing = sorted(set(subjects) - {f.name for f in folders})
        if missing:
            raise DataError(f"--subjects: {', '.join(missing)} not found in {data}")
        folders = [f for f in folders if f.name in set(subjects)]
    src_c, tgt_c = model.source, model.target
    trained_on = set(((model.metadata.get("training") or {}).get("train_subjects")) or [])
    per: dict[str, dict[str, dict[str, float]]] = {}
    for folder in folders:
        if progress:
            progress(folder.name)
        vs, vt = load_volume(_find_contrast(folder, src_c)), load_volume(_find_contrast(folder, tgt_c))  # type: ignore[arg-type]
        if vs.data.shape != vt.data.shape:
            raise DataError(f"{folder}: {src_c} and {tgt_c} have different shapes")
        source, aff = to_canonical(vs.data, vs.affine)
        truth, _ = to_canonical(vt.data, vt.affine)
        mask = head_mask(source) | head_mask(truth)
        synthetic = synthesize(model, source, aff, batch_size=batch_size).astype(np.float32)
        inverted = np.where(mask, 1.0 - unit_range(source, mask), 0.0)
        matched = match_histograms(source, truth)
        per[folder.name] = {
            "model": compare(synthetic, truth, mask),
            "inverted_source": compare(inverted, truth, mask),
            "histogram_matched_source": compare(matched, truth, mask),
        }
        qm = evaluation_mask(truth, source, mask)
        for method, vol in (("model", synthetic), ("inverted_source", inverted), ("histogram_matched_source", matched)):
            q = quality(vol, truth, qm)
            per[folder.name][method].update({"q_psnr": q["psnr"], "q_ssim": q["ssim"]})
        for method, vol in (("reference_shift1", reference_shift(truth)), ("reference_blur1", reference_blur(truth))):
            q = quality(vol, truth, qm)
            per[folder.name][method] = {"q_psnr": q["psnr"], "q_ssim": q["ssim"]}
        per[folder.name]["held_out"] = folder.name not in trained_on  # type: ignore[assignment]
        if qc:
            per[folder.name]["qc"] = assess(model, source, aff, batch_size=batch_size).to_dict()
        if png_dir is not None:
            save_panel(Path(png_dir) / f"{folder.name}.png", source, synthetic, truth, mask)
    names = list(per)
    held = [n for n in names if per[n]["held_out"]]
    return {
        "checkpoint": model.name,
        "identity": model.identity,
        "direction": model.direction,
        "data": str(data),
        "normalization": NORMALIZATION_TEXT,
        "quality_metric": QUALITY_TEXT + "; slices of a failed brain extraction (ml.data.fragmentary_slices) left out",
        "mask": "union of the source and truth head masks (Otsu + hole filling); brain for skull-stripped data",
        "baselines": {
            "inverted_source": "1 - normalized source inside the mask, 0 outside",
            "histogram_matched_source": "skimage.exposure.match_histograms(source, truth), whole volume",
        },
        "paper_metrics": "paper_mse / paper_mae / paper_psnr: whole image, each volume min-max scaled to [0, 1]",
        "subjects": per,
        "mean": _mean(per, names),
        "mean_held_out": _mean(per, held),
        "sd_held_out": _mean(per, held, _sd),
        "held_out_subjects": held,
    }


def fold_checkpoints(folder: Path, folds: int | None = None) -> list[Path]:
    """``FOLDER/fold-1 .. fold-K`` (all that exist when *folds* is None or 0)."""
    found = sorted((p for p in Path(folder).glob("fold-*") if (p / "model.json").is_file()),
                   key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else 0)
    if not found:
        raise DataError(f"--folds: {folder} holds no fold-<i>/model.json (train with dicomnode train --folds)")
    if folds:
        want = [Path(folder) / f"fold-{i}" for i in range(1, folds + 1)]
        missing = [p.name for p in want if p not in found]
        if missing:
            raise DataError(f"--folds: {folder} has no {', '.join(missing)}")
        found = want
    return found


def evaluate_folds(models: Sequence[tuple[str, LoadedModel]], data: str | Path, *, png_dir: Path | None = None,
                   batch_size: int = 16, progress: Callable[[str], None] | None = None, qc: bool = True) -> dict[str, Any]:
    """Cross-validated figures: each fold's model on its own held-out subjects (its ``val_subjects``);
    per subject, and mean and sd over all held-out subjects."""
    per: dict[str, dict[str, Any]] = {}
    folds: dict[str, list[str]] = {}
    for fold, model in models:
        held = list(((model.metadata.get("training") or {}).get("val_subjects")) or [])
        if not held:
            raise DataError(f"{fold}: the checkpoint records no held-out subjects")
        overlap = sorted(set(held) & set(per))
        if overlap:
            raise DataError(f"{fold}: {overlap[0]} is held out by two folds")
        result = evaluate(model, data, subjects=held, png_dir=png_dir, batch_size=batch_size, progress=progress, qc=qc)
        for name, row in result["subjects"].items():
            row["fold"] = fold  # type: ignore[assignment]
            per[name] = row
        folds[fold] = held
    names = list(per)
    first = models[0][1]
    return {
        "checkpoint": f"{first.name.rsplit('-fold-', 1)[0]} ({len(models)} folds)",
        "identity": {fold: m.identity for fold, m in models},
        "direction": first.direction,
        "data": str(data),
        "normalization": NORMALIZATION_TEXT,
        "quality_metric": QUALITY_TEXT + "; slices of a failed brain extraction (ml.data.fragmentary_slices) left out",
        "mask": "union of the source and truth head masks (Otsu + hole filling); brain for skull-stripped data",
        "paper_metrics": "paper_mse / paper_mae / paper_psnr: whole image, each volume min-max scaled to [0, 1]",
        "folds": folds,
        "subjects": per,
        "mean": _mean(per, names),
        "mean_held_out": _mean(per, names),
        "sd_held_out": _mean(per, names, _sd),
        "held_out_subjects": names,
    }


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

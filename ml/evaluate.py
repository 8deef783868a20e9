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

from .data import DataError, _find_contrast, discover_paired, head_mask, load_volume, to_canonical
from .inference import LoadedModel, synthesize
from .metrics import NORMALIZATION_TEXT, compare, unit_range

__all__ = ["METHODS", "evaluate", "save_panel"]

log = logging.getLogger(__name__)

METHODS = ("model", "inverted_source", "histogram_matched_source")


def save_panel(path: Path, source: np.ndarray, synthetic: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> None:
    """PNG of the axial slice with the most head: source | synthetic | truth | |synthetic - truth|."""
    import imageio.v3 as iio

    k = int(np.argmax(mask.reshape(-1, mask.shape[2]).sum(axis=0)))
    panels = [unit_range(v, mask)[:, :, k] for v in (source, synthetic, truth)]
    panels.append(np.clip(np.abs(panels[1] - panels[2]), 0, 1))
    # canonical axes are (towards Left, towards Posterior): transpose to radiological display
    row = np.concatenate([p.T for p in panels], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (row * 255 + 0.5).astype(np.uint8))


def _mean(per: dict[str, dict[str, dict[str, float]]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    if not names:
        return {}
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        keys = per[names[0]][method].keys()
        out[method] = {k: float(np.mean([per[n][method][k] for n in names])) for k in keys}
    return out


def evaluate(model: LoadedModel, data: str | Path, *, subjects: Sequence[str] | None = None,
             png_dir: Path | None = None, batch_size: int = 16,
             progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Metrics per subject and means (all subjects, and held-out = not in the model's training set)."""
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
        per[folder.name]["held_out"] = folder.name not in trained_on  # type: ignore[assignment]
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
        "mask": "union of the source and truth head masks (Otsu + hole filling); brain for skull-stripped data",
        "baselines": {
            "inverted_source": "1 - normalized source inside the mask, 0 outside",
            "histogram_matched_source": "skimage.exposure.match_histograms(source, truth), whole volume",
        },
        "paper_metrics": "paper_mse / paper_mae / paper_psnr: whole image, each volume min-max scaled to [0, 1]",
        "subjects": per,
        "mean": _mean(per, names),
        "mean_held_out": _mean(per, held),
        "held_out_subjects": held,
    }


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")

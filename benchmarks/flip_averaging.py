"""Flip test-time averaging, measured (MODEL_CARD.md, "Flip test-time averaging: measured, not adopted").

Usage: ``python benchmarks/flip_averaging.py t2-to-t1|t1-to-t2 OUT.json``

Each recipe-B fold model kept in ``ml/weights/cv`` synthesizes its own held-out subjects of ``../shared/data/mri``
twice: as the node does (``ml.inference.synthesize``: prediction, zero beyond the dilated head mask, scaled to the
output range), and with the prediction replaced by the mean of it and the mirrored prediction of the left-right
mirrored input.  Both are scored with the quality metric (``ml.metrics.quality`` on ``ml.evaluate.evaluation_mask``).
OUT.json keeps finished subjects, so an interrupted run continues.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ml.data import _find_contrast, discover_paired, head_mask, input_volume, load_volume, to_canonical
from ml.evaluate import evaluation_mask
from ml.inference import LoadedModel, load_model, predict_normalized
from ml.metrics import quality

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mri"
CV = Path(__file__).resolve().parents[1] / "ml" / "weights" / "cv"


def score_subject(model: LoadedModel, folder: Path) -> dict[str, Any]:
    vs, vt = load_volume(_find_contrast(folder, model.source)), load_volume(_find_contrast(folder, model.target))
    source, _ = to_canonical(vs.data, vs.affine)
    truth, _ = to_canonical(vt.data, vt.affine)
    qm = evaluation_mask(truth, source, head_mask(source) | head_mask(truth))  # as ml.evaluate scores
    canon = source.astype(np.float32)
    mask = head_mask(canon)  # as ml.inference.synthesize masks
    normed = input_volume(canon, mask, model.input_norm)
    plain = predict_normalized(model.net, normed, model.options, device=model.device)
    mirrored = predict_normalized(model.net, np.ascontiguousarray(normed[::-1]), model.options, device=model.device)[::-1]
    keep = ndimage.binary_dilation(mask, iterations=2)
    row: dict[str, Any] = {}
    for label, pred in (("plain", plain), ("tta", (plain + mirrored) / 2)):
        vol = np.clip(np.rint(np.where(keep, pred, 0.0) * model.output_scale), 0, model.output_max).astype(np.float32)
        q = quality(vol, truth, qm)
        row[label] = {"q_psnr": q["psnr"], "q_ssim": q["ssim"]}
    return row


def main() -> None:
    direction, out = sys.argv[1], Path(sys.argv[2])
    folders = {f.name: f for f in discover_paired(DATA)}
    rows = json.loads(out.read_text()) if out.exists() else {}
    for k in (1, 2, 3):
        model = load_model(CV / f"unet-{direction}-fold-{k}.safetensors", device="cpu", engine="onnxruntime")
        for name in model.metadata["training"]["val_subjects"]:
            if name in rows:
                continue
            t0 = time.time()
            rows[name] = {**score_subject(model, folders[name]), "fold": k, "seconds": round(time.time() - t0, 1)}
            out.write_text(json.dumps(rows, indent=1))
            print(name, rows[name], flush=True)
    for label in ("plain", "tta"):
        means = {m: round(float(np.mean([r[label][m] for r in rows.values()])), 4) for m in ("q_psnr", "q_ssim")}
        print(label, "mean", means)


if __name__ == "__main__":
    main()

"""Example panels at slices with lesions, for MODEL_CARD.md: source | synthetic | truth | |error|.

Usage: ``python benchmarks/lesion_panels.py CHECKPOINT_OR_CV_FOLDER --data DIR --out docs/model_card``

With a cross-validation folder (``dicomnode train --folds``) each subject is synthesized by the
fold model that never saw it.  The slices are chosen by looking at the true T2 (canonical axial
index): a glioma with oedema, a metastasis with a cyst, a chronic stroke and periventricular
multiple-sclerosis plaques.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ml.data import _find_contrast, head_mask, load_volume, to_canonical
from ml.evaluate import save_panel
from ml.inference import load_model, synthesize

LESIONS = {  # subject: (axial slice, what it shows)
    "brats_gli_00001": (85, "glioma with surrounding oedema"),
    "aurora_met": (80, "metastasis with a fluid-filled cyst"),
    "vrd_stroke": (95, "chronic stroke"),
    "openms_mni_patient19": (105, "periventricular MS plaques"),
}


def _model_for(folder: Path, subject: str):  # type: ignore[no-untyped-def]
    for fold in sorted(folder.glob("fold-*")):
        meta = json.loads((fold / "model.json").read_text())
        if subject in meta["training"]["val_subjects"]:
            return load_model(fold, device="cpu", engine="auto"), fold.name
    return load_model(folder, device="cpu", engine="auto"), "seen in training"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for subject, (k, what) in LESIONS.items():
        model, where = _model_for(args.checkpoint, subject)
        vs = load_volume(_find_contrast(args.data / subject, model.source))  # type: ignore[arg-type]
        vt = load_volume(_find_contrast(args.data / subject, model.target))  # type: ignore[arg-type]
        source, aff = to_canonical(vs.data, vs.affine)
        truth, _ = to_canonical(vt.data, vt.affine)
        synthetic = synthesize(model, source, aff).astype(np.float32)
        path = args.out / f"{model.direction}-lesion-{subject}.png"
        save_panel(path, source, synthetic, truth, head_mask(source) | head_mask(truth), k)
        print(f"{path}: {subject} slice {k} ({what}), model {where}")


if __name__ == "__main__":
    main()

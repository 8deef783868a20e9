"""Does the QC uncertainty track the real error?  Spearman rank correlation on real subjects and
degraded copies of their inputs (noise, in-plane blur, a bias field).

Usage: ``python benchmarks/qc_calibration.py MODEL --data DIR [--direction D] [--every 4] [--kinds ...]
[--subjects A B ...] [--json OUT]``

MODEL is ``default`` (the shipped model), a checkpoint, or a cross-validation folder (``dicomnode train --folds``:
each subject is then synthesized by the fold model that never saw it).  Only subjects the model did not train on
are used.  The real error is the quality metric against the true target contrast (``1 - SSIM`` and ``-PSNR``, so
that larger is worse) on the slices :func:`ml.inference.assess_detail` predicts (every *every*-th axial slice:
the QC measures its uncertainty on exactly those predictions); the uncertainties are its flip disagreement and
input-histogram distance, and, for comparison, a cycle check with the reverse model (``--reverse``, default the
shipped one): the sampled predictions, normalised as the reverse model's input, are turned back into the source
contrast, and the cycle error is the mean absolute difference inside the head mask between that and the source
normalised as the reverse model's target, relative to the source's mean there (the form of the flip
disagreement).  CPU time (``time.process_time``) of the node's QC (:func:`ml.inference.assess_detail`, whose
forward pass on the sampled slices the cycle check shares), of the cycle's reverse pass and of one synthesis of
each subject (:func:`ml.inference.synthesize`) are reported, so each estimate's extra cost is a fraction of one
synthesis.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from scipy import ndimage, stats

from ml.data import _find_contrast, head_mask, input_volume, load_volume, target_volume, to_canonical
from ml.evaluate import evaluation_mask
from ml.inference import Assessment, LoadedModel, assess_detail, load_model, predict_normalized, synthesize
from ml.metrics import quality
from vocab import Direction

MEASURES = ("flip_disagreement", "cycle_error", "intensity_histogram")


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


def cycle_error(reverse: LoadedModel, source: np.ndarray, detail: Assessment) -> float:
    """T1 -> T2 -> T1 (or the other way): the reverse model on the sampled predictions of *detail*, compared with
    *source* (canonical, physical units) on the same slices: mean absolute difference inside the head mask,
    relative to the source's mean there (both as the reverse model's target: its normalisation, in [0, 1])."""
    if reverse.options.context_slices:
        raise ValueError("cycle check: the reverse model reads neighbouring slices, which the QC does not predict")
    ks = detail.slices
    mask = detail.mask[:, :, ks]
    if not ks or not mask.any():
        return 0.0
    back = predict_normalized(reverse.net, input_volume(detail.prediction, mask, reverse.input_norm),
                              reverse.options, device=reverse.device)
    target = target_volume(source, detail.mask, reverse.input_norm)[0][:, :, ks]
    level = float(np.mean(target[mask])) or 1.0
    return float(np.mean(np.abs(back[mask] - target[mask])) / level)


T = TypeVar("T")


def _cpu(fn: Callable[[], T]) -> tuple[T, float]:
    """*fn*'s result and the CPU seconds it took."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--direction", default="t1-to-t2")
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--kinds", nargs="*", default=["original", "noise", "blur", "bias"])
    ap.add_argument("--subjects", nargs="*", default=None)
    ap.add_argument("--reverse", type=Path, default=Path("default"),
                    help="the reverse-direction model for the cycle check (default: the shipped one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    reverse_direction = Direction.for_source(Direction(args.direction).target).value
    reverse, load_s = _cpu(lambda: load_model(args.reverse, reverse_direction, device="cpu", engine="auto"))
    reverse_seen = set(reverse.metadata.get("training", {}).get("train_subjects") or [])
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
        _, synth_s = _cpu(lambda: synthesize(model, source, aff))
        for kind in args.kinds:
            degraded = _degrade(kind, source, mask, rng)
            detail, qc_s = _cpu(lambda: assess_detail(model, degraded, aff, every=args.every))
            ks = detail.slices
            q = quality(detail.prediction, truth[:, :, ks], qm[:, :, ks])
            checks = detail.result.to_dict()["checks"]
            row = {"subject": subject, "input": kind, "psnr": q["psnr"], "ssim": q["ssim"], "slices": len(ks),
                   "verdict": detail.result.verdict.value, **{name: c["value"] for name, c in checks.items()},
                   "synthesis_cpu_s": synth_s, "qc_cpu_s": qc_s}
            if subject not in reverse_seen:  # the reverse model must not have seen the subject either
                row["cycle_error"], row["cycle_cpu_s"] = _cpu(lambda: cycle_error(reverse, degraded, detail))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out: dict[str, Any] = {"model": str(args.model), "direction": args.direction, "every": args.every,
                           "reverse": str(args.reverse), "reverse_load_cpu_s": load_s, "rows": rows, "spearman": {}}
    for measure in MEASURES:
        pairs = [(r[measure], 1 - r["ssim"], -r["psnr"]) for r in rows if measure in r]
        if len(pairs) >= 3:
            u, e_ssim, e_psnr = map(np.asarray, zip(*pairs))
            out["spearman"][measure] = {"vs_1_minus_ssim": float(stats.spearmanr(u, e_ssim).statistic),
                                        "vs_minus_psnr": float(stats.spearmanr(u, e_psnr).statistic), "n": len(pairs)}
    if rows:
        synth = float(np.mean([r["synthesis_cpu_s"] for r in rows]))
        cycled = [r["cycle_cpu_s"] for r in rows if "cycle_cpu_s" in r]
        out["cpu_relative_to_one_synthesis"] = {
            "qc_with_flip (assess_detail)": float(np.mean([r["qc_cpu_s"] for r in rows])) / synth,
            "cycle_reverse_pass": float(np.mean(cycled)) / synth if cycled else None,
            "reverse_model_load (once per process)": load_s / synth}
    print(json.dumps(out["spearman"], indent=2))
    print(json.dumps(out.get("cpu_relative_to_one_synthesis"), indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Recompute a checkpoint's QC training reference (``qc_reference`` in its metadata) from the subjects it was
trained on, exactly as training computes it (the input figures, and the model's flip disagreement on those
inputs), and store it in the checkpoint's JSON; the weights are not touched, so their digest (``weights_sha256``,
and the one the ONNX file records) stays valid.

Usage: ``python -m ml.reference [CHECKPOINT ...] [--data DIR] [--check | --inputs-only]``

Without a checkpoint, the shipped U-Nets (``ml/weights/unet-*.json``).  ``--data`` defaults to the training data
folder recorded in the metadata (``training.data``, relative to the repository root).  ``--check`` only reports
whether the stored reference equals the recomputed one (exit code 1 when not).  ``--inputs-only`` recomputes the
input figures and keeps the stored flip-disagreement figures (they depend on the weights and the training inputs
only, not on how the QC summarises those inputs; recomputing them runs the model over every training volume).

Checkpoints trained before the reference existed (the shipped v2.0 U-Nets) get one this way, so the node's input
check is not skipped for them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from vocab import Direction

from .checkpoint import CheckpointError, checkpoint_paths, write_metadata
from .data import DataError, head_mask, load_subject, parse_input_norm
from .inference import WEIGHTS_DIR, flip_reference, load_model
from .qc import histogram_thresholds, input_reference

__all__ = ["training_reference", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def training_reference(meta: dict[str, Any], data: Path, checkpoint: Path | None = None) -> dict[str, Any]:
    """The ``qc_reference`` training would have stored for the U-Net described by *meta*: the network inputs of its
    training subjects (``training.train_subjects`` under *data*), normalised as its ``input_normalization`` says,
    each inside the head mask of its source contrast (``ml.train._train_unet``); with *checkpoint* (the model
    itself), also its flip disagreement on them (on the CPU, torch)."""
    direction = Direction(str(meta.get("direction", "")))
    source = direction.source.value
    method = parse_input_norm((meta.get("input_normalization") or {}).get("method"))
    names = list((meta.get("training") or {}).get("train_subjects") or [])
    if not names:
        raise DataError("metadata lists no training subjects (training.train_subjects)")
    volumes = []
    for name in names:
        s = load_subject(data / name)
        volumes.append((s.input_image(source, method), head_mask(s.image(source)), s.affine, s.affine))
    reference = input_reference(volumes, contrast=source)
    if checkpoint is not None:
        model = load_model(checkpoint, device="cpu", engine="torch")
        reference.update(flip_reference(model, [(normed, mask) for normed, mask, _, _ in volumes]))
    return reference


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-6)  # float noise of another CPU
    return bool(a == b)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ml.reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="*", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="training data folder (default: the metadata's)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only compare the stored reference with a recomputed one")
    mode.add_argument("--inputs-only", action="store_true",
                      help="recompute the input figures, keep the stored flip-disagreement figures")
    args = ap.parse_args(argv)
    targets = args.checkpoints or sorted(WEIGHTS_DIR.glob("unet-*.json"))
    stale = 0
    for target in targets:
        _, mpath = checkpoint_paths(target)
        meta = json.loads(mpath.read_text())
        data = args.data or (REPO_ROOT / str((meta.get("training") or {}).get("data", "")))
        stored = dict(meta.get("qc_reference") or {})
        kept = {k: v for k, v in stored.items() if k.startswith("flip_")}
        if args.inputs_only and not kept:
            print(f"{mpath}: --inputs-only: the stored qc_reference has no flip-disagreement figures to keep",
                  file=sys.stderr)
            return 2
        try:
            reference = training_reference(meta, data, None if args.inputs_only else target)
        except (CheckpointError, DataError, ValueError) as exc:
            print(f"{mpath}: {exc}", file=sys.stderr)
            return 2
        if args.check:
            ok = _same(meta.get("qc_reference"), json.loads(json.dumps(reference)))
            stale += not ok
            print(f"{mpath}: qc_reference {'up to date' if ok else 'differs from the recomputed one'}")
            continue
        meta["qc_reference"] = {**reference, **kept} if args.inputs_only else reference
        reference = meta["qc_reference"]
        write_metadata(mpath, meta)
        print(f"{mpath}: qc_reference from {reference['n_volumes']} training volumes "
              f"(histogram nearest-neighbour distance at most {reference['histogram_nn_max']:.3g}, "
              f"warn above {histogram_thresholds(reference)[0]:.3g}, "
              f"flip disagreement at most {reference.get('flip_disagreement_max', float('nan')):.3g})")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())

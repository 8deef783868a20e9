"""Subject-wise k-fold cross-validation of a training (``dicomnode train --folds``): one model per fold in
``OUT/fold-<i>/``, and ``--force``'s removal of what a training wrote.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from .data import discover_paired
from .train import RESUME_FILE, TrainConfig, TrainError, TrainResult, train
from .warmstart import WarmStartError, fold_start

__all__ = ["FOLDS_FILE", "TRAINING_FILES", "remove_training", "train_folds"]

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.json"
TRAINING_FILES = ("model.safetensors", "model.json", "model.onnx", RESUME_FILE, FOLDS_FILE)


def remove_training(folder: Path) -> None:
    """Delete what :func:`train` / :func:`train_folds` wrote in *folder* (``--force``), nothing else."""
    import shutil

    for name in TRAINING_FILES:
        (folder / name).unlink(missing_ok=True)
    for fold in folder.glob("fold-*"):
        if fold.is_dir() and ((fold / "model.json").exists() or (fold / RESUME_FILE).exists()):
            shutil.rmtree(fold)


def _fold_finished(folder: Path, epochs: int) -> bool:
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return "unfinished" not in meta and int(meta.get("epochs_completed", 0)) >= epochs


def train_folds(cfg: TrainConfig, folds: int | None, *, only: Sequence[int] = ()) -> list[TrainResult]:
    """Subject-wise k-fold cross-validation: one model per fold in ``OUT/fold-<i>/``, each
    validated on its held-out patients; ``OUT/folds.json`` records the split.  ``folds=None``
    leaves one patient out per fold.  The time budget covers the whole call; with
    ``cfg.resume`` finished folds are kept and an unfinished one continues."""
    from dataclasses import replace

    from .folds import FoldError, real_subjects, subject_folds

    if cfg.val_subjects:
        raise TrainError("--folds: the folds choose the held-out subjects; leave out --val-subjects")
    names = [f.name for f in discover_paired(cfg.data) if f.name not in set(cfg.exclude_subjects)]
    subjects = real_subjects(names)
    templates = tuple(n for n in names if n not in subjects)
    try:
        split = subject_folds(subjects, folds, seed=cfg.seed)
    except FoldError as exc:
        raise TrainError(str(exc)) from None
    unknown = sorted(set(only) - {f.index for f in split})
    if unknown:
        raise TrainError(f"--fold: {unknown[0]} is not one of 1..{len(split)}")
    try:  # every fold's start is checked before anything is written
        starts = {f.name: fold_start(cfg.init_from, f.name) for f in split
                  if cfg.init_from is not None and (not only or f.index in only)}
    except WarmStartError as exc:
        raise TrainError(str(exc)) from None
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"folds": [{"fold": f.index, "train": list(f.train), "val": list(f.val)} for f in split],
              "seed": cfg.seed, "excluded": list(cfg.exclude_subjects) + list(templates)}
    (out / FOLDS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    deadline = None if cfg.time_budget is None else time.monotonic() + 60.0 * cfg.time_budget
    results = []
    for fold in split:
        if only and fold.index not in only:
            continue
        folder = out / fold.name
        if cfg.resume and _fold_finished(folder, cfg.epochs):
            log.info("%s: finished earlier, kept", fold.name)
            results.append(TrainResult(folder, True, cfg.epochs))
            continue
        budget = None if deadline is None else max(0.0, (deadline - time.monotonic()) / 60.0)
        if budget is not None and budget <= 0:
            results.append(TrainResult(folder, False, 0))
            break
        log.info("%s: held out %s", fold.name, ", ".join(fold.val))
        sub = replace(cfg, out=folder, val_subjects=fold.val, exclude_subjects=tuple(cfg.exclude_subjects) + templates,
                      resume=cfg.resume and (folder / RESUME_FILE).is_file(), time_budget=budget,
                      init_from=starts.get(fold.name),
                      name=(cfg.name or f"dicomnode-{cfg.model}-{cfg.direction}") + f"-{fold.name}")
        result = train(sub)
        results.append(result)
        if not result.finished:
            break
    return results

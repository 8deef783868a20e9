"""Warm start: a U-Net training that begins from the weights of a finished checkpoint (``dicomnode train
--init-from``).

This is how a training continues when its resume state is gone (a shipped fp16 model, a fold model kept in
``ml/weights/cv``), or how a model is fine-tuned.  Only the weights come over: the optimizer, the learning-rate
schedule and the step count start afresh, so it is a new training, and its metadata says where it started
(``training.init_from``).  Three things are refused, each with one line: another direction, another network, and a
start that was trained on a subject this run validates on (in cross-validation that would leak the held-out
subjects into the fold model).  One change of network is taken: a larger ``base_width`` and nothing else, which
starts the wider U-Net at the checkpoint's function (``ml.widen``; ``training.init_from.widened_from`` records the
width it came from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import CheckpointError, load_checkpoint, load_into
from .networks import OptionError, UNet, build_network, parse_options
from .widen import WidenError, widen_unet

__all__ = ["WarmStartError", "fold_start", "load_start"]


class WarmStartError(ValueError):
    """The checkpoint cannot start this training; ``str(err)`` is one line naming the option and the cause."""


def fold_start(path: Path, fold_name: str) -> Path:
    """The start of one cross-validation fold: ``PATH/<fold_name>/`` (as ``dicomnode train --folds`` writes them) or
    ``PATH-<fold_name>.json`` + ``.safetensors`` (as ``ml/weights/cv`` keeps them, e.g. ``ml/weights/cv/unet-t2-to-t1``).
    One checkpoint for every fold is refused: it would have seen every fold's held-out subjects."""
    folder = Path(path) / fold_name
    if (folder / "model.json").is_file():
        return folder
    flat = Path(f"{path}-{fold_name}")
    if flat.with_name(flat.name + ".json").is_file():
        return flat.with_name(flat.name + ".safetensors")
    raise WarmStartError(f"--init-from: with --folds, {path} must hold {fold_name}/model.json, or {flat.name}.json "
                         "must exist (one start per fold, trained on that fold's training subjects)")


def load_start(path: Path, *, direction: str, network: dict[str, Any], input_norm: str,
               val_subjects: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(float32 weights, provenance for ``training.init_from``) of the checkpoint at *path*, checked against the
    training it is to start."""
    try:
        state, meta, _ = load_checkpoint(path)
    except CheckpointError as exc:
        raise WarmStartError(f"--init-from: {exc}") from None
    if meta.get("architecture") != "unet":
        raise WarmStartError(f"--init-from: {path} is a {meta.get('architecture')} checkpoint, not a U-Net")
    if meta.get("direction") != direction:
        raise WarmStartError(f"--init-from: {path} is a {meta.get('direction')} model, this training is {direction}")
    widened_from: int | None = None
    if meta.get("network") != network:
        differ = sorted(k for k in set(network) | set(meta.get("network") or {})
                        if (meta.get("network") or {}).get(k) != network.get(k))
        start_width = (meta.get("network") or {}).get("base_width")
        if differ != ["base_width"] or not isinstance(start_width, int) or network["base_width"] < start_width:
            raise WarmStartError(f"--init-from: {path} has another network ({', '.join(differ)} differ); "
                                 "pass its options with --network (only a larger base_width may differ: widening)")
        state = _widened(path, state, meta["network"], network)
        widened_from = start_width
    start_norm = (meta.get("input_normalization") or {}).get("method", "percentile")
    if start_norm != input_norm:
        raise WarmStartError(f"--init-from: {path} was trained with --input-norm {start_norm}, not {input_norm}")
    training = meta.get("training") or {}
    seen = sorted(set(training.get("train_subjects") or ()) & set(val_subjects))
    if seen:
        raise WarmStartError(f"--init-from: {path} was trained on {', '.join(seen)}, which this training "
                             "validates on")
    history = (meta.get("validation") or {}).get("history") or []
    steps = training.get("steps_per_epoch")
    provenance = {
        "name": meta.get("name"), "version": meta.get("version"), "weights_sha256": meta["_weights_sha256"],
        "epochs": meta.get("epochs_completed", len(history)),
        **({"steps": int(steps) * int(meta.get("epochs_completed", len(history)))} if steps else {}),
        "compute_seconds": float(training.get("compute_seconds", 0.0)),
        "train_subjects": list(training.get("train_subjects") or ()),
        **({"init_from": training["init_from"]} if training.get("init_from") else {}),  # the start's own start
        **({"widened_from": {"base_width": widened_from}} if widened_from is not None else {}),
    }
    return state, provenance


def _widened(path: Path, state: dict[str, torch.Tensor], start: dict[str, Any],
             network: dict[str, Any]) -> dict[str, torch.Tensor]:
    """*state* (of a U-Net with options *start*) as the weights of the wider U-Net *network*, same function."""
    try:
        narrow = build_network(parse_options(start))
        load_into(narrow, state, str(path))
        assert isinstance(narrow, UNet)
        return widen_unet(narrow, parse_options(network)).state_dict()
    except (OptionError, WidenError, CheckpointError) as exc:
        raise WarmStartError(f"--init-from: {path}: {exc}") from None

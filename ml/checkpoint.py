"""Checkpoints: safetensors weights + JSON metadata.

On-disk layout (one checkpoint = one pair of files with the same stem)::

    <stem>.safetensors   network weights (fp32 or fp16), tensor names = state_dict keys
    <stem>.json          metadata (see below)

A *checkpoint folder* (what ``dicomnode train --out DIR`` writes) holds the pair
as ``DIR/model.safetensors`` + ``DIR/model.json`` and, for ``--resume`` only,
``DIR/resume.pt`` (optimizer, scheduler, epoch, RNG states; never shipped).
The shipped defaults are ``ml/weights/<name>.safetensors`` + ``.json``.

Metadata keys: ``format`` (= 1), ``name``, ``version``, ``package_version``,
``architecture``, ``network`` (the :class:`~ml.networks.NetworkOptions`),
``direction`` (or ``directions`` for a CycleGAN, whose weights hold both
generators as ``g_t1_to_t2.*`` / ``g_t2_to_t1.*``), ``normalization``,
``output_scale``, ``output_max``, ``window``, ``training`` (hyperparameters,
data summary: subject names and counts), ``validation`` (metrics per epoch /
final) and ``weights_sha256``.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "FORMAT", "checkpoint_paths", "export_checkpoint", "load_checkpoint", "package_version", "save_checkpoint", "sha256_file",
           "write_metadata"]

FORMAT = 1
MODEL_STEM = "model"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match; ``str(err)`` is one line."""


def package_version() -> str:
    try:
        return importlib_metadata.version("dicomnode")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, metadata) paths: ``X.safetensors`` / ``X.json`` name the pair directly;
    any other path is a checkpoint folder holding ``model.safetensors`` + ``model.json``."""
    p = Path(path)
    name = p.name
    for suffix in (".safetensors", ".json"):
        if name.endswith(suffix) and not p.is_dir():
            stem = name[: -len(suffix)]
            return p.with_name(stem + ".safetensors"), p.with_name(stem + ".json")
    return p / f"{MODEL_STEM}.safetensors", p / f"{MODEL_STEM}.json"


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any], *, half: bool = False) -> tuple[Path, Path]:
    """Write weights and metadata atomically (temporary files, then rename)."""
    wpath, mpath = checkpoint_paths(path)
    wpath.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        t = v.detach().to("cpu")
        if half and t.is_floating_point():
            t = t.to(torch.float16)
        tensors[k] = t.contiguous()
    tmp_w = wpath.with_name(wpath.name + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": str(FORMAT)})
    meta = dict(meta)
    meta["format"] = FORMAT
    meta.setdefault("package_version", package_version())
    meta["weights_dtype"] = "float16" if half else "float32"
    meta["weights_sha256"] = sha256_file(tmp_w)
    tmp_m = mpath.with_name(mpath.name + ".tmp")
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp_w.replace(wpath)
    tmp_m.replace(mpath)
    return wpath, mpath


def write_metadata(path: str | Path, meta: dict[str, Any]) -> Path:
    """Replace a checkpoint's metadata (JSON) atomically and durably, its weights untouched (so ``weights_sha256``,
    and the digest an ONNX export records, stay valid); the layout :func:`save_checkpoint` writes."""
    _, mpath = checkpoint_paths(path)
    tmp = mpath.with_name(mpath.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(mpath)
    return mpath


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """(float32 state dict, metadata, weights path); any problem -> :class:`CheckpointError`."""
    wpath, mpath = checkpoint_paths(path)
    if not wpath.is_file() or not mpath.is_file():
        missing = wpath if not wpath.is_file() else mpath
        raise CheckpointError(f"checkpoint {path}: {missing} is missing")
    try:
        meta = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: metadata {mpath.name} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: metadata {mpath.name} is not a dicomnode checkpoint (format {FORMAT})")
    digest = sha256_file(wpath)
    expected = meta.get("weights_sha256")
    if expected and expected != digest:
        raise CheckpointError(f"checkpoint {path}: {wpath.name} does not match its metadata (sha256 differs): corrupt or mixed files")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: weights {wpath.name} are corrupt ({exc})") from None
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    meta["_weights_sha256"] = digest
    return state, meta, wpath


def load_into(net: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line :class:`CheckpointError` on mismatch."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"checkpoint {where}: weights do not match the architecture in its metadata ({what}, "
                              f"{len(missing)} missing, {len(extra)} unexpected)")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"checkpoint {where}: weights do not match the architecture in its metadata "
                                  f"({k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)})")
    net.load_state_dict(state, strict=True)


def export_checkpoint(src: str | Path, dst: str | Path, *, half: bool = True, **overrides: Any) -> tuple[Path, Path]:
    """Copy a trained checkpoint to a shippable pair (fp16 weights by default), updating metadata keys."""
    state, meta, _ = load_checkpoint(src)
    meta = {k: v for k, v in meta.items() if not k.startswith("_") and k not in ("weights_sha256", "weights_dtype")}
    meta.update(overrides)
    return save_checkpoint(dst, state, meta, half=half)

"""The inference API the node uses: :func:`load_model` once, then :func:`synthesize`.

Output range: the network predicts the target contrast normalized to [0, 1]
(target volume divided by its 99.5th percentile inside the head mask, clipped).
:func:`synthesize` multiplies that by ``output_scale`` - the median 99.5th
percentile of the target contrast over the training subjects, stored in the
checkpoint metadata - and rounds to ``np.uint16``; values therefore lie in
``[0, output_max]`` with ``output_max = round(output_scale)``.  The suggested
display window is ``(output_max / 2, output_max)``.  A model trained on tissue-peak
targets (``target_normalization`` ``tissue-peak``: the target divided by 5 times its main
tissue peak) suggests none: most anatomy then lies in the lowest fifth of the range, and
the series' own intensities set the window (``dicom_node.build``).  Voxels more than two
voxels outside the input's head mask (Otsu foreground, holes filled) are set to 0.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from vocab import DIRECTIONS, Direction

from .checkpoint import CheckpointError, load_checkpoint, load_into
from .data import DataError, InputNorm, from_canonical, head_mask, input_volume, parse_input_norm, slice_stack, to_canonical
from .engine import Engine, onnx_module, resolve_engine
from .networks import Architecture, NetworkOptions, OptionError, build_network, parse_options

if TYPE_CHECKING:
    from .qc import QCResult

__all__ = ["DIRECTIONS", "Assessment", "assess", "assess_detail", "LoadedModel", "WEIGHTS_DIR", "default_checkpoint",
           "flip_reference", "load_model", "predict_normalized", "write_onnx", "resolve_device", "synthesize"]

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass
class LoadedModel:
    """A network on its device, in eval mode, with what the node needs to know about it."""

    direction: str
    name: str
    version: str
    identity: str
    output_max: int
    window: tuple[float, float] | None  # (center, width); None: set by the series' own intensities
    metadata: dict[str, Any]
    net: nn.Module = field(repr=False)
    options: NetworkOptions = field(repr=False)
    device: torch.device = field(repr=False)
    output_scale: float = 1.0
    input_norm: InputNorm = InputNorm.PERCENTILE
    engine: Engine = Engine.TORCH

    @property
    def source(self) -> str:
        return Direction(self.direction).source.value

    @property
    def target(self) -> str:
        return Direction(self.direction).target.value


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise a torch device string."""
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise ValueError(f"device: {device!r} is not auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")
    return dev


def _check_direction(direction: str | None, arg: str = "direction") -> str | None:
    if direction is None:
        return None
    d = str(direction).lower()
    if d not in DIRECTIONS:
        raise ValueError(f"{arg}: {direction!r} is not one of {', '.join(DIRECTIONS)}")
    return d


def default_checkpoint(direction: str) -> Path:
    """The shipped U-Net for *direction*: ``ml/weights/unet-<direction>.safetensors``."""
    return WEIGHTS_DIR / f"unet-{direction}.safetensors"


def _fuse_batchnorm(net: nn.Module) -> None:
    """Fold eval-mode BatchNorm into the preceding convolution (faster CPU inference)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in net.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (n1, m1), (n2, m2) in zip(children, children[1:]):
                if isinstance(m1, nn.Conv2d) and isinstance(m2, nn.BatchNorm2d):
                    setattr(module, n1, fuse_conv_bn_eval(m1, m2))
                    setattr(module, n2, nn.Identity())


def load_model(checkpoint: str | Path, direction: str | None = None, device: str = "auto",
               engine: str | Engine = Engine.TORCH) -> LoadedModel:
    """Load a checkpoint (or ``"default"``, the shipped weights) for *direction*, to run on
    *engine* (:func:`ml.engine.resolve_engine`: ``auto`` is ONNX Runtime on CPU).

    Raises :class:`~ml.checkpoint.CheckpointError` (one line) for a missing,
    corrupt or mismatched checkpoint, and ``ValueError`` for a bad direction/device.
    """
    direction = _check_direction(direction)
    dev = resolve_device(device)
    chosen_engine = resolve_engine(engine, dev)
    if str(checkpoint) == "default":
        ckpt: Path = default_checkpoint(direction or Direction.T1_TO_T2.value)
    else:
        ckpt = Path(checkpoint)
    state, meta, wpath = load_checkpoint(ckpt)
    try:
        opts = parse_options(meta.get("network") or {})
    except OptionError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: bad network options in metadata ({exc})") from None
    if opts.architecture is Architecture.CYCLEGAN:
        available = list(meta.get("directions") or DIRECTIONS)
        chosen = direction or available[0]
        if chosen not in available:
            raise CheckpointError(f"checkpoint {ckpt}: has no {chosen} generator (has {', '.join(available)})")
        prefix = "g_" + chosen.replace("-", "_") + "."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        scales = meta.get("output_scales") or {}
        output_scale = float(scales.get(chosen, meta.get("output_scale", 1000.0)))
    else:
        chosen = str(meta.get("direction", ""))
        if chosen not in DIRECTIONS:
            raise CheckpointError(f"checkpoint {ckpt}: metadata has no valid direction ({chosen!r})")
        if direction is not None and direction != chosen:
            raise CheckpointError(f"checkpoint {ckpt}: is a {chosen} model, not {direction}")
        output_scale = float(meta.get("output_scale", 1000.0))
    try:
        input_norm = parse_input_norm((meta.get("input_normalization") or {}).get("method"))
    except DataError as exc:
        raise CheckpointError(f"checkpoint {ckpt}: {exc}") from None
    net = build_network(opts)
    load_into(net, state, str(ckpt))
    net.eval()
    _fuse_batchnorm(net)
    net.to(dev)
    if chosen_engine is Engine.ONNXRUNTIME:
        stem = str(wpath)[: -len(".safetensors")]
        net = onnx_module(net, opts.in_slices, meta["_weights_sha256"],
                          None if opts.architecture is Architecture.CYCLEGAN else Path(stem + ".onnx"))
    output_max = int(round(output_scale))
    name = str(meta.get("name") or f"dicomnode-{opts.architecture.value}-{chosen}")
    version = str(meta.get("version") or "0")
    h = hashlib.sha256()
    h.update(meta["_weights_sha256"].encode())
    h.update(Path(str(wpath)[: -len(".safetensors")] + ".json").read_bytes())
    h.update(chosen.encode())
    identity = f"{name}-{version}-{h.hexdigest()[:16]}"
    target_norm = str((meta.get("target_normalization") or {}).get("method", "percentile"))
    window = None if target_norm == InputNorm.TISSUE_PEAK.value else (output_max / 2.0, float(output_max))
    return LoadedModel(chosen, name, version, identity, output_max, window, meta, net, opts, dev, output_scale, input_norm,
                       chosen_engine)


@torch.inference_mode()
def predict_normalized(net: nn.Module, volume: np.ndarray, opts: NetworkOptions, *, batch_size: int = 16,
                       device: torch.device | str = "cpu",
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Normalized canonical volume (X, Y, Z) -> normalized prediction in [0, 1], same shape.

    Slices are padded in-plane (zeros, the background value) to a multiple of
    the network's ``opts.multiple`` and cropped back.
    """
    dev = torch.device(device)
    nx, ny, nz = volume.shape
    m = opts.multiple
    px, py = (-nx) % m, (-ny) % m
    out = np.empty(volume.shape, dtype=np.float32)
    use_amp = dev.type == "cuda"
    for start in range(0, nz, batch_size):
        ks = range(start, min(nz, start + batch_size))
        batch = np.stack([slice_stack(volume, k, opts.context_slices) for k in ks])
        x = torch.from_numpy(batch).to(dev, dtype=torch.float32)
        if px or py:
            x = F.pad(x, (py // 2, py - py // 2, px // 2, px - px // 2))
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
            y = net(x)
        y = y[:, 0, px // 2 : px // 2 + nx, py // 2 : py // 2 + ny].float().clamp_(0.0, 1.0)
        out[:, :, start : start + len(ks)] = np.moveaxis(y.cpu().numpy(), 0, 2)
        if progress is not None:
            progress(len(ks))
    return out


def synthesize(model: LoadedModel, data: np.ndarray, affine: np.ndarray, *, batch_size: int = 16,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Synthetic target-contrast volume, ``np.uint16``, same shape as *data*, in ``[0, model.output_max]``.

    *data* is a 3-D array in physical units (rescale applied), *affine* the 4x4
    voxel -> RAS+ mm matrix (nibabel convention).  Deterministic.
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"data: expected a 3-D array, got shape {arr.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine: expected a 4x4 matrix, got shape {aff.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    canon, _ = to_canonical(arr.astype(np.float32, copy=False), aff)
    mask = head_mask(canon)
    normed = input_volume(canon, mask, model.input_norm)
    pred = predict_normalized(model.net, normed, model.options, batch_size=batch_size, device=model.device,
                              progress=progress)
    # outside the (slightly dilated) head of the input there is nothing to synthesize: background is 0
    pred[~ndimage.binary_dilation(mask, iterations=2)] = 0.0
    scaled = np.rint(pred * model.output_scale)
    np.clip(scaled, 0, model.output_max, out=scaled)
    return from_canonical(scaled.astype(np.uint16), aff)


def write_onnx(checkpoint: str | Path) -> Path:
    """Export a U-Net checkpoint's network (BatchNorm folded) to ``<stem>.onnx`` beside its weights,
    recording the weights' digest, so ONNX Runtime inference starts without exporting again."""
    from .checkpoint import checkpoint_paths
    from .engine import export_onnx

    model = load_model(checkpoint, device="cpu", engine=Engine.TORCH)
    if model.options.architecture is not Architecture.UNET:
        raise CheckpointError(f"checkpoint {checkpoint}: ONNX files are written for U-Nets only (a CycleGAN is exported in memory)")
    wpath, _ = checkpoint_paths(checkpoint)
    target = wpath.with_name(wpath.name[: -len(".safetensors")] + ".onnx")
    export_onnx(model.net, model.options.in_slices, model.metadata["_weights_sha256"], target)
    return target


@torch.inference_mode()
def _predict_stacks(model: LoadedModel, stacks: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, C, X, Y) normalized input stacks -> (N, X, Y) normalized predictions in [0, 1]."""
    n, _, nx, ny = stacks.shape
    m = model.options.multiple
    px, py = (-nx) % m, (-ny) % m
    out = np.empty((n, nx, ny), dtype=np.float32)
    for start in range(0, n, batch_size):
        x = torch.from_numpy(np.ascontiguousarray(stacks[start : start + batch_size])).to(model.device, torch.float32)
        if px or py:
            x = F.pad(x, (py // 2, py - py // 2, px // 2, px - px // 2))
        with torch.autocast(device_type=model.device.type, dtype=torch.float16, enabled=model.device.type == "cuda"):
            y = model.net(x)
        out[start : start + len(x)] = y[:, 0, px // 2 : px // 2 + nx, py // 2 : py // 2 + ny].float().clamp_(0, 1).cpu().numpy()
    return out


@dataclass(frozen=True)
class Assessment:
    """:func:`assess_detail`: the QC result and the predictions it was measured on (canonical axes): the
    normalized prediction of the sampled axial *slices* (X, Y, len(slices)), zero outside the dilated head mask as
    :func:`synthesize` makes it, and the canonical head mask."""

    result: "QCResult"
    slices: list[int]
    prediction: np.ndarray
    mask: np.ndarray


def assess(model: LoadedModel, data: np.ndarray, affine: np.ndarray, *, batch_size: int = 16,
           every: int = 4, flip_warn: float | None = None, flip_fail: float | None = None) -> "QCResult":
    """Quality control of synthesizing *data* with *model*: the input against the checkpoint's
    training reference (``qc_reference``; skipped when the checkpoint has none) and the
    left-right flip disagreement on every *every*-th slice (both predictions of those slices:
    about ``2 / every`` of the inference cost, 50 % with the default).  Verdict thresholds: :mod:`ml.qc`;
    the flip disagreement's are the model's (:func:`ml.qc.flip_thresholds`) unless *flip_warn* / *flip_fail*
    are given."""
    return assess_detail(model, data, affine, batch_size=batch_size, every=every, flip_warn=flip_warn,
                         flip_fail=flip_fail).result


def assess_detail(model: LoadedModel, data: np.ndarray, affine: np.ndarray, *, batch_size: int = 16,
                  every: int = 4, flip_warn: float | None = None, flip_fail: float | None = None) -> Assessment:
    """:func:`assess` with the sampled predictions it measured (for calibrating the QC against the real error)."""
    from .qc import Check, Verdict, check_input, flip_thresholds, summarize

    arr = np.asarray(data, dtype=np.float32)
    aff = np.asarray(affine, dtype=np.float64)
    canon, canon_aff = to_canonical(arr, aff)
    mask = head_mask(canon)
    normed = input_volume(canon, mask, model.input_norm)
    checks: list[Check] = []
    reference = model.metadata.get("qc_reference")
    if reference:
        checks += check_input((normed, mask, canon_aff, aff), reference)
    ks, pred, value = _flip_pass(model, normed, mask, every, batch_size)
    if value is not None:
        warn, fail, basis = flip_thresholds(reference, flip_warn, flip_fail)
        verdict = Verdict.FAIL if value > fail else Verdict.WARN if value > warn else Verdict.PASS
        checks.append(Check("flip_disagreement", value, f"warn > {warn:.3g}, fail > {fail:.3g} ({basis})", verdict,
                            "" if verdict is Verdict.PASS else
                            f"unstable prediction (mirrored input changes it by {100 * value:.0f} %, warn above "
                            f"{100 * warn:.0f} %: {basis})"))
        pred = np.where(ndimage.binary_dilation(mask, iterations=2)[:, :, ks], pred, 0.0).astype(np.float32)
    return Assessment(summarize(checks), ks, pred, mask)


def _flip_pass(model: LoadedModel, normed: np.ndarray, mask: np.ndarray, every: int,
               batch_size: int) -> tuple[list[int], np.ndarray, float | None]:
    """Every *every*-th slice with head of the network input *normed* (canonical), predicted as is and mirrored
    left-right: (those slices, the prediction on them (X, Y, N), the flip disagreement; None without such slices)."""
    from .qc import flip_disagreement

    ks = [int(k) for k in range(0, normed.shape[2], max(1, every)) if mask[:, :, k].any()]
    if not ks:
        return ks, np.zeros(normed.shape[:2] + (0,), dtype=np.float32), None
    stacks = np.stack([slice_stack(normed, k, model.options.context_slices) for k in ks])  # (N, C, X, Y)
    pred = _predict_stacks(model, stacks, batch_size)
    flipped = _predict_stacks(model, np.ascontiguousarray(stacks[:, :, ::-1]), batch_size)[:, ::-1]
    pred, flipped = np.moveaxis(pred, 0, 2), np.moveaxis(flipped, 0, 2)
    return ks, pred, flip_disagreement(pred, np.ascontiguousarray(flipped), mask[:, :, ks])


FLIP_REFERENCE_EVERY = 4
"""Slice sampling of the training flip figures (denser than the node's default ``[qc] flip_every``: a reference
is computed once)."""


def flip_reference(model: LoadedModel, volumes: Sequence[tuple[np.ndarray, np.ndarray]], *,
                   every: int = FLIP_REFERENCE_EVERY, batch_size: int = 16) -> dict[str, Any]:
    """The flip disagreement of *model* on its own training *volumes* (network input as training scaled it,
    canonical; head mask), for the checkpoint's ``qc_reference``: the flip check warns and fails at multiples of
    the largest (:func:`ml.qc.flip_thresholds`).  Empty when no volume has a slice with head."""
    values = [v for normed, mask in volumes
              if (v := _flip_pass(model, np.asarray(normed, dtype=np.float32), mask, every, batch_size)[2]) is not None]
    if not values:
        return {}
    return {"flip_disagreement_training": [round(v, 6) for v in values],
            "flip_disagreement_max": round(max(values), 6), "flip_reference_every": every}

"""Training: the paired U-Net loop and what every training shares (the CycleGAN loop is in
:mod:`ml.train_cyclegan`, cross-validation in :mod:`ml.train_folds`, warm starts in :mod:`ml.warmstart`).

One call of :func:`train` runs a whole training (or resumes one): a checkpoint
(``OUT/model.safetensors`` + ``OUT/model.json`` + ``OUT/resume.pt``) after every
epoch, validation metrics on whole held-out subjects per epoch, mixed precision
(:mod:`ml.precision`: fp16 on CUDA, bf16 on CPUs that compute it natively), and
DistributedDataParallel when started by ``torchrun`` (NCCL on GPU, gloo on CPU).
Ctrl-C saves a resume state first; ``--resume`` restarts the interrupted epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from vocab import Direction

from .checkpoint import CheckpointError, checkpoint_paths, load_into, package_version, save_checkpoint
from .data import (TARGET_SPAN, DataError, InputNorm, Subject, discover_paired, head_mask, load_subjects, parse_input_norm,
                   split_names, thick_stack, useful_slices)
from .losses import Loss, parse_loss, training_loss
from .inference import DIRECTIONS, predict_normalized, resolve_device
from .evaluate import evaluation_mask
from .metrics import NORMALIZATION_TEXT, QUALITY_TEXT, compare, quality
from .networks import NetworkOptions, build_network, parse_options
from .precision import Precision, autocast, emulation_warning, parse_precision, resolve_precision
from .sampling import Sampling, epoch_order, parse_sampling
from .warmstart import WarmStartError, load_start

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train"]

log = logging.getLogger(__name__)

RESUME_FILE = "resume.pt"


class TrainError(RuntimeError):
    """A training run cannot start or continue; ``str(err)`` is one line."""


@dataclass
class TrainConfig:
    model: str = "unet"
    direction: str = Direction.T1_TO_T2.value
    data: Path = Path("data")
    out: Path = Path("checkpoint")
    val_subjects: tuple[str, ...] = ()
    exclude_subjects: tuple[str, ...] = ()
    epochs: int = 20
    batch_size: int = 16
    lr: float | None = None  # default: 1e-3 U-Net, 2e-4 CycleGAN
    device: str = "auto"
    resume: bool = False
    crop: int = 128
    steps_per_epoch: int | None = None  # default: one pass over the training slices
    seed: int = 0
    network: dict[str, Any] = field(default_factory=dict)
    augment: bool = True
    name: str | None = None
    version: str = "1"
    val_every: int = 1
    loss: str = "l1"  # "l1" | "l1+ssim"
    ssim_weight: float = 1.0
    input_norm: str = "percentile"  # "percentile" | "tissue-peak"
    target_norm: str = "percentile"  # "percentile" | "tissue-peak" (the same tissue scale for every scan)
    mri_augment: bool = False  # thick-slice 2-D acquisitions, bias fields, noise (on top of --augment)
    time_budget: float | None = None  # minutes; stop cleanly with a resumable state after this long
    log_every: float = 60.0  # seconds between plain progress lines (slices/s, ETA)
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16" (ml.precision); a resumed run may change it
    init_from: Path | None = None  # U-Net: start from this checkpoint's weights (ml.warmstart); with folds a folder
    sampling: str = "slices"  # "slices" | "subjects" (ml.sampling): what each epoch draws equally often


# --------------------------------------------------------------------- utilities


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _setup_distributed(device: torch.device) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def _crop_batch(sources: list[np.ndarray], targets: list[np.ndarray], masks: list[np.ndarray], crop: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random crops of ``crop x crop`` centred on a random head voxel (zero-padded when smaller)."""
    xs, ys = [], []
    for src, tgt, m in zip(sources, targets, masks):
        c, nx, ny = src.shape
        px, py = max(0, crop - nx), max(0, crop - ny)
        if px or py:
            pad = ((0, 0), (px // 2, px - px // 2), (py // 2, py - py // 2))
            src, tgt = np.pad(src, pad), np.pad(tgt, pad)
            m = np.pad(m, pad[1:])
            nx, ny = src.shape[1:]
        pts = np.argwhere(m)
        if len(pts):
            cx, cy = pts[rng.integers(len(pts))]
        else:
            cx, cy = nx // 2, ny // 2
        x0 = int(np.clip(cx - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, nx - crop))
        y0 = int(np.clip(cy - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, ny - crop))
        xs.append(src[:, x0 : x0 + crop, y0 : y0 + crop])
        ys.append(tgt[:, x0 : x0 + crop, y0 : y0 + crop])
    return np.stack(xs), np.stack(ys)


def augment(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flips, a small random affine (rotation +-10 deg, scale 0.9-1.1, shift +-5%) and an
    intensity change (gain 0.9-1.1, gamma 0.8-1.25) of the input only."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    ang = u(-math.pi / 18, math.pi / 18)
    scale = u(0.9, 1.1)
    fx = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) / scale * fx
    theta[:, 0, 1] = -torch.sin(ang) / scale
    theta[:, 1, 0] = torch.sin(ang) / scale
    theta[:, 1, 1] = torch.cos(ang) / scale * fy
    theta[:, :, 2] = (torch.rand(n, 2, generator=gen) - 0.5) * 0.1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if y is not None:
        y = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gain = u(0.9, 1.1).view(n, 1, 1, 1)
    gamma = torch.exp(u(math.log(0.8), math.log(1.25))).view(n, 1, 1, 1)
    x = gain * x.clamp(min=0).pow(gamma)
    return x, y


def _progress(enabled: bool):  # type: ignore[no-untyped-def]
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)


def _load_data(cfg: TrainConfig) -> tuple[list[Subject], list[Subject]]:
    folders = discover_paired(cfg.data)
    folders = [f for f in folders if f.name not in set(cfg.exclude_subjects)]
    names = [f.name for f in folders]
    train_names, val_names = split_names(names, cfg.val_subjects)
    if not train_names:
        raise DataError(f"{cfg.data}: no training subjects left after --val-subjects/--exclude")
    subjects = load_subjects(folders)
    by = {s.name: s for s in subjects}
    return [by[n] for n in train_names], [by[n] for n in val_names]


def _validate(gens: dict[str, nn.Module], opts: NetworkOptions, val: Sequence[Subject],
              device: torch.device, input_norm: InputNorm = InputNorm.PERCENTILE) -> dict[str, Any]:
    """Per-direction mean and per-subject metrics on the held-out subjects: the quality metric
    (``q_psnr``, ``q_ssim``) and :func:`compare`'s figures."""
    results: dict[str, Any] = {}
    for direction, net in gens.items():
        src, tgt = Direction(direction).source.value, Direction(direction).target.value
        was_training = net.training
        net.eval()
        per: dict[str, dict[str, float]] = {}
        for s in val:
            pred = predict_normalized(net, s.input_image(src, input_norm), opts, batch_size=16, device=device)
            pred[~ndimage.binary_dilation(head_mask(s.image(src)), iterations=2)] = 0.0  # as synthesize() does
            per[s.name] = compare(pred, s.image(tgt), s.mask)
            q = quality(pred, s.image(tgt), evaluation_mask(s.image(tgt), s.image(src), s.mask))
            per[s.name].update({"q_psnr": q["psnr"], "q_ssim": q["ssim"]})
        net.train(was_training)
        if per:
            keys = next(iter(per.values())).keys()
            mean = {k: float(np.mean([m[k] for m in per.values()])) for k in keys}
            results[direction] = {"mean": mean, "subjects": per}
    return results


def _data_summary(train: Sequence[Subject], val: Sequence[Subject], cfg: TrainConfig) -> dict[str, Any]:
    return {
        "data": str(cfg.data),
        "train_subjects": [s.name for s in train],
        "val_subjects": [s.name for s in val],
        "excluded_subjects": list(cfg.exclude_subjects),
        "n_train_subjects": len(train),
        "n_val_subjects": len(val),
        "n_train_slices": int(sum(len(useful_slices(s.mask)) for s in train)),
    }


# --------------------------------------------------------------------- main entry


def train(cfg: TrainConfig, *, on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Run (or resume) a training; returns where the checkpoint is and whether it finished
    (``finished`` is false when the time budget stopped it: continue with ``resume=True``)."""
    if cfg.model not in ("unet", "cyclegan"):
        raise TrainError(f"--model: {cfg.model!r} is not one of unet, cyclegan")
    if cfg.direction not in DIRECTIONS:
        raise TrainError(f"--direction: {cfg.direction!r} is not one of {', '.join(DIRECTIONS)}")
    for name, value, low in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1), ("--crop", cfg.crop, 16)):
        if value < low:
            raise TrainError(f"{name}: must be >= {low}, got {value}")
    try:
        device = resolve_device(cfg.device)
        precision = resolve_precision(cfg.precision, device)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if cfg.model == "cyclegan":
        if parse_precision(cfg.precision) not in (Precision.AUTO, Precision.FP32):
            raise TrainError(f"--precision: the CycleGAN trains in fp32 only, not {cfg.precision}")
        precision = Precision.FP32
        if cfg.init_from is not None:
            raise TrainError("--init-from: only a U-Net training can start from a checkpoint's weights")
        if cfg.sampling != Sampling.SLICES.value:
            raise TrainError("--sampling: the CycleGAN draws every slice equally often (unpaired); only a U-Net "
                             "training can draw by subject")
    net_raw = dict(cfg.network)
    net_raw["architecture"] = cfg.model
    if cfg.model == "cyclegan":
        net_raw.pop("context_slices", None)
    opts = parse_options(net_raw)
    if cfg.crop % opts.multiple:
        raise TrainError(f"--crop: {cfg.crop} is not a multiple of {opts.multiple} (2**depth)")
    distributed = _setup_distributed(device)
    rank, world = _dist_info()
    if distributed and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        if cfg.model == "unet":
            return _train_unet(cfg, opts, device, precision, rank, world, on_epoch)
        from .train_cyclegan import train_cyclegan

        return train_cyclegan(cfg, opts, device, rank, world, on_epoch)
    finally:
        if distributed:
            dist.destroy_process_group()


def _resume_state(cfg: TrainConfig) -> dict[str, Any] | None:
    path = Path(cfg.out) / RESUME_FILE
    if not cfg.resume:
        return None
    if not path.is_file():
        raise TrainError(f"--resume: {path} does not exist (nothing to resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainError(f"--resume: {path} is unreadable ({exc})") from None


def _write_resume(cfg: TrainConfig, state: dict[str, Any]) -> None:
    path = Path(cfg.out) / RESUME_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _output_scale(train: Sequence[Subject], contrast: str) -> float:
    return float(np.median([s.normalization(contrast).high for s in train]))


def _base_meta(cfg: TrainConfig, opts: NetworkOptions, train: Sequence[Subject], val: Sequence[Subject],
               lr: float, world: int) -> dict[str, Any]:
    return {
        "architecture": opts.architecture.value,
        "network": opts.to_dict(),
        "version": cfg.version,
        "package_version": package_version(),
        "normalization": {
            "method": "divide by percentile inside head mask, clip below 0",
            "percentile": 99.5,
            "input_clip": None,
            "target_clip": [0.0, 1.0],
            "canonical_orientation": "LPS (axis 2 = axial slices)",
        },
        "training": {
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": lr, "crop": cfg.crop, "seed": cfg.seed,
            "augment": cfg.augment, "world_size": world, "device": str(cfg.device),
            **_data_summary(train, val, cfg),
        },
        "metrics_normalization": NORMALIZATION_TEXT,
        "quality_metric": QUALITY_TEXT,
    }


def mri_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What scanners do to an input that flips and affines do not: a smooth multiplicative bias
    field (a random second-order polynomial in the exponent, about +-20 % across the patch) and
    Gaussian noise (sigma up to 3 % of the input's tissue level) on the tissue (input > 0)."""
    n, _, h, w = x.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    basis = torch.stack([xx, yy, xx * xx, yy * yy, xx * yy])  # (5, H, W)
    coef = (torch.rand(n, 5, generator=gen) - 0.5) * 0.4
    field = torch.exp(torch.einsum("nk,khw->nhw", coef, basis)).unsqueeze(1)
    sigma = 0.03 * torch.rand(n, 1, 1, 1, generator=gen)
    noise = torch.randn(x.shape, generator=gen) * sigma
    tissue = (x > 0).to(x.dtype)
    return (x * field + noise * tissue).clamp(min=0)


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass
class TrainResult:
    """Where the checkpoint is and whether the run finished or stopped on its time budget."""

    out: Path
    finished: bool
    epochs_completed: int
    step_in_epoch: int = 0


class _Pacer:
    """Plain progress lines (slices/s, ETA) every *every* seconds, and the time budget."""

    def __init__(self, total_steps: int, done_steps: int, batch: int, world: int, every: float,
                 budget_minutes: float | None) -> None:
        self.total, self.done, self.batch, self.world, self.every = total_steps, done_steps, batch, world, every
        self.t0 = self.last = time.monotonic()
        self.start_done = done_steps
        self.deadline = None if budget_minutes is None else self.t0 + 60.0 * budget_minutes

    def step(self, info: str) -> None:
        self.done += 1
        now = time.monotonic()
        if self.every > 0 and now - self.last >= self.every:
            self.last = now
            rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("step %d/%d, %.1f slices/s, ETA %s, %s", self.done, self.total, rate * self.batch * self.world,
                     _hms(eta), info)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _train_unet(cfg: TrainConfig, opts: NetworkOptions, device: torch.device, precision: Precision, rank: int,
                world: int, on_epoch: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    src, tgt = Direction(cfg.direction).source.value, Direction(cfg.direction).target.value
    try:
        loss_kind = parse_loss(cfg.loss)
        input_norm = parse_input_norm(cfg.input_norm)
        target_norm = parse_input_norm(cfg.target_norm)
        sampling = parse_sampling(cfg.sampling)
    except (ValueError, DataError) as exc:
        raise TrainError(str(exc)) from None
    train_s, val_s = _load_data(cfg)
    torch.manual_seed(cfg.seed + rank)
    net = build_network(opts).to(device)
    lr = cfg.lr if cfg.lr is not None else 1e-3
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    samples = [(i, k) for i, s in enumerate(train_s) for k in useful_slices(s.mask)]
    if not samples:
        raise TrainError("training subjects have no usable slices (empty head masks)")
    if rank == 0:
        for s in train_s:
            log.info("training subject %s: %d slices, voxel %s mm", s.name, len(useful_slices(s.mask)),
                     "x".join(f"{v:.2g}" for v in s.spacing))
        for s in val_s:
            log.info("validation subject %s", s.name)
        log.info("precision %s on %s; each epoch draws every %s equally often", precision.value, device,
                 sampling.value[:-1])
        warning = emulation_warning(precision, device)
        if warning:
            log.warning("%s", warning)
    inputs = [s.input_image(src, input_norm) for s in train_s]
    targets = [s.target_image(tgt, target_norm) for s in train_s]
    steps = cfg.steps_per_epoch or max(1, len(samples) // (cfg.batch_size * world))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps, eta_min=lr * 0.02)
    scaler = torch.amp.GradScaler(device.type, enabled=precision is Precision.FP16)
    history: list[dict[str, Any]] = []
    start_epoch, start_step = 0, 0
    init_from: dict[str, Any] | None = None
    state = _resume_state(cfg)
    if state is None and cfg.init_from is not None:
        try:
            weights, init_from = load_start(cfg.init_from, direction=cfg.direction, network=opts.to_dict(),
                                            input_norm=input_norm.value, val_subjects=[s.name for s in val_s])
            load_into(net, weights, str(cfg.init_from))
        except (WarmStartError, CheckpointError) as exc:
            raise TrainError(str(exc)) from None
        if rank == 0:
            log.info("starting from the weights of %s (%s, %s steps); optimizer and schedule start afresh",
                     cfg.init_from, init_from["name"], init_from.get("steps", "?"))
    if state is not None:
        init_from = state.get("init_from")
        if state.get("model") != "unet" or state.get("direction") != cfg.direction or state.get("network") != opts.to_dict():
            raise TrainError(f"--resume: {cfg.out} was trained with other settings (model/direction/network differ)")
        saved = dict(state.get("recipe", _recipe(cfg)))
        saved.pop("epochs", None)  # states saved before --epochs could grow on resume carry it
        if saved != _recipe(cfg):
            raise TrainError(f"--resume: {cfg.out} was trained with another recipe ({state.get('recipe')})")
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        _stretch_schedule(sched, cfg.epochs * steps)
        history = state["history"]
        start_epoch, start_step = int(state["epoch"]), int(state.get("step", 0))
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            log.info("resuming %s at epoch %d, step %d", cfg.out, start_epoch + 1, start_step)
    ddp_net: nn.Module = net
    if world > 1:
        ddp_net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    meta = _base_meta(cfg, opts, train_s, val_s, lr, world)
    meta.update({
        "name": cfg.name or f"dicomnode-unet-{cfg.direction}",
        "direction": cfg.direction,
        "output_scale": float(np.median([d for _, d in targets])),
        "input_normalization": {"method": input_norm.value},
        "target_normalization": {"method": target_norm.value,
                                 **({"span": TARGET_SPAN} if target_norm is InputNorm.TISSUE_PEAK else {})},
    })
    meta["output_max"] = int(round(meta["output_scale"]))
    meta["window"] = [meta["output_max"] / 2.0, float(meta["output_max"])]
    meta["training"].update(_recipe(cfg))
    meta["training"]["precision"] = precision.value  # of the last run; each epoch's is in the history
    from .qc import input_reference

    meta["qc_reference"] = input_reference([(x, head_mask(s.image(src)), s.affine, s.affine)  # training data: axial
                                            for x, s in zip(inputs, train_s)], contrast=src)
    meta["training"]["compute_seconds"] = float((state or {}).get("compute_seconds", 0.0))  # this training's own
    if init_from is not None:
        meta["training"]["init_from"] = init_from

    def snapshot(epoch: int, step: int) -> dict[str, Any]:
        return {"model": "unet", "direction": cfg.direction, "network": opts.to_dict(), "recipe": _recipe(cfg),
                "net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "history": history,
                "epoch": epoch, "step": step, "torch_rng": torch.get_rng_state(),
                "compute_seconds": meta["training"]["compute_seconds"],
                **({"init_from": init_from} if init_from is not None else {})}

    pacer = _Pacer(cfg.epochs * steps, start_epoch * steps + start_step, cfg.batch_size, world, cfg.log_every,
                   cfg.time_budget)
    run_t0 = time.monotonic()
    base_compute = meta["training"]["compute_seconds"]
    completed, step_in = start_epoch, start_step
    interactive = rank == 0 and _is_terminal()
    with _progress(interactive) as prog:
        task = prog.add_task("train", total=cfg.epochs * steps, completed=start_epoch * steps + start_step, info="")
        try:
            for epoch in range(start_epoch, cfg.epochs):
                ddp_net.train()
                order = epoch_order([i for i, _ in samples], epoch, cfg.seed, rank, world, steps, cfg.batch_size,
                                    sampling)
                t0, seen, loss_sum = time.perf_counter(), 0, 0.0
                first = start_step if epoch == start_epoch else 0
                for step in range(first, steps):
                    rng = np.random.default_rng([cfg.seed, epoch, rank, step])
                    gen = torch.Generator().manual_seed(_step_seed(cfg.seed, epoch, rank, step))
                    chosen = [samples[j] for j in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
                    xs, ys = [], []
                    for i, k in chosen:
                        thick = 1
                        if cfg.mri_augment and train_s[i].spacing[2] < 2.0 and rng.random() < 0.5:
                            thick = int(rng.integers(2, 6))  # simulate a 2-5 mm 2-D acquisition from 1 mm data
                        xs.append(thick_stack(inputs[i], k, opts.context_slices, thick))
                        ys.append(thick_stack(targets[i][0], k, 0, thick))
                    ms = [train_s[i].mask[:, :, k] for i, k in chosen]
                    xb, yb = _crop_batch(xs, ys, ms, cfg.crop, rng)
                    x, y = torch.from_numpy(xb), torch.from_numpy(yb).clamp(0, 1)
                    if cfg.augment:
                        x, y = augment(x, y, gen)
                    if cfg.mri_augment:
                        x = mri_augment(x, gen)
                    x, y = x.to(device), y.to(device)
                    with autocast(device, precision):
                        pred = ddp_net(x)
                    loss = training_loss(loss_kind, pred.float(), y, cfg.ssim_weight)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    seen += x.shape[0]
                    loss_sum += loss.item()
                    step_in = step + 1
                    info = f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / (step + 1 - first):.4f}"
                    prog.update(task, advance=1, info=info)
                    if rank == 0:
                        pacer.step(info)
                    if step + 1 < steps and pacer.out_of_time():
                        raise _OutOfTime
                elapsed = time.perf_counter() - t0
                record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, steps - first),
                                          "train_slices_per_s": seen * world / elapsed, "seconds": elapsed,
                                          "precision": precision.value}
                if loss_kind is Loss.L1:
                    record["train_l1"] = record["train_loss"]
                if rank == 0:
                    if val_s and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                        record["validation"] = _validate({cfg.direction: net}, opts, val_s, device, input_norm)
                    history.append(record)
                    meta["validation"] = {"history": history, "last": history[-1].get("validation")}
                    meta["epochs_completed"] = epoch + 1
                    meta["training"]["compute_seconds"] = base_compute + time.monotonic() - run_t0
                    save_checkpoint(Path(cfg.out), net.state_dict(), meta)
                    completed, step_in = epoch + 1, 0
                    _write_resume(cfg, snapshot(completed, 0))
                    _log_epoch(record)
                    if on_epoch:
                        on_epoch(epoch + 1, record)
                completed, step_in = epoch + 1, 0
                if world > 1:
                    dist.barrier()
                if epoch + 1 < cfg.epochs and pacer.out_of_time():
                    raise _OutOfTime
        except _OutOfTime:
            if rank == 0:
                meta["training"]["compute_seconds"] = base_compute + time.monotonic() - run_t0
                meta["epochs_completed"] = completed
                meta["unfinished"] = {"epoch": completed + 1, "step": step_in}
                save_checkpoint(Path(cfg.out), net.state_dict(), meta)
                _write_resume(cfg, snapshot(completed, step_in))
                log.warning("time budget of %s min used: state saved in %s at epoch %d step %d/%d; "
                            "continue with --resume", cfg.time_budget, cfg.out, completed + 1, step_in, steps)
            return TrainResult(Path(cfg.out), False, completed, step_in)
        except KeyboardInterrupt:
            if rank == 0:
                meta["training"]["compute_seconds"] = base_compute + time.monotonic() - run_t0
                _write_resume(cfg, snapshot(completed, step_in))
                log.warning("interrupted: state saved in %s; rerun with --resume to continue at epoch %d step %d",
                            cfg.out, completed + 1, step_in)
            raise
    if rank == 0:
        _store_flip_reference(Path(cfg.out), [(x, head_mask(s.image(src))) for x, s in zip(inputs, train_s)], device)
        _export_onnx(Path(cfg.out))
    return TrainResult(Path(cfg.out), True, completed)


def _store_flip_reference(folder: Path, volumes: Sequence[tuple[np.ndarray, np.ndarray]], device: torch.device) -> None:
    """Add the finished model's flip disagreement on its training inputs to the checkpoint's ``qc_reference``
    (the flip check's thresholds are multiples of it, :func:`ml.qc.flip_thresholds`), measured through the node's
    own loading and inference path."""
    from .checkpoint import write_metadata
    from .inference import flip_reference, load_model

    figures = flip_reference(load_model(folder, device=str(device), engine="torch"), volumes)
    meta = json.loads(checkpoint_paths(folder)[1].read_text())
    meta["qc_reference"] = {**(meta.get("qc_reference") or {}), **figures}
    write_metadata(folder, meta)
    if figures:
        log.info("flip disagreement on the training scans: at most %.3g", figures["flip_disagreement_max"])


def _export_onnx(folder: Path) -> None:
    """ONNX graph beside the finished checkpoint (ONNX Runtime inference on CPU); optional."""
    try:
        from .inference import write_onnx

        log.info("ONNX export: %s", write_onnx(folder))
    except ImportError as exc:  # onnx not installed: inference exports in memory or runs torch
        log.warning("no ONNX export (%s)", exc)


class _OutOfTime(Exception):
    """The time budget is used up (internal control flow of the training loops)."""


def _stretch_schedule(sched: torch.optim.lr_scheduler.CosineAnnealingLR, total_steps: int) -> None:
    """Fit a resumed cosine schedule to a run whose ``--epochs`` grew (or shrank).

    The saved state holds the old run's length; left as it is, the learning rate of a longer run would climb back
    up the cosine after the old end.  The rate is set to where the new, longer cosine stands at this step.
    """
    if sched.T_max == total_steps:
        return
    sched.T_max = total_steps
    t = min(sched.last_epoch, total_steps)
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * t / total_steps)) / 2


def _recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The training choices a resumed run must share with the run it continues (``--epochs`` may grow)."""
    return {"loss": cfg.loss, "ssim_weight": cfg.ssim_weight, "input_norm": cfg.input_norm,
            **({"target_norm": cfg.target_norm} if cfg.target_norm != "percentile" else {}),
            **({"sampling": cfg.sampling} if cfg.sampling != Sampling.SLICES.value else {}),
            "mri_augment": cfg.mri_augment, "augment": cfg.augment, "crop": cfg.crop, "batch_size": cfg.batch_size,
            "steps_per_epoch": cfg.steps_per_epoch, "seed": cfg.seed}


def _is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()


def _log_epoch(record: dict[str, Any]) -> None:
    losses = (f"train loss {record['train_loss']:.4f}" if "train_loss" in record
              else f"loss G {record.get('loss_g', float('nan')):.3f} D {record.get('loss_d', float('nan')):.3f}")
    parts = [f"epoch {record['epoch']}", losses, f"{record['train_slices_per_s']:.1f} slices/s"]
    for direction, v in (record.get("validation") or {}).items():
        m = v["mean"]
        parts.append(f"{direction} val quality PSNR {m['q_psnr']:.2f} dB SSIM {m['q_ssim']:.3f}")
    log.info(", ".join(parts))

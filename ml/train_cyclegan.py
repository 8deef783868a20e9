"""The unpaired CycleGAN training loop (``dicomnode train --model cyclegan``), the comparison of the CycleGAN paper's
method: two ResNet generators and two PatchGAN discriminators, LSGAN, cycle and identity losses, an image pool.
:func:`ml.train.train` calls it; checkpoints, resume states and validation are shared with the U-Net loop there.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vocab import Direction

from .checkpoint import save_checkpoint
from .data import Subject, slice_stack, useful_slices
from .inference import DIRECTIONS
from .networks import NetworkOptions, build_discriminator, build_network, init_weights
from .sampling import epoch_order
from .train import (TrainConfig, TrainError, TrainResult, _base_meta, _crop_batch, _load_data, _log_epoch,
                    _output_scale, _progress, _resume_state, _validate, _write_resume, augment)

__all__ = ["ImagePool", "train_cyclegan"]

log = logging.getLogger(__name__)


class ImagePool:
    """History buffer of generated images (Shrivastava et al.), as the reference CycleGAN uses."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.images: list[torch.Tensor] = []

    def query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return batch
        out = []
        for img in batch.detach():
            img = img.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif self.rng.random() < 0.5:
                j = self.rng.randrange(self.size)
                out.append(self.images[j].clone())
                self.images[j] = img
            else:
                out.append(img)
        return torch.cat(out)


def _unpaired_collections(cfg: TrainConfig) -> tuple[dict[str, list[tuple[np.ndarray, np.ndarray]]], dict[str, float],
                                                     list[Subject], list[Subject]]:
    """T1 and T2 training collections (normalized volume, mask) plus paired validation subjects.

    ``DATA/T1/*`` + ``DATA/T2/*`` (unpaired layout, no validation) or a paired
    layout whose pairing is ignored for training."""
    data = Path(cfg.data)
    if (data / "T1").is_dir() and (data / "T2").is_dir():
        from .data import discover_unpaired, load_normalized

        if cfg.val_subjects:
            raise TrainError("--val-subjects: needs the paired layout (DATA/<subject>/T1 + T2)")
        paths_a, paths_b = discover_unpaired(data)
        cols: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        scales: dict[str, float] = {}
        for c, paths in (("T1", paths_a), ("T2", paths_b)):
            loaded = [load_normalized(p) for p in paths]
            cols[c] = [(v, m) for v, m, _ in loaded]
            scales[c] = float(np.median([n.high for _, _, n in loaded]))
        return cols, scales, [], []
    train_s, val_s = _load_data(cfg)
    cols = {c: [(s.image(c), s.mask) for s in train_s] for c in ("T1", "T2")}
    return cols, {c: _output_scale(train_s, c) for c in ("T1", "T2")}, train_s, val_s


def train_cyclegan(cfg: TrainConfig, opts: NetworkOptions, device: torch.device, rank: int, world: int,
                    on_epoch: Callable[[int, dict[str, Any]], None] | None) -> TrainResult:
    """Unpaired CycleGAN: T1 and T2 slices are drawn independently (pairing is never used
    for training, only for validation metrics)."""
    if world > 1:
        raise TrainError("cyclegan: multi-process training is only implemented for the U-Net")
    collections, collections_scale, train_s, val_s = _unpaired_collections(cfg)
    torch.manual_seed(cfg.seed)
    g = {Direction.T1_TO_T2.value: build_network(opts).to(device), Direction.T2_TO_T1.value: build_network(opts).to(device)}
    d = {"T2": build_discriminator(opts).to(device), "T1": build_discriminator(opts).to(device)}
    for m in [*g.values(), *d.values()]:
        init_weights(m)
    lr = cfg.lr if cfg.lr is not None else 2e-4
    opt_g = torch.optim.Adam([p for m in g.values() for p in m.parameters()], lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([p for m in d.values() for p in m.parameters()], lr=lr, betas=(0.5, 0.999))
    half = cfg.epochs // 2

    def lr_lambda(e: int) -> float:  # constant, then linear decay to zero over the second half
        return 1.0 - max(0, e - half) / float(cfg.epochs - half + 1)

    sch_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_lambda)
    sch_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda)
    lambda_cycle, lambda_identity = 10.0, 0.5
    pools = {"T1": ImagePool(50, random.Random(cfg.seed)), "T2": ImagePool(50, random.Random(cfg.seed + 1))}
    samples = {c: [(i, k) for i, (_, m) in enumerate(vols) for k in useful_slices(m)] for c, vols in collections.items()}
    if not samples["T1"] or not samples["T2"]:
        raise TrainError("cyclegan: a collection has no usable slices (empty head masks)")
    steps = cfg.steps_per_epoch or max(1, len(samples["T1"]) // cfg.batch_size)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    state = _resume_state(cfg)
    if state is not None:
        if state.get("model") != "cyclegan" or state.get("network") != opts.to_dict():
            raise TrainError(f"--resume: {cfg.out} was trained with other settings (model/network differ)")
        for k in g:
            g[k].load_state_dict(state["g"][k])
        for k in d:
            d[k].load_state_dict(state["d"][k])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        sch_g.load_state_dict(state["sch_g"])
        sch_d.load_state_dict(state["sch_d"])
        history, start_epoch = state["history"], int(state["epoch"])
    meta = _base_meta(cfg, opts, train_s, val_s, lr, world)
    scales = {Direction.T1_TO_T2.value: collections_scale["T2"], Direction.T2_TO_T1.value: collections_scale["T1"]}
    meta.update({
        "name": cfg.name or "dicomnode-cyclegan",
        "directions": list(DIRECTIONS),
        "direction": cfg.direction,
        "output_scales": scales,
        "output_scale": scales[cfg.direction],
        "cyclegan": {"lambda_cycle": lambda_cycle, "lambda_identity": lambda_identity, "pool_size": 50,
                     "gan_loss": "lsgan", "betas": [0.5, 0.999], "decay": "linear over the second half of epochs"},
    })
    meta["output_max"] = int(round(meta["output_scale"]))
    meta["window"] = [meta["output_max"] / 2.0, float(meta["output_max"])]
    meta["training"]["unpaired_volumes"] = {c: len(v) for c, v in collections.items()}
    meta["training"]["unpaired_slices"] = {c: len(v) for c, v in samples.items()}
    gen = torch.Generator().manual_seed(cfg.seed)
    mse = nn.MSELoss()

    def gan_loss(pred: torch.Tensor, real: bool) -> torch.Tensor:
        return mse(pred, torch.ones_like(pred) if real else torch.zeros_like(pred))

    def snapshot(epoch: int) -> dict[str, Any]:
        return {"model": "cyclegan", "network": opts.to_dict(), "g": {k: v.state_dict() for k, v in g.items()},
                "d": {k: v.state_dict() for k, v in d.items()}, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "sch_g": sch_g.state_dict(), "sch_d": sch_d.state_dict(), "history": history, "epoch": epoch}

    completed = start_epoch
    with _progress(True) as prog:
        task = prog.add_task("cyclegan", total=(cfg.epochs - start_epoch) * steps, info="")
        try:
            for epoch in range(start_epoch, cfg.epochs):
                for m in [*g.values(), *d.values()]:
                    m.train()
                rng = np.random.default_rng([cfg.seed, epoch])
                order_a = epoch_order([i for i, _ in samples["T1"]], epoch, cfg.seed, 0, 1, steps, cfg.batch_size)
                order_b = epoch_order([i for i, _ in samples["T2"]], epoch, cfg.seed + 7, 0, 1, steps, cfg.batch_size)
                t0, seen, sums = time.perf_counter(), 0, {"g": 0.0, "d": 0.0}
                for step in range(steps):
                    batch = {}
                    for c, order in (("T1", order_a), ("T2", order_b)):
                        chosen = [samples[c][j] for j in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
                        xs = [slice_stack(collections[c][i][0], k, 0) for i, k in chosen]
                        ms = [collections[c][i][1][:, :, k] for i, k in chosen]
                        xb, _ = _crop_batch(xs, xs, ms, cfg.crop, rng)
                        x = torch.from_numpy(xb).clamp(0, 1)
                        if cfg.augment:
                            x, _ = augment(x, None, gen)
                            x = x.clamp(0, 1)
                        batch[c] = x.to(device)
                    a, b = batch["T1"], batch["T2"]
                    g_ab, g_ba = g[Direction.T1_TO_T2.value], g[Direction.T2_TO_T1.value]
                    # generators
                    for p in (p for m in d.values() for p in m.parameters()):
                        p.requires_grad_(False)
                    fake_b, fake_a = g_ab(a), g_ba(b)
                    rec_a, rec_b = g_ba(fake_b), g_ab(fake_a)
                    idt_b, idt_a = g_ab(b), g_ba(a)
                    loss_g = (gan_loss(d["T2"](fake_b), True) + gan_loss(d["T1"](fake_a), True)
                              + lambda_cycle * (F.l1_loss(rec_a, a) + F.l1_loss(rec_b, b))
                              + lambda_cycle * lambda_identity * (F.l1_loss(idt_b, b) + F.l1_loss(idt_a, a)))
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    opt_g.step()
                    # discriminators
                    for p in (p for m in d.values() for p in m.parameters()):
                        p.requires_grad_(True)
                    pb, pa = pools["T2"].query(fake_b), pools["T1"].query(fake_a)
                    loss_d = 0.5 * (gan_loss(d["T2"](b), True) + gan_loss(d["T2"](pb), False)) + \
                        0.5 * (gan_loss(d["T1"](a), True) + gan_loss(d["T1"](pa), False))
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()
                    seen += a.shape[0]
                    sums["g"] += loss_g.item()
                    sums["d"] += loss_d.item()
                    prog.update(task, advance=1, info=f"epoch {epoch + 1}/{cfg.epochs} G {sums['g'] / (step + 1):.3f} "
                                                      f"D {sums['d'] / (step + 1):.3f}")
                sch_g.step()
                sch_d.step()
                elapsed = time.perf_counter() - t0
                record: dict[str, Any] = {"epoch": epoch + 1, "loss_g": sums["g"] / steps, "loss_d": sums["d"] / steps,
                                          "train_slices_per_s": seen / elapsed, "seconds": elapsed}
                if val_s and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                    record["validation"] = _validate(g, opts, val_s, device)
                history.append(record)
                meta["validation"] = {"history": history, "last": history[-1].get("validation")}
                meta["epochs_completed"] = epoch + 1
                weights = {f"g_{k.replace('-', '_')}.{n}": t for k, m in g.items() for n, t in m.state_dict().items()}
                save_checkpoint(Path(cfg.out), weights, meta)
                _write_resume(cfg, snapshot(epoch + 1))
                completed = epoch + 1
                _log_epoch(record)
                if on_epoch:
                    on_epoch(epoch + 1, record)
        except KeyboardInterrupt:
            _write_resume(cfg, snapshot(completed))
            log.warning("interrupted: state saved in %s; rerun with --resume to continue at epoch %d", cfg.out, completed + 1)
            raise
    return TrainResult(Path(cfg.out), True, completed)

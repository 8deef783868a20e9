"""Inference and training throughput of the default ml model; writes BENCHMARKS.md sections.

Usage: ``python benchmarks/inference.py [--device cpu|cuda] [--checkpoint DIR] [--direction t1-to-t2|t2-to-t1]
[--write BENCHMARKS.md]``

On CPU the engines run side by side in one run: torch eager, torch with a
channels_last network, and ONNX Runtime (``model.engine = "auto"`` picks the
latter on CPU).

Only the ``## Inference (ml)`` and ``## Training throughput (ml)`` sections of
the file are replaced (other sections belong to other benchmarks).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.inference import load_model, synthesize
from ml.networks import build_network, parse_options

SECTIONS = ("## Inference (ml)", "## Training throughput (ml)")


def _volume(shape: tuple[int, int, int]) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    head = ((x / 0.8) ** 2 + (y / 0.9) ** 2 <= 1).astype(np.float32)
    rng = np.random.default_rng(0)
    vol = np.repeat(head[:, :, None] * 800.0, shape[2], axis=2)
    return (vol + rng.normal(0, 20, shape) * head[:, :, None]).astype(np.float32)


ENGINES = ("torch", "torch-channels-last", "onnxruntime")


def _model(checkpoint: str, device: str, engine: str, direction: str):  # type: ignore[no-untyped-def]
    if engine == "torch-channels-last":
        model = load_model(checkpoint, direction, device=device, engine="torch")
        model.net = model.net.to(memory_format=torch.channels_last)
        return model
    return load_model(checkpoint, direction, device=device, engine=engine)


def bench_inference(device: str, sizes: list[tuple[int, int, int]], repeats: int = 3, checkpoint: str = "default",
                    engine: str = "torch", direction: str = "t1-to-t2") -> list[dict[str, Any]]:
    rows = []
    model = _model(checkpoint, device, engine, direction)
    for shape in sizes:
        vol = _volume(shape)
        aff = np.diag([-0.7, -0.7, 3.0, 1.0])
        synthesize(model, vol[:, :, :4], aff)  # warm-up
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            synthesize(model, vol, aff)
            times.append(time.perf_counter() - t0)
        best = min(times)
        rows.append({"shape": shape, "engine": engine, "seconds": best, "median": float(np.median(times)),
                     "slices_per_s": shape[2] / best})
    return rows


def bench_training(device: str, network: dict[str, Any], precisions: tuple[str, ...] = ("fp32", "auto"),
                   batch: int = 16, crop: int = 128, steps: int = 3, rounds: int = 3) -> list[dict[str, Any]]:
    """Training steps of a U-Net with options *network* in each precision (``ml.precision``), interleaved round by
    round so that every precision sees the same machine load; best round of each."""
    from ml.losses import Loss, training_loss
    from ml.precision import Precision, autocast, resolve_precision

    opts = parse_options(network)
    dev = torch.device(device)
    x = torch.rand(batch, opts.in_slices, crop, crop, device=dev)
    y = torch.rand(batch, 1, crop, crop, device=dev)
    runs = []
    for name in dict.fromkeys(resolve_precision(p, dev) for p in precisions):
        torch.manual_seed(0)
        net = build_network(opts).to(dev).train()
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        scaler = torch.amp.GradScaler(dev.type, enabled=name is Precision.FP16)
        runs.append((name, net, opt, scaler))

    def step(precision: Any, net: torch.nn.Module, opt: torch.optim.Optimizer, scaler: Any) -> None:
        with autocast(dev, precision):
            pred = net(x)
        loss = training_loss(Loss.L1_SSIM, pred.float(), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    best = {name: float("inf") for name, *_ in runs}
    for r in range(rounds + 1):
        for name, net, opt, scaler in runs:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(1 if r == 0 else steps):  # round 0 warms up
                step(name, net, opt, scaler)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return [{"precision": name.value, "batch": batch, "crop": crop, "slices_per_s": steps * batch / best[name]}
            for name in best]


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", out)
        cpus = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M)
        cpu = f"{model.group(1).strip() if model else platform.processor()}, {cpus.group(1) if cpus else '?'} CPU(s) (lscpu)"
    except (OSError, subprocess.CalledProcessError):
        cpu = platform.processor()
    return cpu


def replace_sections(path: Path, new: dict[str, str]) -> None:
    """Replace the text of each ``## heading`` up to its next heading; its ``###`` subsections (the history) stay."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    for heading, body in new.items():
        block = f"{heading}\n\n{body.strip()}\n"
        pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^##+ |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _: block + "\n", text)
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write", type=Path, default=None, help="BENCHMARKS.md to update")
    ap.add_argument("--checkpoint", default="default", help="checkpoint (default: the shipped one)")
    ap.add_argument("--direction", default="t1-to-t2", choices=("t1-to-t2", "t2-to-t1"))
    ap.add_argument("--training-only", action="store_true", help="only the training throughput section")
    ap.add_argument("--network", default=None,
                    help="training section: U-Net options as JSON (default: the shipped model's network)")
    ap.add_argument("--crop", type=int, default=128, help="training section: crop size")
    args = ap.parse_args()
    dev = args.device
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    sizes = [(256, 256, 48), (320, 320, 48)]
    if dev.startswith("cuda"):
        sizes.append((256, 256, 176))
    engines = ENGINES if dev == "cpu" else ("torch",)
    inf = [] if args.training_only else [
        row for e in engines
        for row in bench_inference(dev, sizes, checkpoint=args.checkpoint, engine=e, direction=args.direction)]
    meta = load_model(args.checkpoint, args.direction, device="cpu").metadata
    network = json.loads(args.network) if args.network else meta["network"]
    tr = bench_training(dev, network, crop=args.crop)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hw = machine() if dev == "cpu" else torch.cuda.get_device_name(0)
    lines = [f"Model `{meta.get('name')}` {meta.get('version')} (U-Net, {meta['network']}),",
             f"full `ml.inference.synthesize` path (reorientation, mask, normalization, network, uint16 output), best of 3.",
             "", f"Machine: {hw}; device {dev}; torch {torch.__version__}, {threads} threads; {when}; "
             f"1-min load average {load:.1f} at start (the 2 cores are shared with other work, so these are conservative).", "",
             "| volume (i x j x slices) | engine | seconds | slices/s |", "|---|---|---|---|"]
    for r in inf:
        s = r["shape"]
        lines.append(f"| {s[0]}x{s[1]}x{s[2]} | {r['engine']} | {r['seconds']:.2f} | {r['slices_per_s']:.1f} |")
    lines.append("")
    lines.append("Target: a 48-slice 320x320 series in <= 10 s on 2 CPU cores.")
    tlines = [f"Machine: {hw}; device {dev}; {threads} thread(s); {when}; load average {load:.1f} at start.", "",
              f"U-Net ({network}) forward + backward + Adam step, L1 + SSIM loss, batch {tr[0]['batch']}, "
              f"{tr[0]['crop']}x{tr[0]['crop']} crops, best of 3 interleaved rounds (`dicomnode train --precision`):", "",
              "| precision | slices/s | against fp32 |", "|---|---|---|"]
    base = next((r["slices_per_s"] for r in tr if r["precision"] == "fp32"), tr[0]["slices_per_s"])
    tlines += [f"| {r['precision']} | {r['slices_per_s']:.1f} | {r['slices_per_s'] / base:.2f} |" for r in tr]
    tlines += ["", "The trainings themselves log their throughput per epoch in the checkpoint metadata "
               "(`validation.history[].train_slices_per_s`, beside `precision`)."]
    out = ([] if args.training_only else lines + [""]) + tlines
    for line in out:
        print(line)
    if args.write:
        new = {SECTIONS[1]: "\n".join(tlines)}
        if not args.training_only:
            new[SECTIONS[0]] = "\n".join(lines)
        replace_sections(args.write, new)


if __name__ == "__main__":
    main()

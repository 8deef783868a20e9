"""What a wider or deeper U-Net would cost: size, CPU inference latency and training throughput, side by side.

Usage: ``python benchmarks/network_cost.py [--networks JSON_LIST] [--direction t1-to-t2] [--write BENCHMARKS.md]``

Each network is the shipped model's with some options replaced (``{"base_width": 16}``, ``{"depth": 5}``...),
built with random weights: the cost of a graph does not depend on its weights.  For each one, in one run on one
machine:

* parameters and the fp16 checkpoint size (the issue allows 20 MB per direction);
* the full ``ml.inference.synthesize`` path on a 48-slice 320x320 volume with ONNX Runtime (the CPU engine
  ``model.engine = "auto"`` picks), best of 3 (the node's target: at most 10 s on 2 CPU cores);
* training steps as the shipped recipe takes them (L1 + SSIM, batch 16, 96x96 crops, fp32), on one thread, as the
  training lanes run, and what 2 600 steps (one warm restart) would take at that rate.

Every figure is relative to the shipped network in the same run, so a busy machine shifts them all alike.  Only the
``## Network cost (ml)`` section of ``--write`` is replaced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference import _volume, bench_training, machine, replace_sections  # benchmarks/inference.py
from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.inference import default_checkpoint, load_model, synthesize, write_onnx
from ml.networks import build_network, parse_options

SECTION = "## Network cost (ml)"
DEFAULT_NETWORKS = [{}, {"base_width": 16}, {"base_width": 20}, {"base_width": 24}, {"depth": 5},
                    {"base_width": 16, "depth": 5}]
RESTART_STEPS = 2600


def _checkpoint_for(network: dict[str, Any], meta: dict[str, Any], folder: Path) -> Path:
    """A checkpoint of the shipped model's metadata with *network*, random weights, and its ONNX file."""
    opts = parse_options(network)
    torch.manual_seed(0)
    net = build_network(opts).eval()
    keep = {k: v for k, v in meta.items() if not k.startswith("_") and k not in ("weights_sha256", "weights_dtype")}
    keep["network"] = opts.to_dict()
    path, _ = save_checkpoint(folder, net.state_dict(), keep, half=True)
    write_onnx(path)
    return path


def measure(network: dict[str, Any], meta: dict[str, Any], *, shape: tuple[int, int, int], repeats: int,
            train_steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="network-cost-") as tmp:
        path = _checkpoint_for(network, meta, Path(tmp))
        size = path.stat().st_size
        model = load_model(path, device="cpu", engine="onnxruntime")
        params = sum(p.numel() for p in build_network(model.options).parameters())
        vol = _volume(shape)
        aff = np.diag([-0.7, -0.7, 3.0, 1.0])
        synthesize(model, vol[:, :, :4], aff)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            synthesize(model, vol, aff)
            times.append(time.perf_counter() - t0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train = bench_training("cpu", model.options.to_dict(), precisions=("fp32",), crop=96, steps=train_steps)
        finally:
            torch.set_num_threads(threads)
    sps = train[0]["slices_per_s"]
    return {"network": network, "options": model.options.to_dict(), "parameters": params, "fp16_mb": size / 1e6,
            "seconds": min(times), "train_slices_per_s": sps,
            "restart_hours": RESTART_STEPS * train[0]["batch"] / sps / 3600}


def _label(network: dict[str, Any]) -> str:
    return "shipped" if not network else ", ".join(f"{k} {v}" for k, v in network.items())


def _describe(options: dict[str, Any]) -> str:
    return (f"base width {options['base_width']}, depth {options['depth']}, {options['upsampling']} upsampling, "
            f"{2 * options['context_slices'] + 1} input slices")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--networks", default=json.dumps(DEFAULT_NETWORKS),
                    help="JSON list of option overrides, the first one the reference (default: %(default)s)")
    ap.add_argument("--direction", default="t1-to-t2", choices=("t1-to-t2", "t2-to-t1"))
    ap.add_argument("--shape", default="320,320,48", help="inference volume i,j,slices")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=3, help="training steps per timed round (3 rounds)")
    ap.add_argument("--write", type=Path, default=None, help="BENCHMARKS.md to update")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if len(shape) != 3:
        ap.error("--shape: three integers, i,j,slices")
    networks = json.loads(args.networks)
    if not isinstance(networks, list) or not all(isinstance(n, dict) for n in networks) or not networks:
        ap.error("--networks: a non-empty JSON list of objects")
    _, meta, _ = load_checkpoint(default_checkpoint(args.direction))
    base = dict(meta["network"])
    load = os.getloadavg()[0]
    rows = [measure({**base, **n}, meta, shape=shape, repeats=args.repeats, train_steps=args.train_steps) | {"label": _label(n)}
            for n in networks]
    ref = rows[0]
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    s = "x".join(str(v) for v in shape)
    lines = [
        f"`python benchmarks/network_cost.py`: the shipped {args.direction} U-Net ({meta.get('version')}: "
        f"{_describe(parse_options(base).to_dict())}) with options "
        "replaced, random weights (a graph's cost does not depend on them). Machine: "
        f"{machine()}; torch {torch.__version__}; {when}; 1-min load average {load:.1f} at start.", "",
        f"| network | parameters | fp16 MB | {s} on ONNX Runtime, 2 threads | against shipped | training slices/s, 1 thread, fp32 "
        f"| against shipped | {RESTART_STEPS} steps take |",
        "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['parameters'] / 1e6:.2f} M | {r['fp16_mb']:.1f} | {r['seconds']:.2f} s "
                     f"| {r['seconds'] / ref['seconds']:.2f} | {r['train_slices_per_s']:.1f} "
                     f"| {r['train_slices_per_s'] / ref['train_slices_per_s']:.2f} | {r['restart_hours']:.1f} h |")
    lines += ["", "Latency target: a 48-slice 320x320 series in <= 10 s on 2 CPU cores (full `synthesize` path); "
              "size limit 20 MB per direction. Training: L1 + SSIM, batch 16, 96x96 crops, best of 3 rounds."]
    for line in lines:
        print(line)
    if args.write:
        replace_sections(args.write, {SECTION: "\n".join(lines)})


if __name__ == "__main__":
    main()

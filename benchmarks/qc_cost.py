"""What the worker's QC stage costs beside inference, on CPU: ``ml.inference.assess`` (the input
checks and the flip disagreement on every n-th slice, as ``[qc] flip_every``) against
``ml.inference.synthesize`` on the same volume, best of *repeats* each.

Usage: ``python benchmarks/qc_cost.py [--input T1.nii.gz] [--every 4 6 8] [--repeats 3] [--engine auto]``
(without ``--input``: a 256x256x48 phantom).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ml.inference import assess, load_model, synthesize


def best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path)
    ap.add_argument("--every", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    if args.input:
        import nibabel as nib

        img = nib.load(args.input)
        data, affine, what = np.asarray(img.dataobj, dtype=np.float32), img.affine, args.input.parent.name
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from dicomgen import phantom

        data = np.transpose(phantom((48, 256, 256), "T1"), (2, 1, 0)).astype(np.float32)
        affine, what = np.diag([-0.9, -0.9, 3.0, 1.0]), "phantom"
    model = load_model("default", direction="t1-to-t2", device="cpu", engine=args.engine)
    synthesize(model, data, affine)  # warm-up
    load = os.getloadavg()[0]
    t_inf = best(lambda: synthesize(model, data, affine), args.repeats)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU(s), engine {model.engine.value}, load average {load:.1f} at start")
    print(f"{what} {'x'.join(map(str, data.shape))}: synthesize {t_inf:.2f} s")
    print("| flip_every | assess (s) | of inference |\n|---|---|---|")
    for every in args.every:
        t_qc = best(lambda: assess(model, data, affine, every=every), args.repeats)
        print(f"| {every} | {t_qc:.2f} | {100 * t_qc / t_inf:.0f} % |")


if __name__ == "__main__":
    main()

"""How far each training scan lies from its nearest other training scan, by scan and by patient: the figures behind
the input-histogram thresholds (``histogram_nn_max``, :func:`ml.qc.input_reference`; warn level
:func:`ml.qc.histogram_thresholds`) and MODEL_CARD.md's analysis of
why it warned on held-out T2s in cross-validation before the warn level was widened (2026-12-03).

Usage: ``python benchmarks/qc_histogram_spread.py CHECKPOINT [CHECKPOINT ...]``

Reads only the checkpoints' JSON (``qc_reference.histograms``, in the order of ``training.train_subjects``), so it
runs in a second.  For each checkpoint it prints the stored largest distance, the warn level the node applies,
the largest distance recomputed (leave one scan out),
and the threshold if one *patient* were left out at a time (``ml.folds.subject_group``: two studies of one patient
are then never each other's nearest neighbour), with the scan that sets each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ml.checkpoint import checkpoint_paths
from ml.folds import subject_group
from ml.qc import _nearest, histogram_thresholds


def spread(meta: dict[str, Any]) -> dict[str, Any]:
    """Leave-one-scan-out and leave-one-patient-out nearest distances of the training histograms of *meta*."""
    hists = [np.asarray(h, dtype=np.float64) for h in meta["qc_reference"]["histograms"]]
    names = list(meta["training"]["train_subjects"])
    if len(names) != len(hists):
        raise SystemExit(f"{meta.get('name')}: {len(hists)} histograms for {len(names)} training subjects")
    groups = [subject_group(n) for n in names]
    n = len(names)
    by_scan = [_nearest(hists[i], [hists[j] for j in range(n) if j != i]) for i in range(n)]
    by_patient = [_nearest(hists[i], others) if (others := [hists[j] for j in range(n) if groups[j] != groups[i]])
                  else 0.0 for i in range(n)]
    i, k = int(np.argmax(by_scan)), int(np.argmax(by_patient))
    return {"stored": float(meta["qc_reference"].get("histogram_nn_max", float("nan"))),
            "warn": histogram_thresholds(meta["qc_reference"])[0],
            "by_scan": (float(by_scan[i]), names[i]), "by_patient": (float(by_patient[k]), names[k]),
            "n_scans": len(names), "n_patients": len(set(groups))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path)
    args = ap.parse_args()
    print("| checkpoint | scans / patients | stored | warn above | leave one scan out (set by) | leave one patient out (set by) |")
    print("|---|---|---|---|---|---|")
    for path in args.checkpoints:
        meta = json.loads(checkpoint_paths(path)[1].read_text())
        s = spread(meta)
        print(f"| {path} | {s['n_scans']} / {s['n_patients']} | {s['stored']:.3f} | {s['warn']:.3f} | {s['by_scan'][0]:.3f} "
              f"({s['by_scan'][1]}) | {s['by_patient'][0]:.3f} ({s['by_patient'][1]}) |")


if __name__ == "__main__":
    main()

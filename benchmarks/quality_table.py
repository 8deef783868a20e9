"""Markdown table of the quality metric from ``dicomnode evaluate --json`` output (for MODEL_CARD.md).

Usage: ``python benchmarks/quality_table.py EVAL.json [--held-out-only]``

One row per subject (with its fold, or whether the model saw it), then mean and sd over the
held-out subjects: PSNR dB / SSIM for the model, the two naive baselines and the two
"nearly perfect" references.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [("model", "model"), ("inverted_source", "inverted source"),
           ("histogram_matched_source", "histogram-matched source"), ("reference_shift1", "truth shifted 1 voxel"),
           ("reference_blur1", "truth blurred sigma 1")]


def _cell(row: dict, key: str) -> str:
    m = row.get(key) or {}
    return f"{m['q_psnr']:.2f} / {m['q_ssim']:.3f}" if "q_psnr" in m else ""


def table(result: dict, held_out_only: bool = False) -> str:
    lines = ["| subject | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, row in result["subjects"].items():
        tag = row.get("fold") or ("held out" if row.get("held_out") else "seen in training")
        if held_out_only and not (row.get("fold") or row.get("held_out")):
            continue
        lines.append(f"| {name} ({tag}) | " + " | ".join(_cell(row, k) for k, _ in COLUMNS) + " |")
    mean, sd = result.get("mean_held_out") or {}, result.get("sd_held_out") or {}
    if mean:
        lines.append("| **mean (held out)** | " + " | ".join(f"**{_cell(mean, k)}**" for k, _ in COLUMNS) + " |")
    if sd:
        lines.append("| sd (held out) | " + " | ".join(_cell(sd, k) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json", type=Path)
    ap.add_argument("--held-out-only", action="store_true")
    args = ap.parse_args()
    print(table(json.loads(args.json.read_text()), args.held_out_only))


if __name__ == "__main__":
    main()

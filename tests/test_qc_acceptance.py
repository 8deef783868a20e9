"""QC acceptance on real data (issue 12): the shipped models' QC, image checks (:func:`ml.inference.assess`) and
header checks (:func:`dicom_node.qc_header.header_checks`), on DICOM series made from ../shared/data volumes.

Specification: every real subject the shipped model did not see in training passes, in both directions (a shipped
model trained on every subject has none: its fold models stand in); every real subject passes when checked by the
cross-validation fold model that never saw it (``ml/weights/cv/``, each with its own training reference and flip
thresholds); each out-of-distribution input
is at least ``warn`` with a reason naming its cause: a post-contrast T1 sent as T1 with its contrast tags (header)
and without them (image), a FLAIR sent as T2 with its inversion tags, a T1 resliced to sagittal 5 mm slices, a T1
with inverted intensities (named by the tissue-order check, clear of its bound), noise inside a head-shaped mask
(named by the spatial-structure check: it has none).

Data: open_ms_data (Lesjak et al. 2018, CC-BY), BraTS test data (BrainLesion/BraTS, Apache-2.0; BraTS data terms);
see ../shared/data/README.md.  ``python tests/test_qc_acceptance.py`` prints every case's check values.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from nibabel import orientations as nio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netutil import SHARED_DATA, needs_shared  # noqa: E402
from niftiseries import series_from_volume  # noqa: E402

from dicom_node.qc_header import header_checks  # noqa: E402
from dicom_node.volume import load_series  # noqa: E402
from ml.data import CANONICAL, head_mask, load_volume, to_canonical  # noqa: E402
from ml import folds  # noqa: E402
from ml.inference import WEIGHTS_DIR, assess, load_model  # noqa: E402
from ml.qc import TISSUE_ORDER_FLOOR, TISSUE_ORDER_SLACK, QCResult, Verdict, summarize  # noqa: E402
from vocab import Direction  # noqa: E402

pytestmark = [needs_shared, pytest.mark.shared, pytest.mark.slow]

MRI, OOD = SHARED_DATA / "mri", SHARED_DATA / "ood" / "brats_sri24_case"
NOT_A_SUBJECT = {"mni152_template"}  # a population-average template, excluded from training
SUBJECT = "openms_mni_patient19"  # an unseen 1 mm subject for the made-up cases
CONTRAST_TAGS = {"ContrastBolusAgent": "Gadobutrol", "ContrastBolusRoute": "IV", "ContrastBolusVolume": 7.5}
FLAIR_AS_T2_TAGS = {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "InversionTime": 2500,
                    "RepetitionTime": 9000, "EchoTime": 85}  # the description still says t2_tse_tra


def _train_subjects(direction: str) -> set[str]:
    meta = json.loads((WEIGHTS_DIR / f"unet-{direction}.json").read_text())
    return set(meta["training"]["train_subjects"])


def unseen_subjects(direction: str) -> list[str]:
    if not MRI.is_dir():
        return []
    return sorted(p.name for p in MRI.iterdir() if p.is_dir() and p.name not in _train_subjects(direction)
                  and p.name not in NOT_A_SUBJECT)


def seen_subjects(direction: str) -> list[str]:
    return sorted(_train_subjects(direction))


@functools.lru_cache(maxsize=2)
def _model(direction: str) -> Any:
    return load_model("default", direction, device="cpu", engine="auto")


CV = WEIGHTS_DIR / "cv"


def fold_models(direction: str) -> list[Path]:
    """The cross-validation fold models of *direction* kept with the weights (recipe B, MODEL_CARD.md)."""
    return sorted(CV.glob(f"unet-{direction}-fold-*.safetensors"))


def _fold_meta(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.with_suffix(".json").read_text()))


def cv_cases() -> list[tuple[str, str, str]]:
    """(direction, fold model file, held-out subject) for every subject each fold model held out."""
    if not MRI.is_dir():
        return []
    return [(d, p.name, s) for d in ("t1-to-t2", "t2-to-t1") for p in fold_models(d)
            for s in sorted(_fold_meta(p)["training"]["val_subjects"])]


def real_subjects() -> list[str]:
    """The subject folders of the shared data that cross-validation splits (``ml.folds``: templates are not subjects)."""
    return sorted(folds.real_subjects([p.name for p in MRI.iterdir() if p.is_dir()])) if MRI.is_dir() else []


@functools.lru_cache(maxsize=1)
def _fold_model(name: str) -> Any:
    return load_model(CV / name, device="cpu", engine="torch")  # no ONNX files are kept for the fold models


def _inverted(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = from_canon_mask(data, affine)
    return np.where(mask, float(data[mask].max()) - data, 0.0).astype(np.float32), affine


def _noise(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = from_canon_mask(data, affine)
    level = float(np.percentile(data[mask], 99.5))
    rng = np.random.default_rng(0)
    return np.where(mask, rng.uniform(0.0, level, data.shape), 0.0).astype(np.float32), affine


def from_canon_mask(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The head mask of *data* in its own axes."""
    canon, _ = to_canonical(data, affine)
    inverse = nio.ornt_transform(nio.axcodes2ornt(CANONICAL), nio.io_orientation(affine))
    return np.asarray(nio.apply_orientation(head_mask(canon), inverse), dtype=bool)


def _sagittal_5mm(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sagittal slices 5 mm thick (each the mean of five 1 mm planes), as a sagittal 2-D acquisition stores them:
    columns towards posterior, rows towards inferior, slices towards the right."""
    canon, caff = to_canonical(data, affine)
    n = canon.shape[0] // 5 * 5
    thick = canon[:n].reshape(n // 5, 5, *canon.shape[1:]).mean(axis=1)
    taff = caff.copy()
    taff[:3, 3] = caff[:3, :3] @ np.array([2.0, 0.0, 0.0]) + caff[:3, 3]
    taff[:3, 0] = caff[:3, 0] * 5
    t = nio.ornt_transform(nio.axcodes2ornt(CANONICAL), nio.axcodes2ornt(("P", "I", "R")))
    return np.asarray(nio.apply_orientation(thick, t), dtype=np.float32), taff @ nio.inv_ornt_aff(t, thick.shape)


CASES: dict[str, tuple[str, Path, str, dict[str, Any], Callable[..., tuple[np.ndarray, np.ndarray]] | None]] = {
    # name: (direction, volume, sent as, tags, transform)
    "T1c sent as T1 with contrast tags": ("t1-to-t2", OOD / "T1c.nii.gz", "T1", CONTRAST_TAGS, None),
    "T1c sent as T1 without contrast tags": ("t1-to-t2", OOD / "T1c.nii.gz", "T1", {}, None),
    "FLAIR sent as T2 with inversion tags": ("t2-to-t1", OOD / "FLAIR.nii.gz", "T2", FLAIR_AS_T2_TAGS, None),
    "FLAIR sent as T2 without inversion tags": ("t2-to-t1", OOD / "FLAIR.nii.gz", "T2", {}, None),
    "T1 resliced to sagittal 5 mm": ("t1-to-t2", MRI / SUBJECT / "T1.nii.gz", "T1", {}, _sagittal_5mm),
    "T1 with inverted intensities": ("t1-to-t2", MRI / SUBJECT / "T1.nii.gz", "T1", {}, _inverted),
    "noise inside a head-shaped mask": ("t1-to-t2", MRI / SUBJECT / "T1.nii.gz", "T1", {}, _noise),
}
# the cause each out-of-distribution case must name: (check, words in its reason)
CAUSES = {
    "T1c sent as T1 with contrast tags": ("contrast_agent", "contrast agent given"),
    "T1c sent as T1 without contrast tags": ("intensity_histogram", "intensities unlike the training data"),
    "FLAIR sent as T2 with inversion tags": ("inversion_recovery", "FLAIR-like"),
    "T1 resliced to sagittal 5 mm": ("slice_geometry", "sagittal-like slices"),
    "T1 with inverted intensities": ("tissue_order", "tissue contrast order unlike any training T1"),
    "noise inside a head-shaped mask": ("spatial_structure", "no image structure"),
}


def run_series(direction: str, path: Path, weighting: str, tags: dict[str, Any], tmp: Path,
               transform: Callable[..., tuple[np.ndarray, np.ndarray]] | None = None, model: Any = None) -> QCResult:
    """The volume as a DICOM series through the node's loader, then both kinds of QC check (with *model*, the
    shipped one by default), summarized."""
    vol = load_volume(path)
    data, affine = (vol.data, vol.affine) if transform is None else transform(vol.data, vol.affine)
    datasets = series_from_volume(data, affine, weighting, **tags)
    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = tmp / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    series = load_series(paths)
    result = assess(model or _model(direction), series.nifti_order(), series.affine_ras())
    return summarize(list(result.checks) + header_checks(datasets, Direction(direction)))


def _values(result: QCResult) -> str:
    return ", ".join(f"{c.name} {c.value:.3g} {c.verdict.value}" for c in result.checks)


@pytest.mark.parametrize("direction,subject", [(d, s) for d in ("t1-to-t2", "t2-to-t1") for s in unseen_subjects(d)])
def test_every_real_subject_the_shipped_model_did_not_see_passes(direction: str, subject: str, tmp_path: Path) -> None:
    contrast = Direction(direction).source.value
    result = run_series(direction, MRI / subject / f"{contrast}.nii.gz", contrast, {}, tmp_path)
    assert result.verdict is Verdict.PASS, f"{subject}: {result.reasons} ({_values(result)})"
    assert "tissue_order" in {c.name for c in result.checks}  # the shipped references carry its bounds


def test_the_unseen_subjects_are_the_three_the_shipped_models_held_out() -> None:
    for direction in ("t1-to-t2", "t2-to-t1"):
        if not unseen_subjects(direction):  # a shipped model trained on every subject: its fold models stand in
            assert fold_models(direction), direction
            continue
        assert unseen_subjects(direction) == ["brats_sri24_case", "openms_long_patient03_study2", "openms_mni_patient19"]


@pytest.mark.parametrize("direction,fold,subject", cv_cases())
def test_every_real_subject_passes_by_the_fold_model_that_never_saw_it(direction: str, fold: str, subject: str,
                                                                        tmp_path: Path) -> None:
    contrast = Direction(direction).source.value
    result = run_series(direction, MRI / subject / f"{contrast}.nii.gz", contrast, {}, tmp_path,
                        model=_fold_model(fold))
    checks = {c.name: c for c in result.checks}
    assert "largest on its training scans" in checks["flip_disagreement"].threshold  # the fold model's own thresholds
    assert result.verdict is Verdict.PASS, f"{subject} by {fold}: {result.reasons} ({_values(result)})"


@needs_shared
@pytest.mark.parametrize("direction", ["t1-to-t2", "t2-to-t1"])
def test_the_fold_models_hold_out_every_real_subject_once(direction: str) -> None:
    held = [s for d, _, s in cv_cases() if d == direction]
    assert sorted(held) == real_subjects(), f"{direction}: {held}"
    for path in fold_models(direction):
        training = _fold_meta(path)["training"]
        assert not set(training["val_subjects"]) & set(training["train_subjects"])


@pytest.mark.parametrize("case", list(CAUSES))
def test_out_of_distribution_input_is_at_least_warn_and_names_the_cause(case: str, tmp_path: Path) -> None:
    direction, path, weighting, tags, transform = CASES[case]
    result = run_series(direction, path, weighting, tags, tmp_path, transform)
    check, words = CAUSES[case]
    assert result.verdict is not Verdict.PASS, f"{case}: {_values(result)}"
    flagged = {c.name: c for c in result.checks if c.verdict is not Verdict.PASS}
    assert check in flagged, f"{case}: {check} passed ({_values(result)})"
    assert words in flagged[check].reason


def test_an_inverted_t1_is_beyond_the_tissue_order_bound_by_a_clear_margin(tmp_path: Path) -> None:
    """The histogram distance of this case cleared its threshold by 0.0003; the tissue order must do better."""
    direction, path, weighting, tags, transform = CASES["T1 with inverted intensities"]
    result = run_series(direction, path, weighting, tags, tmp_path, transform)
    lo, hi = _model(direction).metadata["qc_reference"]["quartile_skewness"]
    bound = hi + max(TISSUE_ORDER_SLACK * (hi - lo), TISSUE_ORDER_FLOOR)
    order = {c.name: c for c in result.checks}["tissue_order"]
    assert order.verdict is Verdict.WARN and "intensities inverted" in order.reason
    assert order.value > bound + 0.1, f"tissue order {order.value:.3g}, warn bound {bound:.3g}"


def main() -> None:
    """Print the QC of every case (unseen subjects, seen subjects, out-of-distribution) as Markdown rows."""
    import tempfile

    def row(name: str, result: QCResult) -> None:
        print(f"| {name} | {result.verdict.value} | {_values(result)} |", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for direction in ("t1-to-t2", "t2-to-t1"):
            contrast = Direction(direction).source.value
            for s in unseen_subjects(direction):
                row(f"{direction} unseen {s}", run_series(direction, MRI / s / f"{contrast}.nii.gz", contrast, {},
                                                          Path(tmp) / f"{direction}-{s}"))
        for direction, fold, s in cv_cases():
            contrast = Direction(direction).source.value
            row(f"{direction} {s} by {fold}", run_series(direction, MRI / s / f"{contrast}.nii.gz", contrast, {},
                                                         Path(tmp) / f"cv-{direction}-{s}", model=_fold_model(fold)))
        for case, (direction, path, weighting, tags, transform) in CASES.items():
            row(f"{direction} {case}", run_series(direction, path, weighting, tags, Path(tmp) / case, transform))
        for direction in ("t1-to-t2", "t2-to-t1"):
            contrast = Direction(direction).source.value
            for s in seen_subjects(direction):
                row(f"{direction} seen {s}", run_series(direction, MRI / s / f"{contrast}.nii.gz", contrast, {},
                                                        Path(tmp) / f"{direction}-{s}"))

if __name__ == "__main__":
    main()

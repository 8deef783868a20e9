"""ml.qc: the input is compared with what the model was trained on, and the prediction's stability measured.

Specification: every check has a name, a value, a threshold and a verdict; the summary is
the worst verdict with the reasons of the checks that did not pass.  An input like the
training data passes; inverted intensities, a sagittal thick-slice acquisition and noise
inside a head-shaped mask are named as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml.data import InputNorm, head_mask, input_volume, to_canonical
from ml.inference import assess, load_model
from ml.qc import Check, Verdict, check_input, input_reference, summarize
from test_ml_units import _head, _tiny_checkpoint

AXIAL = np.diag([-1.0, -1.0, 3.0, 1.0])


def _input(vol: np.ndarray, affine: np.ndarray = AXIAL):  # type: ignore[no-untyped-def]
    canon, caff = to_canonical(vol.astype(np.float32), affine)
    mask = head_mask(canon)
    return input_volume(canon, mask, InputNorm.TISSUE_PEAK), mask, caff, affine


def _reference() -> dict:
    return input_reference([_input(_head((16, 48, 40), seed=s)) for s in range(3)])


def _verdicts(checks: list[Check]) -> dict[str, Verdict]:
    return {c.name: c.verdict for c in checks}


def test_an_input_like_the_training_data_passes() -> None:
    result = summarize(check_input(_input(_head((16, 48, 40), seed=7)), _reference()))
    assert result.verdict is Verdict.PASS and result.reasons == ()
    assert set(result.to_dict()["checks"]) == {"intensity_histogram", "head_fraction", "in_plane_voxel",
                                               "slice_thickness", "in_plane_size", "orientation"}


def test_inverted_intensities_fail_the_histogram_check() -> None:
    vol = _head((16, 48, 40), seed=7)
    head = vol > 0
    inverted = np.where(head, vol.max() + 100 - vol, 0)
    result = summarize(check_input(_input(inverted), _reference()))
    assert _verdicts(list(result.checks))["intensity_histogram"] is not Verdict.PASS
    assert any("intensities unlike the training data" in r for r in result.reasons)


def test_noise_inside_a_head_shaped_mask_is_flagged() -> None:
    vol = _head((16, 48, 40), seed=7)
    noise = np.where(vol > 0, np.random.default_rng(0).uniform(1, 1500, vol.shape), 0)
    result = summarize(check_input(_input(noise), _reference()))
    assert result.verdict is not Verdict.PASS and "intensity_histogram" in [c.name for c in result.checks
                                                                           if c.verdict is not Verdict.PASS]


def test_a_sagittal_thick_slice_acquisition_is_named() -> None:
    vol = _head((16, 48, 40), seed=7)
    sagittal = np.array([[0, 0, -5.0, 0], [-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])  # slices along L-R, 5 mm
    result = summarize(check_input(_input(vol, sagittal), _reference()))
    bad = {c.name for c in result.checks if c.verdict is not Verdict.PASS}
    assert {"orientation", "in_plane_voxel"} <= bad
    assert any("from axial" in r for r in result.reasons)


def test_assess_reports_flip_disagreement_and_uses_the_checkpoint_reference(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck")
    model = load_model(ck, device="cpu")
    result = assess(model, _head((12, 40, 36)), AXIAL)
    checks = result.to_dict()["checks"]
    assert list(checks) == ["flip_disagreement"]  # this checkpoint has no training reference
    assert checks["flip_disagreement"]["value"] >= 0 and checks["flip_disagreement"]["verdict"] in ("pass", "warn", "fail")
    model.metadata["qc_reference"] = _reference()
    assert "intensity_histogram" in assess(model, _head((12, 40, 36)), AXIAL).to_dict()["checks"]

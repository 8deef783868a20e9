"""ml.qc: the input is compared with what the model was trained on, and the prediction's stability measured.

Specification: every check has a name, a value, a threshold and a verdict; the summary is
the worst verdict with the reasons of the checks that did not pass.  An input like the
training data passes; inverted intensities, a sagittal thick-slice acquisition and noise
inside a head-shaped mask are named as such (noise by the spatial-structure check: neighbouring voxels of an image
correlate, those of noise do not; it fails below a quarter of the least structured training volume); a T1 whose
tissue contrast order is reversed (the bulk of the head dark, a minority bright) is named by the tissue-order check, whose bounds come from the training volumes only, and
a reference from before that check skips it.  The histogram is compared in percentile units (each input divided by
its own 99.5th percentile inside the head mask), whatever the network's input scaling: a bright tail that
tissue-peak scaling hides (a post-contrast T1 without its tags) moves the whole histogram there; a reference from
before, without ``histogram_units``, is compared in the units it was made in.  It warns beyond the training scans'
largest distance to their nearest other training scan, widened by half the spread of those distances (the
tissue-order rule), and fails beyond three times that largest distance.  The flip check's thresholds belong to the model: multiples of the
flip disagreement it shows on its own training scans (stored by training, measured exactly as the node measures a
scan), fixed thresholds for a checkpoint without that figure, and ``[qc]`` values replace them when set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ml.data import InputNorm, head_mask, input_volume, to_canonical
from ml.inference import assess, flip_reference, load_model
from ml.qc import (BINS, FLIP_FAIL_FACTOR, FLIP_FAIL_FIXED, FLIP_WARN_FACTOR, FLIP_WARN_FIXED, HIST_RANGE,
                   HISTOGRAM_FLOOR, HISTOGRAM_UNITS,
                   STRUCTURE_FAIL_FACTOR, STRUCTURE_WARN_FACTOR, TISSUE_ORDER_FLOOR, TISSUE_ORDER_SLACK, Check, Verdict,
                   check_input, flip_thresholds, histogram_thresholds, input_reference, percentile_units, quartile_skewness,
                   spatial_correlation, summarize)
from test_ml_units import _head, _tiny_checkpoint

AXIAL = np.diag([-1.0, -1.0, 3.0, 1.0])


def _input(vol: np.ndarray, affine: np.ndarray = AXIAL):  # type: ignore[no-untyped-def]
    canon, caff = to_canonical(vol.astype(np.float32), affine)
    mask = head_mask(canon)
    return input_volume(canon, mask, InputNorm.TISSUE_PEAK), mask, caff, affine


def _reference() -> dict:
    return input_reference([_input(_head((16, 48, 40), seed=s)) for s in range(3)])


def _t1_like(shape: tuple[int, int, int] = (40, 48, 16), seed: int = 0) -> np.ndarray:
    """A ball whose bulk is bright (a T1's brain tissue) and whose rim is dark (fluid): intensity falls as a high
    power of the radius, so most voxels lie near the bright end; a little noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1.15, 1.15, n) for n in shape), indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    tissue = 1000.0 - 700.0 * r ** rng.uniform(5.0, 7.0) + rng.normal(0.0, 20.0, shape)
    return np.where(r < 1.0, tissue, 0.0).astype(np.float32)


def _t1_reference() -> dict:
    return input_reference([_input(_t1_like(seed=s)) for s in range(3)], contrast="T1")


def _verdicts(checks: list[Check]) -> dict[str, Verdict]:
    return {c.name: c.verdict for c in checks}


def test_an_input_like_the_training_data_passes() -> None:
    result = summarize(check_input(_input(_head((16, 48, 40), seed=7)), _reference()))
    assert result.verdict is Verdict.PASS and result.reasons == ()
    assert set(result.to_dict()["checks"]) == {"intensity_histogram", "tissue_order", "spatial_structure",
                                               "head_fraction", "in_plane_voxel", "slice_thickness", "in_plane_size",
                                               "orientation"}


def test_inverted_intensities_fail_the_histogram_check() -> None:
    vol = _head((16, 48, 40), seed=7)
    head = vol > 0
    inverted = np.where(head, vol.max() + 100 - vol, 0)
    result = summarize(check_input(_input(inverted), _reference()))
    assert _verdicts(list(result.checks))["intensity_histogram"] is not Verdict.PASS
    assert any("intensities unlike the training data" in r for r in result.reasons)


def test_quartile_skewness_is_negative_when_the_bulk_is_bright_and_inversion_negates_it() -> None:
    rng = np.random.default_rng(0)
    bright_bulk = 1000.0 - 700.0 * rng.beta(1.5, 5.0, (30, 30, 30))  # most values near 1000, a tail towards 300
    everywhere = np.ones(bright_bulk.shape, dtype=bool)
    value = quartile_skewness(bright_bulk, everywhere)
    assert value < -0.1
    assert quartile_skewness(1400.0 - bright_bulk, everywhere) == pytest.approx(-value)
    assert quartile_skewness(np.full((4, 4, 4), 5.0), np.ones((4, 4, 4), bool)) == 0.0  # no spread: no order
    assert quartile_skewness(bright_bulk, ~everywhere) == 0.0  # empty mask


def test_the_tissue_order_bounds_are_the_training_range_widened_by_half_its_width() -> None:
    ref = _t1_reference()
    values = [quartile_skewness(*_input(_t1_like(seed=s))[:2]) for s in range(3)]
    assert ref["quartile_skewness"] == [pytest.approx(min(values)), pytest.approx(max(values))]
    assert ref["contrast"] == "T1"
    lo, hi = ref["quartile_skewness"]
    slack = max(TISSUE_ORDER_SLACK * (hi - lo), TISSUE_ORDER_FLOOR)
    check = {c.name: c for c in check_input(_input(_t1_like(seed=7)), ref)}["tissue_order"]
    assert check.threshold == f"warn outside [{lo - slack:+.3g}, {hi + slack:+.3g}]"


def test_an_inverted_t1_is_named_by_the_tissue_order_check() -> None:
    ref = _t1_reference()
    vol = _t1_like(seed=7)
    assert _verdicts(check_input(_input(vol), ref))["tissue_order"] is Verdict.PASS
    inverted = np.where(vol > 0, 1400.0 - vol, 0.0)
    checks = {c.name: c for c in check_input(_input(inverted), ref)}
    order = checks["tissue_order"]
    assert order.verdict is Verdict.WARN and order.value > 0 > ref["quartile_skewness"][1]
    assert order.reason.startswith("tissue contrast order unlike any training T1: the bulk of the head is dark")
    assert "intensities inverted" in order.reason


def test_a_reference_from_before_the_tissue_order_check_skips_it() -> None:
    ref = _t1_reference()
    del ref["quartile_skewness"], ref["contrast"]
    vol = _t1_like(seed=7)
    names = [c.name for c in check_input(_input(np.where(vol > 0, 1400.0 - vol, 0.0)), ref)]
    assert "tissue_order" not in names and "intensity_histogram" in names


def test_noise_inside_a_head_shaped_mask_is_flagged() -> None:
    vol = _head((16, 48, 40), seed=7)
    noise = np.where(vol > 0, np.random.default_rng(0).uniform(1, 1500, vol.shape), 0)
    result = summarize(check_input(_input(noise), _reference()))
    assert result.verdict is not Verdict.PASS and "intensity_histogram" in [c.name for c in result.checks
                                                                           if c.verdict is not Verdict.PASS]


def test_spatial_correlation_is_high_for_a_smooth_image_and_about_zero_for_noise() -> None:
    rng = np.random.default_rng(1)
    x, y, _ = np.meshgrid(*(np.arange(n) for n in (40, 48, 6)), indexing="ij")
    smooth = np.sin(x / 5.0) + np.cos(y / 7.0)
    mask = np.ones(smooth.shape, dtype=bool)
    assert spatial_correlation(smooth, mask) > 0.95
    assert abs(spatial_correlation(rng.normal(size=smooth.shape), mask)) < 0.05
    stripes = np.where(x % 2 == 0, 1.0, -1.0)  # neighbours: opposite along axis 0 (r = -1), equal along axis 1 (+1)
    assert spatial_correlation(stripes, mask) == pytest.approx(0.0, abs=1e-9)  # the mean of the two in-plane axes
    assert spatial_correlation(np.full(smooth.shape, 3.0), mask) == 0.0  # no variation
    assert spatial_correlation(smooth, np.zeros_like(mask)) == 0.0  # empty mask


def test_noise_is_named_by_the_spatial_structure_check_with_the_training_bounds() -> None:
    ref = _reference()
    low = ref["spatial_correlation"][0]
    assert low == pytest.approx(min(spatial_correlation(*_input(_head((16, 48, 40), seed=s))[:2]) for s in range(3)),
                                abs=1e-6)
    vol = _head((16, 48, 40), seed=7)
    image = {c.name: c for c in check_input(_input(vol), ref)}["spatial_structure"]
    assert image.verdict is Verdict.PASS
    assert image.threshold == f"warn < {STRUCTURE_WARN_FACTOR * low:.3g}, fail < {STRUCTURE_FAIL_FACTOR * low:.3g}"
    noise = np.where(vol > 0, np.random.default_rng(0).uniform(1, 1500, vol.shape), 0)
    check = {c.name: c for c in check_input(_input(noise), ref)}["spatial_structure"]
    assert check.verdict is Verdict.FAIL and check.value < 0.1
    assert check.reason.startswith("no image structure: neighbouring voxels correlate at r = ")
    del ref["spatial_correlation"]  # a reference from before the check: skipped
    assert "spatial_structure" not in [c.name for c in check_input(_input(noise), ref)]


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


def test_the_flip_thresholds_are_multiples_of_the_models_own_training_figure() -> None:
    top = 0.04
    warn, fail, basis = flip_thresholds({"flip_disagreement_max": top})
    assert (warn, fail) == (pytest.approx(FLIP_WARN_FACTOR * top), pytest.approx(FLIP_FAIL_FACTOR * top))
    assert basis == "2 and 5 x the model's largest on its training scans, 0.04"
    fixed = (FLIP_WARN_FIXED, FLIP_FAIL_FIXED, "fixed: the checkpoint has no training figure")
    assert flip_thresholds({"histogram": [1.0]}) == fixed  # a reference stored before the figure existed
    assert flip_thresholds(None) == fixed
    both = "[qc] flip_warn / flip_fail"
    assert flip_thresholds({"flip_disagreement_max": top}, warn=0.3, fail=0.6) == (0.3, 0.6, both)
    own = "2 and 5 x the model's largest on its training scans, 0.04"
    assert flip_thresholds({"flip_disagreement_max": top}, warn=0.5) == (0.5, 0.5, f"[qc] flip_warn; fail: {own}")
    assert flip_thresholds({"flip_disagreement_max": top}, fail=0.3) == (pytest.approx(FLIP_WARN_FACTOR * top), 0.3,
                                                                          f"[qc] flip_fail; warn: {own}")
    assert flip_thresholds(None, fail=0.3)[2] == "[qc] flip_fail; warn: fixed: the checkpoint has no training figure"


def test_the_training_flip_figure_is_measured_as_the_node_measures_a_scan(tmp_path: Path) -> None:
    model = load_model(_tiny_checkpoint(tmp_path / "ck"), device="cpu")
    scans = [_head((12, 40, 36), seed=s) for s in range(2)]
    inputs = []
    for v in scans:  # as training scales them: canonical, in the model's input scaling, inside the head mask
        canon, _ = to_canonical(v.astype(np.float32), AXIAL)
        mask = head_mask(canon)
        inputs.append((input_volume(canon, mask, model.input_norm), mask))
    figures = flip_reference(model, inputs)
    node = [assess(model, v, AXIAL).to_dict()["checks"]["flip_disagreement"]["value"] for v in scans]
    assert figures["flip_disagreement_training"] == pytest.approx(node, abs=1e-6)
    assert figures["flip_disagreement_max"] == pytest.approx(max(node), abs=1e-6) and max(node) > 0
    assert flip_reference(model, [(np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 4), bool))]) == {}  # no head


@pytest.mark.parametrize("ratio, verdict", [(1.0, "pass"), (FLIP_WARN_FACTOR + 0.5, "warn"),
                                            (FLIP_FAIL_FACTOR + 1.0, "fail")])
def test_assess_judges_the_flip_disagreement_against_the_checkpoints_training_figure(
        tmp_path: Path, ratio: float, verdict: str) -> None:
    model = load_model(_tiny_checkpoint(tmp_path / "ck"), device="cpu")
    scan = _head((12, 40, 36))
    value = assess(model, scan, AXIAL).to_dict()["checks"]["flip_disagreement"]["value"]
    model.metadata["qc_reference"] = {**_reference(), "flip_disagreement_max": value / ratio}  # value = ratio x top
    check = assess(model, scan, AXIAL).to_dict()["checks"]["flip_disagreement"]
    assert check["verdict"] == verdict and "largest on its training scans" in check["threshold"]
    assert (check["reason"] == "") == (verdict == "pass")
    if verdict != "pass":
        assert "unstable prediction" in check["reason"] and "largest on its training scans" in check["reason"]
    configured = assess(model, scan, AXIAL, flip_warn=10 * value, flip_fail=20 * value)  # [qc] replaces the model's
    assert configured.to_dict()["checks"]["flip_disagreement"]["verdict"] == "pass"


def _enhanced(vol: np.ndarray, fraction: float = 0.01, factor: float = 2.5) -> np.ndarray:
    """*vol* with smooth blobs (*fraction* of the head) *factor* times brighter: enhancing tissue and vessels."""
    from scipy import ndimage

    inside = vol > 0
    blobs = ndimage.gaussian_filter(np.random.default_rng(1).normal(size=vol.shape), 1.5)
    return np.where(inside & (blobs > np.percentile(blobs[inside], 100 * (1 - fraction))), vol * factor, vol)


def _old_units(reference: dict, volumes: list[np.ndarray]) -> dict:
    """*reference* as made before the histogram was taken in percentile units: histograms of the network input."""
    from ml.qc import _histogram

    old = {k: v for k, v in reference.items() if k != "histogram_units"}
    old["histograms"] = [_histogram(*_input(v)[:2], False).tolist() for v in volumes]
    return old


def test_percentile_units_leave_a_percentile_scaled_input_as_it_is() -> None:
    canon, _ = to_canonical(_t1_like(seed=3), AXIAL)
    mask = head_mask(canon)
    normed = input_volume(canon, mask, InputNorm.PERCENTILE)
    np.testing.assert_allclose(percentile_units(normed[mask]), normed[mask], rtol=1e-5)
    scaled = input_volume(canon, mask, InputNorm.TISSUE_PEAK)
    np.testing.assert_allclose(percentile_units(scaled[mask]), normed[mask], rtol=1e-4)


def test_a_bright_tail_that_tissue_peak_scaling_hides_fails_the_histogram_in_percentile_units() -> None:
    """A post-contrast T1 without its tags: tissue-peak scaling keeps the tissue where a native T1's is and moves
    only 1 % of the voxels; in percentile units the whole histogram moves."""
    trained = [_t1_like(seed=s) for s in range(3)]
    t1c = _enhanced(_t1_like(seed=7))
    result = summarize(check_input(_input(t1c), _t1_reference()))
    assert _verdicts(list(result.checks))["intensity_histogram"] is Verdict.FAIL
    assert any("intensities unlike the training data" in r for r in result.reasons)
    in_input_units = {c.name: c for c in check_input(_input(t1c), _old_units(_t1_reference(), trained))}
    assert in_input_units["intensity_histogram"].verdict is Verdict.PASS  # what the tissue-peak units missed
    native = {c.name: c for c in check_input(_input(_t1_like(seed=7)), _t1_reference())}
    assert native["intensity_histogram"].verdict is Verdict.PASS


def test_a_reference_without_histogram_units_is_compared_in_the_networks_input_units() -> None:
    trained = [_t1_like(seed=s) for s in range(3)]
    old = _old_units(_t1_reference(), trained)
    same = {c.name: c for c in check_input(_input(trained[0]), old)}["intensity_histogram"]
    assert same.value == pytest.approx(0.0, abs=1e-9)  # its own histogram, in its own units
    assert "histogram_units" not in old and _t1_reference()["histogram_units"] == HISTOGRAM_UNITS


def _spike(bin_index: int) -> list[float]:
    h = [0.0] * BINS
    h[bin_index] = 1.0
    return h


def test_the_histogram_thresholds_by_hand() -> None:
    width = (HIST_RANGE[1] - HIST_RANGE[0]) / BINS  # the distance of two one-bin histograms one bin apart
    # training histograms at bins 0, 10 and 30: nearest-neighbour distances 10, 10 and 20 bins
    reference = {"histograms": [_spike(0), _spike(10), _spike(30)]}
    warn, fail = histogram_thresholds(reference)
    assert warn == pytest.approx((20 + 0.5 * (20 - 10)) * width) and fail == pytest.approx(3 * 20 * width)
    # near-identical training scans: the floor
    assert histogram_thresholds({"histograms": [_spike(0), _spike(0)]}) == (HISTOGRAM_FLOOR, 3 * HISTOGRAM_FLOOR)


def test_the_histogram_check_warns_only_beyond_the_widened_training_spread() -> None:
    from ml.qc import _histogram_check

    width = (HIST_RANGE[1] - HIST_RANGE[0]) / BINS
    reference = {"histograms": [_spike(0), _spike(4), _spike(12)]}  # nn 4, 4, 8 bins: warn above 10, fail above 24
    assert 10 * width > HISTOGRAM_FLOOR
    verdicts = {k: _histogram_check(np.asarray(_spike(12 + k)), reference).verdict for k in (9, 11, 23, 25)}
    assert verdicts == {9: Verdict.PASS, 11: Verdict.WARN, 23: Verdict.WARN, 25: Verdict.FAIL}

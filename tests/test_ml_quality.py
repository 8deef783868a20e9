"""The quality metric, the cross-validation protocol and long, resumable training runs.

Specification: the figure of merit is defined in ml.metrics.quality (mask = nonzero in truth
and source, eroded once; own 99.5th-percentile scaling; PSNR over the mask; SSIM per axial
slice on the mask's bounding box).  Folds are made of patients, never slices.  A training can
stop on a time budget and resume where it stopped, to the same weights as a run that never
stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage.metrics import structural_similarity

from dicom_node.cli import cli
from ml.data import INPUT_CLIP, InputNorm, fragmentary_slices, input_volume, thick_stack, tissue_peak
from ml.folds import FoldError, real_subjects, subject_folds, subject_group
from ml.losses import ssim
from ml.metrics import quality, quality_mask, reference_blur, reference_shift
from test_ml_cli import TINY_NET, _make_paired  # noqa: E402  (shared generated data)


# --------------------------------------------------------------------- the metric

def _block(shape: tuple[int, int, int] = (16, 16, 3)) -> np.ndarray:
    v = np.zeros(shape)
    v[2:14, 2:14, :] = 1.0
    return v


def test_quality_mask_is_the_nonzero_intersection_eroded_once_in_3d() -> None:
    truth, source = _block(), _block()
    source[2, 2, :] = 0.0  # a corner voxel missing in the source
    m = quality_mask(truth, source)
    # 3 slices: erosion (6-connected, outside = background) leaves the middle slice's 10 x 10 interior
    assert m.sum() == 100 and m[:, :, 1].sum() == 100 and not m[:, :, 0].any() and not m[:, :, 2].any()
    assert m[3:13, 3:13, 1].all()


def test_quality_psnr_by_hand() -> None:
    truth = _block()
    pred = truth.copy()
    pred[3:8, 3:13, 1] = 0.5  # half of the 100 mask voxels predicted at half intensity
    m = quality_mask(truth, truth)
    q = quality(pred, truth, m)
    # each volume is scaled by its own 99.5th percentile in M (1.0 for both): MSE = 50 * 0.25 / 100
    assert q["psnr"] == pytest.approx(10 * math.log10(1 / 0.125))


def test_quality_ssim_is_per_axial_slice_on_the_mask_bounding_box() -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros((40, 40, 4))
    truth[5:35, 8:30, :] = rng.uniform(0.2, 1.0, (30, 22, 4))
    pred = np.clip(truth + rng.normal(0, 0.05, truth.shape) * (truth > 0), 0, None)
    m = quality_mask(truth, truth)
    q = quality(pred, truth, m)
    xs, ys, zs = np.nonzero(m)
    box = (slice(xs.min(), xs.max() + 1), slice(ys.min(), ys.max() + 1))
    p = np.clip(pred / np.percentile(pred[m], 99.5), 0, 1)
    t = np.clip(truth / np.percentile(truth[m], 99.5), 0, 1)
    expected = np.mean([structural_similarity(t[box + (k,)], p[box + (k,)], data_range=1.0, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False) for k in sorted(set(zs))])
    assert q["ssim"] == pytest.approx(expected)
    assert quality(truth, truth, m) == {"psnr": math.inf, "ssim": pytest.approx(1.0)}


def test_quality_refuses_an_empty_mask() -> None:
    with pytest.raises(ValueError, match="empty"):
        quality(np.ones((8, 8, 3)), np.zeros((8, 8, 3)), np.zeros((8, 8, 3), bool))


def test_reference_rows_shift_in_plane_and_blur_in_plane_only() -> None:
    truth = np.zeros((10, 10, 5))
    truth[4, 4, 2] = 1.0
    shifted = reference_shift(truth)
    assert shifted[5, 4, 2] == 1.0 and shifted.sum() == 1.0
    blurred = reference_blur(truth)
    assert blurred[:, :, 1].sum() == 0 and blurred[:, :, 3].sum() == 0  # nothing across slices
    assert blurred[:, :, 2].sum() == pytest.approx(1.0, rel=1e-4) and blurred[4, 4, 2] < 0.2


def test_training_ssim_equals_skimage() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (48, 40)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    ours = ssim(torch.from_numpy(b)[None, None], torch.from_numpy(a)[None, None]).item()
    ref = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ours == pytest.approx(ref, abs=1e-4)


# --------------------------------------------------------------------- data

def test_tissue_peak_harmonises_scale_and_ignores_bright_minorities() -> None:
    rng = np.random.default_rng(2)
    vol = np.zeros((30, 30, 30))
    vol[5:25, 5:25, 5:25] = rng.normal(600, 20, (20, 20, 20))  # "white matter"
    vol[5:25, 5:25, 5:7] = 2000.0  # a bright minority (scalp fat) that sets the 99.5th percentile
    mask = vol > 0
    assert tissue_peak(vol, mask) == pytest.approx(600, rel=0.05)
    a, b = input_volume(vol, mask, InputNorm.TISSUE_PEAK), input_volume(3 * vol, mask, InputNorm.TISSUE_PEAK)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert a.max() <= INPUT_CLIP


def test_fragmentary_slices_only_flag_a_failed_brain_extraction() -> None:
    z = np.arange(60)
    radius = 20 * np.sqrt(np.clip(1 - ((z - 30) / 30) ** 2, 0, 1))  # an intact ellipsoidal brain
    yy, xx = np.mgrid[:50, :50]
    intact = np.stack([(yy - 25) ** 2 + (xx - 25) ** 2 < r**2 for r in radius], axis=2)
    assert fragmentary_slices(intact) == []
    broken = intact.copy()
    for k in range(4, 20):  # the lowest third lost all but a fragment
        broken[:, :, k] = ((yy - 25) ** 2 + (xx - 25) ** 2) < 4**2
    frag = fragmentary_slices(broken)
    assert set(range(4, 20)) <= set(frag) and max(frag) < 30


def test_thick_stack_averages_neighbours_a_thickness_apart() -> None:
    vol = np.broadcast_to(np.arange(20, dtype=np.float32), (4, 4, 20)).copy()
    s = thick_stack(vol, 10, 1, 3)
    assert s.shape == (3, 4, 4)
    assert [float(c[0, 0]) for c in s] == [7.0, 10.0, 13.0]  # means of 6-8, 9-11 (centred on 10), 12-14


# --------------------------------------------------------------------- folds

NAMES = ["a", "b", "c", "p1_study1", "p1_study2", "d", "mni152_template"]


def test_folds_are_made_of_patients() -> None:
    subjects = real_subjects(NAMES)
    assert "mni152_template" not in subjects
    for k in (2, 3, None):
        folds = subject_folds(subjects, k)
        held = [n for f in folds for n in f.val]
        assert sorted(held) == sorted(subjects)  # every subject held out exactly once
        for f in folds:
            assert not set(f.train) & set(f.val)
            assert {subject_group(n) for n in f.train}.isdisjoint({subject_group(n) for n in f.val})
    assert len(subject_folds(subjects, None)) == 5  # leave one patient out: p1's two studies are one patient
    assert subject_folds(subjects, 3, seed=4) == subject_folds(subjects, 3, seed=4)


def test_folds_refuse_impossible_splits() -> None:
    with pytest.raises(FoldError, match="at least 9 patients"):
        subject_folds(real_subjects(NAMES), 9)
    with pytest.raises(FoldError, match=">= 2"):
        subject_folds(["a", "b"], 1)


# --------------------------------------------------------------------- long runs

def _cfg(data: Path, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    from ml.train import TrainConfig

    base = dict(data=data, out=out, val_subjects=("sub2",), epochs=2, batch_size=2, crop=32, steps_per_epoch=3,
                device="cpu", network={"base_width": 4, "depth": 2, "context_slices": 1}, loss="l1+ssim",
                input_norm="tissue-peak", mri_augment=True, val_every=2)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_time_budget_stops_mid_epoch_and_resume_gives_the_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    straight = train(_cfg(data, tmp_path / "straight"))
    assert straight.finished
    stopped = train(_cfg(data, tmp_path / "budget", time_budget=1e-6))
    assert not stopped.finished and (stopped.epochs_completed, stopped.step_in_epoch) == (0, 1)
    meta = json.loads((tmp_path / "budget" / "model.json").read_text())
    assert meta["unfinished"] == {"epoch": 1, "step": 1}
    resumed = train(_cfg(data, tmp_path / "budget", resume=True))
    assert resumed.finished and resumed.epochs_completed == 2
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "budget" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "budget" / "model.json").read_text())
    assert "unfinished" not in meta and meta["training"]["compute_seconds"] > 0
    assert meta["input_normalization"] == {"method": "tissue-peak"} and meta["training"]["loss"] == "l1+ssim"


def test_resume_with_more_epochs_anneals_over_the_longer_run(tmp_path: Path) -> None:
    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    train(_cfg(data, tmp_path / "ck", epochs=1, val_every=1))
    longer = train(_cfg(data, tmp_path / "ck", epochs=2, resume=True, val_every=1))
    assert longer.finished and longer.epochs_completed == 2
    state = torch.load(tmp_path / "ck" / "resume.pt", weights_only=False)
    (group,) = state["opt"]["param_groups"]
    # the end of the longer run is the bottom of its cosine (the old run's schedule would be back at the top)
    assert group["lr"] == pytest.approx(group["initial_lr"] * 0.02)


def test_resume_accepts_a_state_saved_with_its_epoch_count_in_the_recipe(tmp_path: Path) -> None:
    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    train(_cfg(data, tmp_path / "ck", time_budget=1e-6))
    state_path = tmp_path / "ck" / "resume.pt"
    state = torch.load(state_path, weights_only=False)
    state["recipe"]["epochs"] = 2  # how states were saved before --epochs could grow
    torch.save(state, state_path)
    assert train(_cfg(data, tmp_path / "ck", resume=True)).finished


def test_resume_refuses_another_recipe(tmp_path: Path) -> None:
    from ml.train import TrainError, train

    data = _make_paired(tmp_path / "mri")
    train(_cfg(data, tmp_path / "ck", time_budget=1e-6))
    with pytest.raises(TrainError, match="another recipe"):
        train(_cfg(data, tmp_path / "ck", resume=True, loss="l1"))


def test_cross_validated_train_and_evaluate_through_the_cli(tmp_path: Path) -> None:
    data = _make_paired(tmp_path / "mri")
    ck = tmp_path / "cv"
    run = CliRunner()
    args = ["train", "--data", str(data), "--folds", "--batch-size", "2", "--crop", "32", "--steps-per-epoch", "2",
            "--epochs", "1", "--network", TINY_NET, "--device", "cpu", "--out", str(ck), "--loss", "l1+ssim"]
    r = run.invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    split = json.loads((ck / "folds.json").read_text())["folds"]
    assert [f["val"] for f in split] and sorted(n for f in split for n in f["val"]) == ["sub0", "sub1", "sub2"]
    r = run.invoke(cli, args, catch_exceptions=False)  # a second run must not overwrite silently
    assert r.exit_code == 2 and "--resume" in r.output
    out = tmp_path / "cv.json"
    r = run.invoke(cli, ["evaluate", "--checkpoint", str(ck), "--folds", "3", "--data", str(data), "--device", "cpu",
                         "--json", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "quality metric" in r.output and "reference_blur1" in r.output
    res = json.loads(out.read_text())
    assert sorted(res["subjects"]) == ["sub0", "sub1", "sub2"]
    for name, row in res["subjects"].items():
        fold = next(f for f in split if name in f["val"])
        assert row["fold"] == f"fold-{fold['fold']}"  # scored by the one model that never saw it
        for method in ("model", "inverted_source", "histogram_matched_source", "reference_shift1", "reference_blur1"):
            assert np.isfinite(row[method]["q_psnr"]) and 0 < row[method]["q_ssim"] <= 1
    assert set(res["sd_held_out"]["model"]) >= {"q_psnr", "q_ssim"}
    for row in res["subjects"].values():  # the QC verdict stands beside the real error
        assert row["qc"]["verdict"] in ("pass", "warn", "fail") and "flip_disagreement" in row["qc"]["checks"]
    r = run.invoke(cli, ["evaluate", "--checkpoint", str(ck), "--folds", "4", "--data", str(data), "--device", "cpu"])
    assert r.exit_code == 2 and "fold-4" in r.output


def test_tissue_peak_targets_are_on_one_tissue_scale_in_unit_range() -> None:
    from ml.data import TARGET_SPAN, target_volume

    rng = np.random.default_rng(3)
    vol = np.zeros((30, 30, 30))
    vol[5:25, 5:25, 5:25] = rng.normal(500, 15, (20, 20, 20))  # "grey matter"
    vol[12:18, 12:18, 5:25] = 1800.0  # "CSF", 3.6x the tissue peak
    mask = vol > 0
    a, div = target_volume(vol, mask, InputNorm.TISSUE_PEAK)
    b, div3 = target_volume(3 * vol, mask, InputNorm.TISSUE_PEAK)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    assert div3 == pytest.approx(3 * div) and div == pytest.approx(TARGET_SPAN * 500, rel=0.05)
    assert 0.0 <= a.min() and a.max() <= 1.0 and a[15, 15, 15] == pytest.approx(1800 / div)


def test_training_with_tissue_peak_targets_records_them(tmp_path: Path) -> None:
    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    r = train(_cfg(data, tmp_path / "ck", epochs=1, target_norm="tissue-peak"))
    meta = json.loads((r.out / "model.json").read_text())
    assert meta["target_normalization"] == {"method": "tissue-peak", "span": 5.0}
    assert meta["output_scale"] > 0 and (r.out / "model.onnx").is_file()
    ref = meta["qc_reference"]  # the finished model's flip disagreement on its own training scans, for the QC
    assert len(ref["flip_disagreement_training"]) == ref["n_volumes"] == len(meta["training"]["train_subjects"])
    assert ref["flip_disagreement_max"] == max(ref["flip_disagreement_training"]) > 0


def test_force_removes_the_training_and_nothing_else(tmp_path: Path) -> None:
    data = _make_paired(tmp_path / "mri")
    out = tmp_path / "ck"
    out.mkdir()
    (out / "notes.txt").write_text("the researcher's own file")
    args = ["train", "--data", str(data), "--val-subjects", "sub2", "--batch-size", "2", "--crop", "32",
            "--steps-per-epoch", "1", "--epochs", "1", "--network", TINY_NET, "--device", "cpu", "--out", str(out)]
    run = CliRunner()
    assert run.invoke(cli, args, catch_exceptions=False).exit_code == 2  # not empty: refused
    assert run.invoke(cli, [*args, "--force"], catch_exceptions=False).exit_code == 0
    first = (out / "model.json").read_text()
    assert run.invoke(cli, [*args, "--force", "--seed", "1"], catch_exceptions=False).exit_code == 0
    assert (out / "model.json").read_text() != first and (out / "notes.txt").read_text() == "the researcher's own file"

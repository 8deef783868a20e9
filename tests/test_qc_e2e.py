"""End to end: every synthetic series is quality-controlled, and the verdict decides what happens with it.

Real processes on loopback: ``dicomnode serve`` with a worker, dcmtk ``storescu`` as the scanner and
dcmtk ``storescp`` as the PACS.  The model is a tiny U-Net trained here on phantom volumes of the same
geometry as the generated series (``ml.train`` stores the training inputs' ``qc_reference``), so the
real input checks decide: an inverted-intensity series fails and is held until ``dicomnode release``;
a series of 5 mm slices (trained on 3 mm) warns and is delivered with the warning in ImageComments,
SeriesDescription and the burned-in label.  The tiny model's flip disagreement is not what is
tested here, so its thresholds are set out of the way in ``[qc]``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom import Dataset, dcmread

from dicom_node.label import label_mask
from dicomgen import SeriesSpec, make_series, phantom, write_series
from netutil import DcmtkStoreSCP, needs_dcmtk, storescu
from nodeproc import NodeProcess

pytestmark = [needs_dcmtk, pytest.mark.slow]

SHAPE = (12, 64, 64)  # slices, rows, cols of every series here: 1 mm pixels, 3 mm slices unless said otherwise


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A T1->T2 U-Net trained for a few steps on three phantom subjects (its metadata has ``qc_reference``)."""
    from ml.train import TrainConfig, train

    root = tmp_path_factory.mktemp("qcdata")
    affine = np.diag([-1.0, -1.0, 3.0, 1.0])
    for i in range(3):
        d = root / f"sub{i}"
        d.mkdir()
        for w in ("T1", "T2"):
            vol = np.transpose(phantom(SHAPE, w, seed=i), (2, 1, 0)).astype(np.int16)  # type: ignore[arg-type]
            nib.save(nib.Nifti1Image(vol, affine), d / f"{w}.nii.gz")
    out = root / "ck"
    train(TrainConfig(data=root, out=out, val_subjects=("sub2",), epochs=2, batch_size=4, crop=32, steps_per_epoch=10,
                      device="cpu", network={"base_width": 4, "depth": 2}))
    return out


def start_node(folder: Path, model: Path, scp: DcmtkStoreSCP, **qc: Any) -> NodeProcess:
    return NodeProcess(
        folder, destinations=[{"name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}],
        series={"quiet_seconds": 1.0, "min_slices": 4},
        worker={"processes": 1, "lease_seconds": 30},
        delivery={"backoff_initial_seconds": 1.0, "backoff_max_seconds": 2.0, "timeout_seconds": 10.0},
        model={"t1_to_t2": str(model), "directions": ["t1-to-t2"], "device": "cpu", "batch_size": 8},
        qc={"flip_warn": 50.0, "flip_fail": 100.0, **qc},
    ).start()


def inverted(datasets: list[Dataset]) -> list[Dataset]:
    """The same head with its intensities inverted inside it (bright where it was dark): out of distribution."""
    top = max(int(ds.pixel_array.max()) for ds in datasets) + 100
    for ds in datasets:
        px = ds.pixel_array
        ds.PixelData = np.where(px > 0, top - px.astype(np.int32), 0).astype(np.uint16).tobytes()
    return datasets


def send(node: NodeProcess, datasets: list[Dataset], folder: Path) -> str:
    res = storescu(node.port, write_series(datasets, folder))
    assert res.returncode == 0, res.stderr
    return str(datasets[0].SeriesInstanceUID)


def job_of(node: NodeProcess, series_uid: str, state: str, timeout: float = 180) -> dict[str, Any]:
    def find(st: dict[str, Any]) -> dict[str, Any] | None:
        return next((j for j in st["jobs"] if j["source_series_uid"] == series_uid and j["state"] == state), None)

    return find(node.wait_for(lambda st: find(st) is not None, timeout=timeout, what=f"a {state} job of {series_uid}"))  # type: ignore[return-value]


def delivered(scp_folder: Path, output_series_uid: str) -> list[Dataset]:
    got = [dcmread(p) for p in sorted(scp_folder.iterdir())] if scp_folder.exists() else []
    return [d for d in got if d.SeriesInstanceUID == output_series_uid]


def assert_label(ds: Dataset, text: str) -> None:
    """The burned-in label of *ds* is exactly *text*: its letters at one bright value on a black box."""
    px = ds.pixel_array
    ink, box = label_mask(int(ds.Rows), int(ds.Columns), text)
    assert px[ink].min() == px[ink].max() > 0, f"the label {text!r} is not drawn"
    assert not px[box & ~ink].any(), f"the label {text!r} is not what is drawn"


def test_a_failing_series_is_held_until_released_then_arrives_with_its_verdict(tmp_path: Path,
                                                                             tiny_model: Path) -> None:
    with DcmtkStoreSCP(tmp_path / "pacs") as scp:
        node = start_node(tmp_path / "node", tiny_model, scp)
        try:
            uid = send(node, inverted(make_series(SeriesSpec(slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2]))),
                       tmp_path / "inv")
            held = job_of(node, uid, "held")
            assert held["qc"]["verdict"] == "fail"
            assert any("intensities unlike the training data" in r for r in held["qc"]["reasons"])
            assert held["qc"]["checks"]["intensity_histogram"]["verdict"] == "fail"
            assert set(held["qc"]["checks"]) >= {"intensity_histogram", "slice_thickness", "flip_disagreement"}
            assert "qc" in held["timings"] and held["output_instances"] == SHAPE[0]
            time.sleep(2)  # a worker polls every 0.5 s: had the job been claimable, it would have been sent by now
            assert node.status("--state", "held")["jobs"][0]["id"] == held["id"]
            assert held["deliveries"] == {} and delivered(tmp_path / "pacs", held["output_series_uid"]) == []
            line = next(x for x in node.log().splitlines() if "held by QC" in x)
            assert f"job {held['id']} held by QC (fail): input intensities unlike the training data" in line
            assert "PHANTOM" not in node.log().upper()  # no patient data in the log
            table = node.cli("status").stdout
            assert "held by QC (fail)" in table and f"dicomnode release {held['id']}" in table

            wrong = node.cli("release", "424242", check=False)
            assert wrong.returncode == 2 and wrong.stderr.strip() == "dicomnode: no job 424242"
            res = node.cli("release", str(held["id"]))
            assert f"job {held['id']} released" in res.stdout
            done = job_of(node, uid, "done")
            assert done["id"] == held["id"] and done["deliveries"] == {"pacs": f"{SHAPE[0]}/{SHAPE[0]} stored"}
            assert done["qc"]["verdict"] == "fail" and done["qc"]["released_at"]
            again = node.cli("release", str(held["id"]), check=False)
            assert again.returncode == 2 and len(again.stderr.splitlines()) == 1 and "is done, not held" in again.stderr

            out = delivered(tmp_path / "pacs", done["output_series_uid"])
            assert len(out) == SHAPE[0]
            for ds in out:
                assert ds.SyntheticData == "YES" and ds.SeriesDescription.endswith(" QC FAIL")
                assert re.search(r"; QC FAIL: input intensities unlike the training data", str(ds.ImageComments))
                assert str(ds.ImageComments).startswith("SYNTHETIC IMAGE generated by AI")
            assert_label(out[0], "SYNTHETIC T2 - QC FAIL")
        finally:
            node.stop()


def test_a_warning_series_arrives_with_the_warning_in_image_comments_and_label(tmp_path: Path,
                                                                             tiny_model: Path) -> None:
    with DcmtkStoreSCP(tmp_path / "pacs") as scp:
        node = start_node(tmp_path / "node", tiny_model, scp)
        try:
            thick = send(node, make_series(SeriesSpec(slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2],
                                                      slice_spacing=5.0)), tmp_path / "thick")
            normal = send(node, make_series(SeriesSpec(slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2], seed=5)),
                          tmp_path / "normal")
            enhanced = make_series(SeriesSpec(slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2], seed=7))
            for ds in enhanced:  # a post-contrast T1: the header says so (the phantom's pixels cannot)
                ds.ContrastBolusAgent, ds.ContrastBolusRoute = "Gadobutrol", "IV"
            contrast = send(node, enhanced, tmp_path / "contrast")
            warn = job_of(node, thick, "done")
            assert warn["qc"]["verdict"] == "warn"
            assert warn["qc"]["reasons"] == ["slice spacing 5 mm outside the training range 3-3 mm"]
            assert warn["qc"]["checks"]["slice_thickness"] == {
                "value": 5.0, "threshold": "[2, 4.5] mm", "verdict": "warn",
                "reason": "slice spacing 5 mm outside the training range 3-3 mm"}
            out = delivered(tmp_path / "pacs", warn["output_series_uid"])
            assert len(out) == SHAPE[0]
            for ds in out:
                assert str(ds.ImageComments).endswith("; QC WARN: slice spacing 5 mm outside the training range 3-3 mm")
                assert ds.SeriesDescription.endswith(" QC WARN") and ds.BurnedInAnnotation == "YES"
            assert_label(out[len(out) // 2], "SYNTHETIC T2 - QC WARN")

            ok = job_of(node, normal, "done")
            assert ok["qc"]["verdict"] == "pass" and ok["qc"]["reasons"] == []
            (first, *_) = delivered(tmp_path / "pacs", ok["output_series_uid"])
            assert str(first.ImageComments).endswith("; QC PASS") and "QC" not in first.SeriesDescription
            assert_label(first, "SYNTHETIC T2")
            with pytest.raises(AssertionError):
                assert_label(first, "SYNTHETIC T2 - QC WARN")  # the check tells the labels apart

            post = job_of(node, contrast, "done")  # the header checks run in the worker's QC stage
            assert post["qc"]["verdict"] == "warn" and post["qc"]["checks"]["contrast_agent"]["verdict"] == "warn"
            (reason,) = post["qc"]["reasons"]
            assert "contrast agent given" in reason and "Gadobutrol" not in node.log()
            (first, *_) = delivered(tmp_path / "pacs", post["output_series_uid"])
            assert str(first.ImageComments).endswith(f"; QC WARN: {reason}")
        finally:
            node.stop()


def test_on_warn_hold_holds_a_warning_series_and_retry_sends_its_built_output(tmp_path: Path,
                                                                            tiny_model: Path) -> None:
    with DcmtkStoreSCP(tmp_path / "pacs") as scp:
        node = start_node(tmp_path / "node", tiny_model, scp, on_warn="hold")
        try:
            uid = send(node, make_series(SeriesSpec(slices=SHAPE[0], rows=SHAPE[1], cols=SHAPE[2],
                                                    slice_spacing=5.0)), tmp_path / "thick")
            held = job_of(node, uid, "held")
            assert held["qc"]["verdict"] == "warn" and delivered(tmp_path / "pacs", held["output_series_uid"]) == []
            res = node.cli("retry", str(held["id"]))
            assert "was held" in res.stdout and "re-sending the built output" in res.stdout
            done = job_of(node, uid, "done")
            assert len(delivered(tmp_path / "pacs", done["output_series_uid"])) == SHAPE[0]
            assert [r["state"] for r in done["previous_runs"]] == ["held"]
        finally:
            node.stop()

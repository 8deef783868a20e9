"""End to end through the real CLI: train -> evaluate -> predict on generated volumes; DDP with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from dicom_node.cli import cli
from dicomgen import phantom

TINY_NET = '{"base_width": 4, "depth": 2, "dropout": 0.0}'


def _make_paired(root: Path, n: int = 3, shape: tuple[int, int, int] = (10, 40, 36)) -> Path:
    """*n* subjects of phantom T1/T2 volumes (LPS, 1x1x3 mm) in the paired layout."""
    aff = np.diag([-1.0, -1.0, 3.0, 1.0])
    for i in range(n):
        d = root / f"sub{i}"
        d.mkdir(parents=True)
        for w in ("T1", "T2"):
            vol = np.transpose(phantom(shape, w, seed=i), (2, 1, 0)).astype(np.int16)  # type: ignore[arg-type]
            nib.save(nib.Nifti1Image(vol, aff), d / f"{w}.nii.gz")
    return root


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_paired(tmp_path_factory.mktemp("data") / "mri")


def _run(args: list[str]) -> "object":
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_train_evaluate_predict(paired: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    common = ["train", "--data", str(paired), "--val-subjects", "sub2", "--batch-size", "2", "--crop", "32",
              "--steps-per-epoch", "2", "--network", TINY_NET, "--device", "cpu", "--out", str(ck)]
    r = _run([*common, "--epochs", "1"])
    assert r.exit_code == 0, r.output
    meta = json.loads((ck / "model.json").read_text())
    assert meta["training"]["train_subjects"] == ["sub0", "sub1"] and meta["training"]["val_subjects"] == ["sub2"]
    assert "t1-to-t2" in meta["validation"]["last"]
    r = _run([*common, "--epochs", "2", "--resume"])
    assert r.exit_code == 0, r.output
    meta = json.loads((ck / "model.json").read_text())
    assert meta["epochs_completed"] == 2 and len(meta["validation"]["history"]) == 2

    out_json, png = tmp_path / "eval.json", tmp_path / "png"
    r = _run(["evaluate", "--checkpoint", str(ck), "--data", str(paired), "--json", str(out_json), "--png", str(png),
              "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "99.5th percentile" in r.output and "held out" in r.output
    res = json.loads(out_json.read_text())
    assert res["held_out_subjects"] == ["sub2"]
    for method in ("model", "inverted_source", "histogram_matched_source"):
        for key in ("mse", "mae", "psnr", "ssim", "mse_masked", "mae_masked", "psnr_masked", "ssim_masked", "paper_psnr"):
            assert np.isfinite(res["mean"][method][key])
    assert sorted(p.name for p in png.iterdir()) == ["sub0.png", "sub1.png", "sub2.png"]

    out = tmp_path / "syn.nii.gz"
    r = _run(["predict", "--checkpoint", str(ck), "--input", str(paired / "sub2" / "T1.nii.gz"), "--output", str(out),
              "--device", "cpu"])
    assert r.exit_code == 0, r.output
    img = nib.load(out)
    src = nib.load(paired / "sub2" / "T1.nii.gz")
    assert img.shape == src.shape and img.get_data_dtype() == np.uint16
    np.testing.assert_allclose(img.affine, src.affine)


def test_cyclegan_trains_and_loads_both_directions(paired: Path, tmp_path: Path) -> None:
    ck = tmp_path / "gan"
    r = _run(["train", "--model", "cyclegan", "--data", str(paired), "--val-subjects", "sub2", "--batch-size", "1",
              "--crop", "32", "--steps-per-epoch", "2", "--epochs", "2", "--device", "cpu", "--out", str(ck),
              "--network", '{"ngf": 4, "n_blocks": 1, "ndf": 4}'])
    assert r.exit_code == 0, r.output
    from ml.inference import load_model, synthesize

    vol = nib.load(paired / "sub0" / "T2.nii.gz")
    for direction in ("t1-to-t2", "t2-to-t1"):
        m = load_model(ck, direction=direction, device="cpu")
        assert m.direction == direction
        out = synthesize(m, np.asarray(vol.dataobj, dtype=np.float32), vol.affine)
        assert out.shape == vol.shape and out.dtype == np.uint16


def test_cyclegan_unpaired_layout(paired: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "unpaired"
    for w in ("T1", "T2"):
        (root / w).mkdir(parents=True)
        for i, sub in enumerate(("sub0", "sub1") if w == "T1" else ("sub1", "sub2")):
            shutil.copy(paired / sub / f"{w}.nii.gz", root / w / f"v{i}.nii.gz")
    ck = tmp_path / "gan"
    r = _run(["train", "--model", "cyclegan", "--data", str(root), "--batch-size", "1", "--crop", "32",
              "--steps-per-epoch", "1", "--epochs", "1", "--device", "cpu", "--out", str(ck),
              "--network", '{"ngf": 4, "n_blocks": 1, "ndf": 4}'])
    assert r.exit_code == 0, r.output
    meta = json.loads((ck / "model.json").read_text())
    assert meta["training"]["unpaired_volumes"] == {"T1": 2, "T2": 2}


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent/data", "--out", "X"], "data folder does not exist"),
    (["evaluate", "--checkpoint", "/nonexistent/ck", "--data", "."], "is missing"),
    (["predict", "--checkpoint", "/nonexistent/ck", "--input", "/nonexistent/T1.nii.gz", "--output", "o.nii.gz"],
     "no such file"),
    (["train", "--data", ".", "--out", "X", "--network", '{"norm": "group"}'], "norm"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1


def test_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\ndevice = 3\n")
    r = CliRunner().invoke(cli, ["predict", "--config", str(bad), "--input", "x.nii.gz", "--output", "o.nii.gz"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_missing_val_subject_is_reported(paired: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["train", "--data", str(paired), "--val-subjects", "nobody", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "nobody not found" in r.output


def test_ddp_gloo_two_processes(paired: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dicom_node.cli", "train", "--data", str(paired), "--val-subjects", "sub2", "--batch-size", "2",
           "--crop", "32", "--steps-per-epoch", "2", "--epochs", "2", "--network", TINY_NET, "--device", "cpu",
           "--out", str(ck)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((ck / "model.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["epochs_completed"] == 2


def test_interrupted_training_resumes(paired: Path, tmp_path: Path) -> None:
    """Ctrl-C (KeyboardInterrupt) saves a resume state; --resume finishes the run without redoing epochs."""
    from ml.train import TrainConfig, train

    cfg = TrainConfig(data=paired, out=tmp_path / "ck", val_subjects=("sub2",), epochs=3, batch_size=2, crop=32,
                      steps_per_epoch=2, device="cpu", network={"base_width": 4, "depth": 2})

    def stop(epoch: int, record: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_epoch=stop)
    assert (tmp_path / "ck" / "resume.pt").is_file()
    cfg.resume = True
    train(cfg)
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["epochs_completed"] == 3
    assert [h["epoch"] for h in meta["validation"]["history"]] == [1, 2, 3]


def test_log_lines_go_above_a_live_progress_bar_not_onto_it() -> None:
    """The node's logging writes to whatever sys.stderr is when it writes: a live rich progress bar
    redirects it and prints each log line on its own line above the bar."""
    import io
    import logging

    from rich.console import Console
    from rich.progress import Progress

    from dicom_node.logsetup import configure

    configure()
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=200)
    with Progress(console=console, redirect_stderr=True) as prog:
        task = prog.add_task("train", total=2)
        prog.advance(task)
        logging.getLogger("ml.train").info("a line that must stand alone")
        prog.advance(task)
    lines = [ln for ln in screen.getvalue().split("\n") if "a line that must stand alone" in ln]
    assert len(lines) == 1
    shown = lines[0].rsplit("\r\x1b[2K", 1)[-1]  # what stays on screen after the bar's line is erased
    assert "━" not in shown and shown[:4].isdigit()  # the log line alone, from its timestamp on

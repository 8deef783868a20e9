"""Warm start (``dicomnode train --init-from``): a new U-Net training that begins from a finished checkpoint's weights.

Specification: the new training starts from exactly those weights (a fresh optimizer and schedule), records where it
started in ``training.init_from``, and keeps that record through a time-budget stop and ``--resume``.  It refuses,
with one line, a checkpoint of another direction or network, and one trained on a subject the new training validates
on; the one network it takes is a wider copy (a larger ``base_width``), which starts at the checkpoint's function.  With ``--folds`` it takes a folder of fold checkpoints, each fold starting from its own, and refuses a single
checkpoint (it would have seen every fold's held-out subjects).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dicom_node.cli import cli
from ml.checkpoint import sha256_file
from test_ml_cli import TINY_NET, _make_paired  # noqa: E402  (shared generated data)
from test_ml_quality import _cfg  # noqa: E402  (the small recipe-B-like training)


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, a finished one-epoch checkpoint trained on sub0 and sub1, validated on sub2)."""
    from ml.train import train

    root = tmp_path_factory.mktemp("warm")
    data = _make_paired(root / "mri")
    r = train(_cfg(data, root / "start", epochs=1, val_every=1))
    assert r.finished
    return data, r.out


def _params(folder: Path) -> dict[str, torch.Tensor]:
    """The trained parameters (batch-norm running statistics left out: every forward pass in training moves them)."""
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if "running" not in k
            and "num_batches" not in k}


def test_a_warm_start_begins_at_the_checkpoints_weights(started: tuple[Path, Path], tmp_path: Path) -> None:
    from ml.train import train

    data, start = started
    warm = train(_cfg(data, tmp_path / "warm", epochs=1, steps_per_epoch=1, lr=1e-12, init_from=start, val_every=1))
    cold = train(_cfg(data, tmp_path / "cold", epochs=1, steps_per_epoch=1, lr=1e-12, val_every=1, seed=5))
    a, w, c = _params(start), _params(warm.out), _params(cold.out)
    for k in a:
        torch.testing.assert_close(w[k], a[k], rtol=0, atol=1e-6)
    assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-2  # a start from scratch is elsewhere
    meta = json.loads((warm.out / "model.json").read_text())
    origin = meta["training"]["init_from"]
    assert origin["weights_sha256"] == sha256_file(start / "model.safetensors")
    assert origin["name"] == "dicomnode-unet-t1-to-t2" and origin["epochs"] == 1 and origin["steps"] == 3
    assert origin["train_subjects"] == ["sub0", "sub1"] and origin["compute_seconds"] > 0
    again = train(_cfg(data, tmp_path / "again", epochs=1, steps_per_epoch=1, init_from=warm.out, val_every=1))
    chain = json.loads((again.out / "model.json").read_text())["training"]["init_from"]
    assert chain["weights_sha256"] == sha256_file(warm.out / "model.safetensors")
    assert chain["init_from"]["weights_sha256"] == origin["weights_sha256"]  # the whole lineage is kept


def test_the_start_is_kept_through_a_time_budget_stop_and_resume(started: tuple[Path, Path], tmp_path: Path) -> None:
    from ml.train import train

    data, start = started
    stopped = train(_cfg(data, tmp_path / "ck", init_from=start, time_budget=1e-6))
    assert not stopped.finished
    resumed = train(_cfg(data, tmp_path / "ck", resume=True))  # the state holds the weights and where they came from
    assert resumed.finished
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["training"]["init_from"]["weights_sha256"] == sha256_file(start / "model.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    ({"direction": "t2-to-t1"}, "is a t1-to-t2 model, this training is t2-to-t1"),
    ({"network": {"base_width": 2, "depth": 2, "context_slices": 1}}, "another network (base_width differ)"),
    ({"network": {"base_width": 8, "depth": 3, "context_slices": 1}}, "another network (base_width, depth differ)"),
    ({"input_norm": "percentile"}, "trained with --input-norm tissue-peak, not percentile"),
    ({"val_subjects": ("sub1",)}, "was trained on sub1, which this training validates on"),
])
def test_a_start_that_does_not_fit_is_refused(started: tuple[Path, Path], tmp_path: Path, change: dict[str, object],
                                              message: str) -> None:
    from ml.train import TrainError, train

    data, start = started
    with pytest.raises(TrainError, match=f"^--init-from: .*{re.escape(message)}"):
        train(_cfg(data, tmp_path / "ck", init_from=start, **change))


def test_a_wider_network_starts_at_the_checkpoints_function(started: tuple[Path, Path], tmp_path: Path) -> None:
    from ml.inference import load_model
    from ml.train import train

    data, start = started
    wide = train(_cfg(data, tmp_path / "wide", epochs=1, steps_per_epoch=1, lr=1e-12, init_from=start, val_every=1,
                      network={"base_width": 6, "depth": 2, "context_slices": 1}))
    narrow_model, wide_model = load_model(start, device="cpu"), load_model(wide.out, device="cpu")
    assert wide_model.options.base_width == 6 and narrow_model.options.base_width == 4
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = narrow_model.net(x), wide_model.net(x)
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())  # the same function, up to the copies' noise
    origin = json.loads((wide.out / "model.json").read_text())["training"]["init_from"]
    assert origin["widened_from"] == {"base_width": 4}
    assert origin["weights_sha256"] == sha256_file(start / "model.safetensors")


def test_a_cyclegan_cannot_start_from_a_checkpoint(started: tuple[Path, Path], tmp_path: Path) -> None:
    from ml.train import TrainError, train

    data, start = started
    with pytest.raises(TrainError, match="only a U-Net"):
        train(_cfg(data, tmp_path / "ck", model="cyclegan", init_from=start, network={}))


def test_each_fold_starts_from_its_own_fold_checkpoint(tmp_path: Path) -> None:
    data = _make_paired(tmp_path / "mri")
    run = CliRunner()
    args = ["train", "--data", str(data), "--folds", "3", "--batch-size", "2", "--crop", "32", "--steps-per-epoch", "1",
            "--epochs", "1", "--network", TINY_NET, "--device", "cpu"]
    assert run.invoke(cli, [*args, "--out", str(tmp_path / "cv")], catch_exceptions=False).exit_code == 0
    r = run.invoke(cli, [*args, "--out", str(tmp_path / "more"), "--init-from", str(tmp_path / "cv")],
                   catch_exceptions=False)
    assert r.exit_code == 0, r.output
    for k in (1, 2, 3):
        origin = json.loads((tmp_path / "more" / f"fold-{k}" / "model.json").read_text())["training"]["init_from"]
        assert origin["weights_sha256"] == sha256_file(tmp_path / "cv" / f"fold-{k}" / "model.safetensors")
    flat = tmp_path / "weights"  # the layout of ml/weights/cv: <stem>-fold-<i>.json + .safetensors
    flat.mkdir()
    for k in (1, 2, 3):
        for ext in ("json", "safetensors"):
            (flat / f"unet-fold-{k}.{ext}").write_bytes((tmp_path / "cv" / f"fold-{k}" / f"model.{ext}").read_bytes())
    r = run.invoke(cli, [*args, "--out", str(tmp_path / "flat"), "--init-from", str(flat / "unet")],
                   catch_exceptions=False)
    assert r.exit_code == 0, r.output
    origin = json.loads((tmp_path / "flat" / "fold-2" / "model.json").read_text())["training"]["init_from"]
    assert origin["weights_sha256"] == sha256_file(flat / "unet-fold-2.safetensors")
    r = run.invoke(cli, [*args, "--out", str(tmp_path / "one"), "--init-from", str(tmp_path / "cv" / "fold-1")],
                   catch_exceptions=False)
    assert r.exit_code == 2 and "must hold fold-1/model.json" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "one" / "fold-1").exists()  # refused before any fold trained


def test_a_second_fold_starts_beside_a_running_one_and_force_removes_only_its_own(tmp_path: Path) -> None:
    data = _make_paired(tmp_path / "mri")
    run = CliRunner()
    args = ["train", "--data", str(data), "--folds", "3", "--batch-size", "2", "--crop", "32", "--steps-per-epoch", "1",
            "--epochs", "1", "--network", TINY_NET, "--device", "cpu", "--out", str(tmp_path / "cv")]
    assert run.invoke(cli, [*args, "--fold", "1"], catch_exceptions=False).exit_code == 0
    r = run.invoke(cli, [*args, "--fold", "2"], catch_exceptions=False)  # another machine's fold: no --resume needed
    assert r.exit_code == 0, r.output
    first = (tmp_path / "cv" / "fold-1" / "model.json").read_text()
    r = run.invoke(cli, [*args, "--fold", "2"], catch_exceptions=False)  # its own folder is never overwritten silently
    assert r.exit_code == 2 and "fold-2 already holds a training" in r.output
    assert run.invoke(cli, [*args, "--fold", "2", "--force", "--seed", "0"], catch_exceptions=False).exit_code == 0
    assert (tmp_path / "cv" / "fold-1" / "model.json").read_text() == first  # --force on fold 2 left fold 1 alone

"""Training precision (ml.precision).

Specification: ``--precision auto`` trains in fp16 mixed precision on CUDA and in bf16 mixed precision on a CPU
that computes bf16 natively, fp32 otherwise; fp16 on a CPU is refused with one line.  Mixed precision changes the
arithmetic only: the weights are saved in fp32, and every epoch records the precision it ran in, so a run resumed
in another precision says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dicom_node.cli import cli
from ml.precision import Precision, cpu_has_native_bf16, emulation_warning, parse_precision, resolve_precision
from test_ml_cli import TINY_NET, _make_paired  # noqa: E402  (shared generated data)
from test_ml_quality import _cfg  # noqa: E402

CPU = torch.device("cpu")


def test_auto_is_bf16_exactly_on_cpus_with_native_bf16() -> None:
    expected = Precision.BF16 if cpu_has_native_bf16() else Precision.FP32
    assert resolve_precision("auto", CPU) is expected
    assert resolve_precision("fp32", CPU) is Precision.FP32
    assert resolve_precision(Precision.BF16, CPU) is Precision.BF16  # asked for: runs, emulated if need be


def test_bf16_asked_for_on_a_cpu_without_bf16_arithmetic_is_warned_about() -> None:
    warning = emulation_warning(Precision.BF16, CPU, native_bf16=False)
    assert warning is not None and "emulated" in warning and "--precision auto picks fp32" in warning
    assert emulation_warning(Precision.BF16, CPU, native_bf16=True) is None
    assert emulation_warning(Precision.FP32, CPU, native_bf16=False) is None
    assert emulation_warning(Precision.FP16, torch.device("cuda"), native_bf16=False) is None


def test_fp16_needs_cuda_and_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="'int8' is not one of auto, fp32, bf16, fp16"):
        parse_precision("int8")


def test_bf16_training_changes_the_arithmetic_not_the_weights_format(tmp_path: Path) -> None:
    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    runs = {p: train(_cfg(data, tmp_path / p, epochs=1, val_every=1, precision=p)) for p in ("fp32", "bf16")}
    weights = {p: load_file(r.out / "model.safetensors") for p, r in runs.items()}
    assert all(t.dtype == torch.float32 for w in weights.values() for t in w.values() if t.is_floating_point())
    differ = [k for k in weights["fp32"] if not torch.equal(weights["fp32"][k], weights["bf16"][k])]
    assert differ, "bf16 autocast left every weight bit-identical to fp32: it was not applied"
    for p, r in runs.items():
        meta = json.loads((r.out / "model.json").read_text())
        assert meta["training"]["precision"] == p
        assert [e["precision"] for e in meta["validation"]["history"]] == [p]


def test_a_bf16_training_warns_exactly_when_this_cpu_would_emulate_it(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    with caplog.at_level(logging.WARNING, logger="ml.train"):
        train(_cfg(data, tmp_path / "ck", epochs=1, val_every=1, precision="bf16"))
    warned = any("bf16 is emulated" in r.getMessage() for r in caplog.records)
    assert warned is (not cpu_has_native_bf16())


def test_a_run_resumed_in_another_precision_records_both(tmp_path: Path) -> None:
    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    train(_cfg(data, tmp_path / "ck", epochs=1, val_every=1, precision="fp32"))
    r = train(_cfg(data, tmp_path / "ck", epochs=2, val_every=1, precision="bf16", resume=True))
    assert r.finished
    meta = json.loads((r.out / "model.json").read_text())
    assert [e["precision"] for e in meta["validation"]["history"]] == ["fp32", "bf16"]
    assert meta["training"]["precision"] == "bf16"


def test_cli_refuses_fp16_on_cpu_and_a_mixed_precision_cyclegan(tmp_path: Path) -> None:
    data = _make_paired(tmp_path / "mri")
    base = ["train", "--data", str(data), "--val-subjects", "sub2", "--batch-size", "2", "--crop", "32",
            "--steps-per-epoch", "1", "--epochs", "1", "--device", "cpu"]
    run = CliRunner()
    r = run.invoke(cli, [*base, "--network", TINY_NET, "--precision", "fp16", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "fp16 needs a CUDA device" in r.output and "Traceback" not in r.output
    r = run.invoke(cli, [*base, "--model", "cyclegan", "--precision", "bf16", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "the CycleGAN trains in fp32 only" in r.output
    assert not (tmp_path / "a" / "model.json").exists() and not (tmp_path / "b" / "model.json").exists()

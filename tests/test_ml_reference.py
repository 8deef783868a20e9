"""python -m ml.reference: a checkpoint's QC training reference, recomputed from its training subjects.

Specification: right after training, the stored reference is what ``--check`` recomputes (training and the tool
compute it the same way).  ``--inputs-only`` recomputes the input figures and keeps the stored flip-disagreement
figures, which only the model can give; the weights and their digest are not touched.  A reference without flip
figures cannot be completed that way: one line, exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml.qc import HISTOGRAM_UNITS
from ml.reference import main
from test_ml_cli import _make_paired  # noqa: E402  (shared generated data)
from test_ml_quality import _cfg  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from ml.train import train

    root = tmp_path_factory.mktemp("reference")
    data = _make_paired(root / "mri")
    return train(_cfg(data, root / "ck", epochs=1)).out / "model.json", data


def test_the_reference_training_stores_is_the_one_the_tool_recomputes(trained: tuple[Path, Path],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model, data = trained
    assert main([str(model), "--data", str(data), "--check"]) == 0
    assert "qc_reference up to date" in capsys.readouterr().out


def test_inputs_only_recomputes_the_input_figures_and_keeps_the_flip_figures(
        trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, data = trained
    copy = tmp_path / "model.json"
    meta = json.loads(model.read_text())
    (tmp_path / "model.safetensors").write_bytes(model.with_suffix(".safetensors").read_bytes())
    recomputed = dict(meta["qc_reference"])
    stale = {k: v for k, v in recomputed.items() if k != "histogram_units"}  # as made before percentile units
    stale["histograms"] = [[0.0] * len(h) for h in stale["histograms"]]
    stale["flip_disagreement_max"] = 0.5  # a figure only the model could give: must survive
    copy.write_text(json.dumps({**meta, "qc_reference": stale}))
    assert main([str(copy), "--data", str(data), "--check"]) == 1

    assert main([str(copy), "--data", str(data), "--inputs-only"]) == 0
    after = json.loads(copy.read_text())
    ref = after["qc_reference"]
    assert ref["histogram_units"] == HISTOGRAM_UNITS and ref["histograms"] == recomputed["histograms"]
    assert ref["flip_disagreement_max"] == 0.5
    assert ref["flip_disagreement_training"] == recomputed["flip_disagreement_training"]
    assert after["weights_sha256"] == meta["weights_sha256"]
    assert "flip disagreement at most 0.5" in capsys.readouterr().out


def test_inputs_only_refuses_a_reference_without_flip_figures(trained: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    model, data = trained
    meta = json.loads(model.read_text())
    meta["qc_reference"] = {k: v for k, v in meta["qc_reference"].items() if not k.startswith("flip_")}
    copy = tmp_path / "model.json"
    copy.write_text(json.dumps(meta))
    before = copy.read_text()
    assert main([str(copy), "--data", str(data), "--inputs-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no flip-disagreement figures to keep" in err[0]
    assert copy.read_text() == before

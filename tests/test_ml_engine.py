"""ONNX Runtime and torch run the same network to the same output.

Specification: ``model.engine = "auto"`` runs ONNX Runtime on CPU; the ONNX graph
always comes from the weights that were loaded (a stale ``.onnx`` beside the
checkpoint is never used); both engines agree within 1e-4 on the normalized
output and within one grey level on the uint16 series.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ml.checkpoint import save_checkpoint
from ml.engine import Engine, OnnxModule, resolve_engine
from ml.inference import load_model, synthesize, write_onnx
from ml.networks import build_network, parse_options
from netutil import SHARED_DATA, needs_shared
from test_ml_units import _head, _tiny_checkpoint

pytest.importorskip("onnxruntime")


def test_auto_is_onnxruntime_on_cpu() -> None:
    assert resolve_engine("auto", torch.device("cpu")) is Engine.ONNXRUNTIME
    assert resolve_engine("torch", torch.device("cpu")) is Engine.TORCH
    with pytest.raises(ValueError, match="engine: 'tensorrt' is not one of auto, torch, onnxruntime"):
        resolve_engine("tensorrt", torch.device("cpu"))


def test_onnxruntime_and_torch_agree_on_a_generated_volume(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck", context_slices=1, upsampling="resize-conv")
    ort_model = load_model(ck, device="cpu", engine="onnxruntime")
    torch_model = load_model(ck, device="cpu", engine="torch")
    assert isinstance(ort_model.net, OnnxModule) and ort_model.engine is Engine.ONNXRUNTIME
    vol = _head((12, 40, 36))
    a = synthesize(ort_model, vol, np.diag([1.0, 1.0, 3.0, 1.0])).astype(int)
    b = synthesize(torch_model, vol, np.diag([1.0, 1.0, 3.0, 1.0])).astype(int)
    assert np.abs(a - b).max() <= 1  # rounding of values within 1e-4 of each other
    x = torch.rand(3, 3, 48, 32)
    with torch.inference_mode():
        torch.testing.assert_close(ort_model.net(x), torch_model.net(x), rtol=0, atol=1e-4)


def test_an_onnx_file_from_other_weights_is_never_used(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck")
    onnx_path = write_onnx(ck)
    assert onnx_path == tmp_path / "ck" / "model.onnx"
    # retrain (here: new random weights) without exporting again
    opts = parse_options({"base_width": 4, "depth": 2, "dropout": 0.0})
    torch.manual_seed(7)
    net = build_network(opts)
    meta = {"name": "tiny", "version": "2", "architecture": "unet", "network": opts.to_dict(), "direction": "t1-to-t2",
            "output_scale": 1000.0, "output_max": 1000}
    save_checkpoint(ck, net.state_dict(), meta)
    fresh_torch = load_model(ck, device="cpu", engine="torch")
    fresh_ort = load_model(ck, device="cpu", engine="onnxruntime")
    x = torch.rand(2, 1, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(fresh_ort.net(x), fresh_torch.net(x), rtol=0, atol=1e-4)


@needs_shared
@pytest.mark.shared
def test_shipped_model_engines_agree_on_a_real_volume() -> None:
    img = nib.load(SHARED_DATA / "mri" / "openms_long_patient03_study2" / "T1.nii.gz")
    data = np.asarray(img.get_fdata(dtype=np.float32))
    a = synthesize(load_model("default", "t1-to-t2", "cpu", "onnxruntime"), data, img.affine).astype(int)
    b = synthesize(load_model("default", "t1-to-t2", "cpu", "torch"), data, img.affine).astype(int)
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # tolerance: one grey level, on under 0.1 % of voxels

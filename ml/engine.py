"""Inference engines: torch (CPU or CUDA) and ONNX Runtime (CPU).

On CPU, ONNX Runtime runs the same network faster than torch eager (figures in
BENCHMARKS.md, ``benchmarks/inference.py``); on CUDA torch (with AMP) stays.
:func:`resolve_engine` turns ``model.engine`` (``auto``, ``torch``,
``onnxruntime``) into the engine used: ``auto`` is ONNX Runtime on CPU when the
package is installed, torch otherwise.

The ONNX graph is exported from the very weights that were loaded (BatchNorm
folded), so it always matches them: :func:`onnx_module` uses ``<stem>.onnx``
beside the checkpoint when its recorded weights digest is the checkpoint's, and
otherwise exports in memory (a few seconds, once per process).  ONNX and torch
outputs agree to about 1e-5 (tested).
"""

from __future__ import annotations

import enum
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["Engine", "OnnxModule", "export_onnx", "onnx_module", "parse_engine", "resolve_engine"]

log = logging.getLogger(__name__)

ONNX_OPSET = 17
DIGEST_KEY = "weights_sha256"


class Engine(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"


def parse_engine(value: str | Engine) -> Engine:
    if isinstance(value, Engine):
        return value
    try:
        return Engine(str(value).lower())
    except ValueError:
        raise ValueError(f"engine: {value!r} is not one of {', '.join(m.value for m in Engine)}") from None


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_engine(engine: str | Engine, device: torch.device) -> Engine:
    """The engine that will run: ``auto`` -> ONNX Runtime on CPU (when installed), torch on CUDA."""
    e = parse_engine(engine)
    if e is Engine.ONNXRUNTIME:
        if device.type != "cpu":
            raise ValueError(f"engine: onnxruntime runs on the CPU here, but the device is {device}")
        if not _onnxruntime_available():
            raise ValueError("engine: onnxruntime is not installed (pip install onnxruntime)")
        return e
    if e is Engine.AUTO:
        return Engine.ONNXRUNTIME if device.type == "cpu" and _onnxruntime_available() else Engine.TORCH
    return e


def export_onnx(net: nn.Module, in_channels: int, digest: str, path: Path | None = None) -> bytes:
    """ONNX graph of *net* (eval mode) with dynamic batch and in-plane size; *digest* (the weights'
    sha256) is recorded in the model's metadata.  Written atomically to *path* when given."""
    import onnx

    was_training = net.training
    net.eval()
    buf = io.BytesIO()
    x = torch.zeros(1, in_channels, 64, 64)
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notices
        torch.onnx.export(net, (x,), buf, input_names=["x"], output_names=["y"], opset_version=ONNX_OPSET,  # type: ignore[arg-type]
                          dynamic_axes={"x": axes, "y": axes}, dynamo=False)
    net.train(was_training)
    model = onnx.load_from_string(buf.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = DIGEST_KEY, digest
    data = model.SerializeToString()
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return data


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind the ``nn.Module`` call the inference loop makes."""

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["y"], {"x": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out)


def _recorded_digest(data: bytes) -> str | None:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception:  # a damaged file is re-exported, never trusted
        return None
    return next((p.value for p in model.metadata_props if p.key == DIGEST_KEY), None)


def onnx_module(net: nn.Module, in_channels: int, digest: str, beside: Path | None) -> OnnxModule:
    """ONNX Runtime for *net*: ``beside`` (an ``.onnx`` path) when it was exported from the same
    weights, else an in-memory export."""
    if beside is not None and beside.is_file():
        data = beside.read_bytes()
        if _recorded_digest(data) == digest:
            return OnnxModule(data)
        log.info("%s was exported from other weights; exporting again in memory", beside)
    return OnnxModule(export_onnx(net, in_channels, digest))

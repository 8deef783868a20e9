"""Numeric precision of training: fp32, or mixed precision (autocast) in bf16 or fp16.

:func:`resolve_precision` turns ``--precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``) into the precision a run
uses on its device, once, before training starts:

* ``auto``: fp16 autocast with loss scaling on CUDA (as training has always done there); on a CPU, bf16 autocast
  when the CPU computes bf16 natively (AMX or AVX512-BF16: oneDNN's bf16 convolutions then run about twice as fast
  as fp32 ones, ``BENCHMARKS.md``), else fp32.  Without native support bf16 is emulated and slower than fp32.
* ``bf16`` on a CPU without native support still runs (slowly), ``fp16`` needs CUDA.

Weights, optimizer state and the loss stay fp32 in every mode: autocast lowers only the precision of the
convolutions' arithmetic, so a run may change precision when it is resumed (recorded per epoch in the history).
"""

from __future__ import annotations

import contextlib
import enum
from typing import ContextManager

import torch

__all__ = ["Precision", "autocast", "cpu_has_native_bf16", "emulation_warning", "parse_precision", "resolve_precision"]


class Precision(str, enum.Enum):
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def parse_precision(value: str | Precision) -> Precision:
    try:
        return Precision(value)
    except ValueError:
        raise ValueError(f"--precision: {value!r} is not one of {', '.join(p.value for p in Precision)}") from None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AMX tiles or AVX512-BF16), as torch reports it."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(bool(probe()) for probe in probes if callable(probe))
    except RuntimeError:  # pragma: no cover - a torch build without the probes' backend
        return False


def resolve_precision(value: str | Precision, device: torch.device) -> Precision:
    """The precision a run on *device* uses for ``--precision value`` (never ``auto``)."""
    precision = parse_precision(value)
    if precision is Precision.AUTO:
        if device.type == "cuda":
            return Precision.FP16
        return Precision.BF16 if device.type == "cpu" and cpu_has_native_bf16() else Precision.FP32
    if precision is Precision.FP16 and device.type != "cuda":
        raise ValueError(f"--precision: fp16 needs a CUDA device (training runs on {device}); use bf16 or fp32")
    if precision is Precision.BF16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision: {device} has no bf16 support; use fp16 or fp32")
    return precision


def emulation_warning(precision: Precision, device: torch.device, native_bf16: bool | None = None) -> str | None:
    """The warning a run logs at start when it will compute in emulated bf16 (asked for on a CPU without native bf16
    arithmetic; *native_bf16* defaults to :func:`cpu_has_native_bf16`), else None."""
    if precision is not Precision.BF16 or device.type != "cpu":
        return None
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    if native_bf16:
        return None
    return ("--precision bf16: this CPU has no bf16 arithmetic (no AMX or AVX512-BF16), so bf16 is emulated and "
            "many times slower than fp32 (BENCHMARKS.md, 'Training throughput'); --precision auto picks fp32 here")


def autocast(device: torch.device, precision: Precision) -> ContextManager[object]:
    """The autocast context of a forward pass in *precision* (none for fp32)."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision is Precision.BF16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)

"""Where and at what precision a model runs: the device a spec's 'auto' means here, and autocast."""

from __future__ import annotations

import contextlib

import torch

from ..distributed import context as dist_context
from ..errors import ModelError


# ------------------------------------------------------------------------------------------ devices
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` means CUDA when this torch has a usable GPU, else CPU; an unusable explicit choice is an error
    here rather than a crash at the first tensor move."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None and dist_context().active:
            dev = torch.device("cuda", dist_context().local_rank)  # one GPU per torchrun process
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"model.device: {device!r} is not a device (expected auto, cpu, cuda, cuda:N or mps)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"model.device: {device!r} was requested but this torch ({torch.__version__}) sees no CUDA "
            f"device; use 'auto' or 'cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"model.device: {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s) here)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelError("model.device: 'mps' was requested but this torch has no MPS backend; use 'auto' or 'cpu'")
    return dev


_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for accelerators only: on CPU (or fp32) this is a no-op, so CPU runs stay exact fp32."""
    if precision not in _PRECISIONS:
        raise ModelError(f"model.precision: {precision!r} is not one of {', '.join(_PRECISIONS)}")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    dtype = _PRECISIONS[precision]
    if dtype is None or dev.type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype)

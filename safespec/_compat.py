"""Make ``import open_clip`` work on a CPU-only torch.

pip installs the PyPI torchvision wheel beside a ``+cpu`` torch; that wheel's ``_C.so`` is linked
against CUDA libraries, fails to load, and torchvision then dies at import with
``RuntimeError: operator torchvision::nms does not exist`` because ``_meta_registrations`` registers
fake kernels for ops whose schemas only ``_C.so`` would have defined. open_clip imports torchvision
for its image transforms, so the whole training stack would be unusable.

The fix is deliberately narrow: import torchvision as it is; only if that fails with exactly this
message, and the named operator really is absent from the dispatcher, declare that operator's real
schema (no kernel: calling it still fails loudly) and import again. A torchvision whose extension
loads never reaches the fix, and any other import error propagates unchanged.
"""

from __future__ import annotations

import importlib
import re
import sys
from types import ModuleType

import torch

# Schemas as torchvision's C++ extension declares them (torchvision/csrc/ops/*.cpp, 0.2x).
TORCHVISION_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "_roi_align_backward": (
        "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "qroi_align": (
        "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, "
        "float rois_scale, int rois_zero_point, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "roi_pool": (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_roi_pool_backward": (
        "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "ps_roi_align": (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "_ps_roi_align_backward": (
        "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "int sampling_ratio, SymInt batch_size, SymInt channels, SymInt height, "
        "SymInt width) -> Tensor"
    ),
    "ps_roi_pool": (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_ps_roi_pool_backward": (
        "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
        "float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
        "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "deform_conv2d": (
        "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
    ),
}

_MISSING_OP = re.compile(r"^operator torchvision::(\w+) does not exist$")

# A torch.library.Library deregisters its definitions when garbage-collected: keep it alive.
_LIBRARY: torch.library.Library | None = None
#: Operators this process had to declare (empty when torchvision's own extension loaded).
declared_ops: list[str] = []
_import = importlib.import_module  # indirection so tests can simulate other import failures


def operator_exists(qualname: str) -> bool:
    """Whether the dispatcher knows ``qualname`` (e.g. ``torchvision::nms``), with or without kernels."""
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def _missing_torchvision_op(err: BaseException) -> str | None:
    """The operator named by exactly the CPU-torch failure, if ``err`` is that failure, else None."""
    if type(err) is not RuntimeError:
        return None
    m = _MISSING_OP.match(str(err).strip())
    if m is None or operator_exists(f"torchvision::{m.group(1)}"):
        return None
    return m.group(1)


def _forget_torchvision() -> None:
    """Drop the half-imported torchvision so that the next import starts over."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]


def _declare(op: str) -> None:
    global _LIBRARY
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    _LIBRARY.define(TORCHVISION_SCHEMAS[op])
    declared_ops.append(op)


def import_torchvision() -> ModuleType:
    """Import torchvision, declaring the operator schemas its failed C++ extension would have declared."""
    for _ in range(len(TORCHVISION_SCHEMAS) + 1):
        try:
            return _import("torchvision")
        except RuntimeError as err:
            op = _missing_torchvision_op(err)
            if op is None or op not in TORCHVISION_SCHEMAS:
                raise
            _forget_torchvision()
            _declare(op)
    raise RuntimeError("torchvision still fails to import after declaring its operator schemas")  # pragma: no cover


def import_open_clip() -> ModuleType:
    """The ``open_clip`` module, importable on CPU-only torch builds too."""
    if "open_clip" in sys.modules:
        return sys.modules["open_clip"]
    import_torchvision()
    return _import("open_clip")

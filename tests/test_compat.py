"""The torchvision-on-CPU-torch fix: open_clip imports and its transforms run; other failures stay visible."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from safespec import _compat

FRESH = r"""
import json, sys
import safespec.model                      # applies the fix, if this machine needs it
import open_clip                           # the import that fails on a CPU torch without it
import torchvision.extension as ext
from PIL import Image
from safespec import _compat
tf = open_clip.image_transform(32, is_train=False)
x = tf(Image.new("L", (28, 28), color=200))
train_tf = open_clip.image_transform(32, is_train=True)
y = train_tf(Image.new("RGB", (40, 30), color=(10, 20, 30)))
print(json.dumps({"shape": list(x.shape), "train_shape": list(y.shape), "declared": _compat.declared_ops,
                  "has_ops": ext._has_ops(), "mean": float(x.mean())}))
"""


def test_open_clip_imports_and_transforms_run_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [3, 32, 32] and res["train_shape"] == [3, 32, 32]
    # a grey image normalised with CLIP's mean/std is not all zeros: the transform really ran
    assert res["mean"] != 0.0
    # the fix declares schemas exactly when torchvision's own extension did not load
    assert bool(res["declared"]) == (not res["has_ops"])
    assert set(res["declared"]) <= set(_compat.TORCHVISION_SCHEMAS)


def test_declared_operators_exist_with_their_real_schemas():
    _compat.import_open_clip()
    import torch

    for op in _compat.declared_ops:
        schema = getattr(torch.ops.torchvision, op).default._schema
        assert str(schema) == f"torchvision::{_compat.TORCHVISION_SCHEMAS[op]}"


def _fake_import(exc: BaseException):
    calls = []

    def fake(name):
        calls.append(name)
        raise exc

    return fake, calls


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA driver version is insufficient for CUDA runtime version"),
        ImportError("No module named 'torchvision'"),
        OSError("libc10_cuda.so: cannot open shared object file"),
        RuntimeError("operator torchvision::frobnicate does not exist"),  # not a torchvision operator we know
        RuntimeError("operator torchvision::nms does not exist (while tracing)"),  # not exactly the failure
    ],
    ids=["runtime", "import", "oserror", "unknown-op", "other-message"],
)
def test_other_import_errors_are_not_swallowed(monkeypatch, exc):
    before = list(_compat.declared_ops)
    fake, calls = _fake_import(exc)
    monkeypatch.setattr(_compat, "_import", fake)
    with pytest.raises(type(exc)) as info:
        _compat.import_torchvision()
    assert info.value is exc
    assert calls == ["torchvision"]  # no retry
    assert _compat.declared_ops == before  # nothing declared


def test_the_failure_is_not_fixed_when_the_operator_already_exists(monkeypatch):
    # After the fix (or with a working extension) torchvision::nms exists: the same message now means
    # something else is wrong, and it must surface rather than loop or redeclare.
    _compat.import_open_clip()
    assert _compat.operator_exists("torchvision::nms")
    exc = RuntimeError("operator torchvision::nms does not exist")
    fake, calls = _fake_import(exc)
    monkeypatch.setattr(_compat, "_import", fake)
    with pytest.raises(RuntimeError) as info:
        _compat.import_torchvision()
    assert info.value is exc and calls == ["torchvision"]


def test_missing_operator_detection_is_exact():
    assert (
        _compat._missing_torchvision_op(RuntimeError("operator torchvision::roi_align_xyz does not exist"))
        == "roi_align_xyz"
    )
    assert _compat._missing_torchvision_op(ValueError("operator torchvision::roi_align_xyz does not exist")) is None
    assert _compat._missing_torchvision_op(RuntimeError("operator aten::nms does not exist")) is None

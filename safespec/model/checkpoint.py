"""Checkpoints: safetensors with safespec's metadata (format, arch, classes, towers), or a torch file read
with weights_only; what a checkpoint holds is validated before any of it is used."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from .. import __version__
from .._compat import import_open_clip
from ..errors import ModelError, atomic_write_bytes
from .digest import tensor_digest
from .headed import TOWER_PREFIX, HeadedCLIP

open_clip = import_open_clip()  # open_clip only after the torchvision fix


CHECKPOINT_FORMAT = "safespec-checkpoint/1"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


# ------------------------------------------------------------------------------------------ checkpoints
def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _unpickler_reason(e: BaseException) -> tuple[bool, str]:
    """(needs code, reason) from the weights-only unpickler's multi-line message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "global" in ln:
            return True, ln.rstrip(".")
    for ln in lines:
        if ln.startswith("Unsupported") or ("error:" in ln.lower() and not ln.endswith(":")):
            return False, ln.rstrip(".")
    return False, _first_line(e)


def read_checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The safespec metadata of a ``.safetensors`` checkpoint ({} for other files and foreign checkpoints)."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return {}
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:
        raise ModelError(f"{p}: not a readable safetensors file ({_first_line(e)})") from e
    if "safespec" not in raw:
        return {}
    try:
        meta = json.loads(raw["safespec"])
    except json.JSONDecodeError as e:
        raise ModelError(f"{p}: its safespec metadata is not valid JSON ({e})") from e
    return meta if isinstance(meta, dict) else {}


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, safespec metadata) of a checkpoint, never running code from it.

    ``.safetensors`` holds only tensors; ``.pt/.pth/.bin`` go through ``torch.load(weights_only=True)``, whose
    unpickler refuses anything but tensors and plain containers. A file that needs code is refused, not run.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model.checkpoint: {p}: no such file")
    suffix = p.suffix.lower()
    meta: dict = {}
    if suffix == ".safetensors":
        meta = read_checkpoint_metadata(p)
        try:
            sd = load_file(str(p), device="cpu")
        except Exception as e:
            raise ModelError(f"{p}: not a readable safetensors file ({_first_line(e)})") from e
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            needs_code, reason = _unpickler_reason(e)
            what = (
                "refused: unpickling this checkpoint would run code"
                if needs_code
                else "not a readable torch checkpoint: the weights-only unpickler rejected it"
            )
            raise ModelError(
                f"{p}: {what} ({reason}); safespec loads only tensors (torch.load weights_only=True); "
                f"re-save the model's state_dict, or use .safetensors"
            ) from e
        except Exception as e:
            raise ModelError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if (
            not isinstance(obj, dict)
            or not obj
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
        ):
            raise ModelError(f"{p}: expected a state dict (names -> tensors), got {type(obj).__name__}")
        sd = dict(obj)
    else:
        raise ModelError(
            f"model.checkpoint: {p}: unsupported file type {suffix or '(none)'!r}; "
            f"expected .safetensors, .pt, .pth or .bin"
        )
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd, meta


def save_checkpoint(model: HeadedCLIP, path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write ``model`` (heads included) as safetensors, atomically; returns its weights digest."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    digest = tensor_digest(tensors)
    heads = model.heads
    meta = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "classes": list(model.classes),
        "has_heads": heads is not None,
        "head_rank": heads.rank if heads is not None else None,
        "num_heads": heads.num_heads if heads is not None else None,
        "class_towers": [model.classes[c] for c in model.tower_classes],
        "model_cfg": model.model_cfg,
        "preprocess_cfg": open_clip.get_model_preprocess_cfg(model.clip),
        "tokenizer": model.tokenizer_name,
        "digest": digest,
        "versions": {"safespec": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__},
        "extra": metadata or {},
    }
    blob = save(tensors, metadata={"safespec": json.dumps(meta, default=str, sort_keys=True)})
    atomic_write_bytes(path, blob)
    return digest


#: What a safespec checkpoint holds beside the CLIP weights, the heads and the class towers: the calibrated
#: decision offsets (safespec.model.headed.DecisionBias).
DECISION_KEYS = ("class_bias", "rival_order", "rival_bias")


def _split_state(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A safespec checkpoint prefixes the open_clip weights with ``clip.``; a plain open_clip one does not."""
    if any(k.startswith("clip.") for k in sd):
        clip_sd = {k[len("clip.") :]: v for k, v in sd.items() if k.startswith("clip.")}
        heads = {k: v for k, v in sd.items() if k.startswith("heads.")}
        other = sorted(k for k in sd if not k.startswith(("clip.", "heads.", TOWER_PREFIX)) and k not in DECISION_KEYS)
        if other:
            raise ModelError(f"unexpected tensors in a safespec checkpoint: {', '.join(other[:5])}")
        return clip_sd, (heads or None)
    return dict(sd), None


def _short(names: Sequence[str], n: int = 6) -> str:
    names = list(names)
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"

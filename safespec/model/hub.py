"""Pretrained weights from open_clip tags and the Hugging Face hub: what is cached, whether the hub is
reachable, and one located line when the weights cannot be had (no hang, no traceback)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn
from huggingface_hub import constants, try_to_load_from_cache

from .._compat import import_open_clip
from ..errors import ModelError
from .checkpoint import _first_line
from .registry import _check_arch, _close, _quiet_open_clip

open_clip = import_open_clip()  # open_clip only after the torchvision fix


_NETWORK_PROBE_TIMEOUT_S = 3.0


# ------------------------------------------------------------------------------------------ pretrained weights
def _hub_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in truthy:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in truthy:
        return True
    try:
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is an open_clip dependency
        return False


def _reachable(host: str, port: int = 443, timeout: float = _NETWORK_PROBE_TIMEOUT_S) -> bool:
    """Whether ``host`` answers within ``timeout`` s (DNS included: a resolver that hangs counts as unreachable)."""
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return result[0]


def _hf_cached(repo_id: str, filenames: Sequence[str], cache_dir: str | None) -> str | None:
    for fn in filenames:
        try:
            p = try_to_load_from_cache(repo_id, fn, cache_dir=cache_dir)
        except Exception:
            p = None
        if isinstance(p, str) and os.path.isfile(p):
            return p
    return None


def _weights_unavailable(what: str, where: str, why: str, fetch: str) -> ModelError:
    return ModelError(
        f"model.pretrained: weights {what} are not in the cache {where} and cannot be downloaded ({why}); to provide "
        f"them, run `{fetch}` on a machine with internet and copy its cache here, or save the model there with "
        f"safespec.model.save_checkpoint and set model.checkpoint to that file"
    )


def _fetch_command(model_name: str, tag: str | None) -> str:
    args = repr(model_name) + (f", pretrained={tag!r}" if tag else "")
    return f'python -c "import open_clip; open_clip.create_model({args})"'


def _ensure_available(
    files: list[tuple[str, list[str]]], url: str | None, what: str, cache_dir: str | None, fetch: str
) -> bool:
    """Fail fast, with one line, when weights are neither cached nor fetchable. Returns True when cached."""
    missing = [(repo, names) for repo, names in files if _hf_cached(repo, names, cache_dir) is None]
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
        if target.is_file():
            return True
    elif not missing:
        return True
    where = f"{cache_dir or constants.HF_HUB_CACHE}" if not url else str(cache_dir or "~/.cache/clip")
    if _hub_offline():
        raise _weights_unavailable(what, where, "HF_HUB_OFFLINE is set", fetch)
    host = urlparse(url).hostname if url else urlparse(constants.ENDPOINT).hostname
    if host and not _reachable(host):
        raise _weights_unavailable(what, where, f"{host} is unreachable", fetch)
    return False


def _hf_names() -> tuple[str, str, str]:
    """open_clip's hub file names (config, safetensors weights, bin weights). Imported here, not at the top:
    open_clip is imported through _compat.import_open_clip (the torchvision fix) first."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    return HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME


def _load_pretrained(
    arch: str, pretrained: str, device: torch.device, cache_dir: str | None
) -> tuple[nn.Module, dict, str | None, str]:
    """(clip, model_cfg, tokenizer name, source) for an open_clip tag or an ``hf-hub:`` name. The weights'
    reachability is checked first, so that an offline machine gets one line saying how to fetch them."""
    kwargs: dict[str, Any] = {}
    if pretrained.startswith("hf-hub:") or arch.startswith("hf-hub:"):
        model_name, tag, tokenizer_name, source = _hub_model(
            pretrained if pretrained.startswith("hf-hub:") else arch, cache_dir
        )
    else:
        model_name, tag, tokenizer_name, source = _tagged_model(arch, pretrained, cache_dir, kwargs)
    try:
        with _quiet_open_clip():
            clip = open_clip.create_model(
                model_name,
                pretrained=tag,
                device=device,
                cache_dir=cache_dir,
                require_pretrained=True,
                weights_only=True,
                **kwargs,
            )
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"model.pretrained: could not load {source}: {type(e).__name__}: {_first_line(e)}") from e
    if model_name.startswith("hf-hub:"):
        cfg_path = _hf_cached(model_name[len("hf-hub:") :], [_hf_names()[0]], cache_dir)
        with open(cfg_path, encoding="utf-8") as f:  # type: ignore[arg-type]
            hub_cfg = json.load(f)
        model_cfg = hub_cfg.get("model_cfg", hub_cfg)
    else:
        model_cfg = open_clip.get_model_config(arch)
        if kwargs.get("force_quick_gelu"):
            model_cfg["quick_gelu"] = True
    return clip, model_cfg, tokenizer_name, source


def _hub_model(name: str, cache_dir: str | None) -> tuple[str, None, None, str]:
    """An ``hf-hub:org/name`` model: its config and weights must be reachable (or cached)."""
    config, safe, weights = _hf_names()
    repo = name[len("hf-hub:") :]
    if not repo or repo.count("/") != 1:
        raise ModelError(f"model.pretrained: {name!r} is not an 'hf-hub:org/name' model id")
    _ensure_available(
        [(repo, [config]), (repo, [safe, weights])], None, f"of {name}", cache_dir, _fetch_command(name, None)
    )
    return name, None, None, name


def _tagged_model(
    arch: str, pretrained: str, cache_dir: str | None, kwargs: dict[str, Any]
) -> tuple[str, str, str, str]:
    """An open_clip architecture with a pretrained tag: the tag must exist and its weights be reachable;
    a tag trained with QuickGELU sets ``kwargs['force_quick_gelu']``."""
    _, safe, weights = _hf_names()
    _check_arch(arch)
    pcfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if not pcfg:
        if os.path.isfile(pretrained):
            raise ModelError(f"model.pretrained: {pretrained!r} is a file; local weights go in model.checkpoint")
        tags = open_clip.list_pretrained_tags_by_model(arch)
        near = _close(pretrained, tags) or ", ".join(tags[:8])
        raise ModelError(
            f"model.pretrained: open_clip has no pretrained tag {pretrained!r} for {arch}"
            + (f"; known tags: {near}" if near else "; it ships no pretrained weights")
        )
    if "file" not in pcfg:
        hub = pcfg.get("hf_hub", "")
        files: list[tuple[str, list[str]]] = []
        url = None
        if hub:
            repo, fn = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
            fn = fn or weights
            alts = [safe] if fn == weights else ([fn[:-4] + ".safetensors"] if fn.endswith((".bin", ".pth")) else [])
            files = [(repo, [*alts, fn])]
        else:
            url = pcfg.get("url") or None
        _ensure_available(
            files, url, f"{arch}/{pretrained} ({hub.rstrip('/') or url})", cache_dir, _fetch_command(arch, pretrained)
        )
    if pcfg.get("quick_gelu", False) and not open_clip.get_model_config(arch).get("quick_gelu", False):
        kwargs["force_quick_gelu"] = True  # the tag was trained with QuickGELU: build what it was trained as
    return arch, pretrained, arch, f"{arch} / {pretrained} (open_clip)"

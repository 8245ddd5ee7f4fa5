"""Building a model: from an architecture name (randomly initialised or pretrained) or from a checkpoint, with
its preprocessing and tokenizer, as one LoadedModel."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._compat import import_open_clip
from ..data.digests import remember, remembered, signature_of
from ..errors import ModelError
from ..plan import ModelPlan
from .checkpoint import _first_line, _short, _split_state, load_checkpoint
from .device import model_autocast, resolve_device
from .digest import weights_digest
from .headed import TOWER_PREFIX, HeadedCLIP, tower_indices
from .heads import LowRankHeads
from .hub import _load_pretrained
from .registry import _check_arch, _quiet_open_clip

open_clip = import_open_clip()  # open_clip only after the torchvision fix
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer  # noqa: E402  (after the torchvision fix)
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict  # noqa: E402  (after the torchvision fix)


# ------------------------------------------------------------------------------------------ loaded model
@dataclass
class LoadedModel:
    """A model ready for training and evaluation, and what the report says about where it came from."""

    model: HeadedCLIP
    preprocess: Callable[[Any], torch.Tensor]  # eval transform: PIL image -> (3, H, W)
    tokenizer: Callable[[Sequence[str]], torch.Tensor]  # list of str -> (N, L) LongTensor
    digest: str  # "sha256:..." of the weights, heads included
    source: str  # human description of the weights' origin
    arch: str = ""
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    train_preprocess: Callable[[Any], torch.Tensor] | None = None  # open_clip's training augmentation

    @property
    def context_length(self) -> int:
        return int(self.model.clip.context_length)

    def autocast(self) -> contextlib.AbstractContextManager:
        return model_autocast(self.device, self.precision)

    def refresh_digest(self) -> str:
        """Recompute :attr:`digest` after the weights changed (e.g. after training)."""
        self.digest = weights_digest(self.model)
        return self.digest


#: torch.nn.init's in-place initialisers, skipped while a model whose every weight a checkpoint will
#: overwrite is built (as transformers' ``no_init_weights`` does)
_INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
)
_INIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_init():
    """Build modules without drawing their initial weights, which a strict load (every parameter
    present) overwrites anyway; drawing them was a large share of loading a small checkpoint."""
    with _INIT_LOCK:
        saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
        try:
            for name in _INITIALISERS:
                setattr(nn.init, name, lambda tensor, *a, **k: tensor)
            yield
        finally:
            for name, fn in saved.items():
                setattr(nn.init, name, fn)


def _instantiate(
    model_cfg: dict, preprocess_cfg: dict | None, device: torch.device, seed: int | None, *, init: bool = True
) -> Any:
    """Build an open_clip model from a config dict (random init: weights come from a checkpoint or stay
    random). ``init=False``: leave the weights undrawn, for a checkpoint that sets every one of them."""
    cfg = copy.deepcopy(model_cfg)
    text_cfg, vision_cfg = cfg.setdefault("text_cfg", {}), cfg.setdefault("vision_cfg", {})
    is_hf_text = "hf_model_name" in text_cfg
    if is_hf_text:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    if "multimodal_cfg" in cfg:
        raise ModelError("model.arch: CoCa-style models (multimodal_cfg) are not supported; use a CLIP architecture")
    cls = open_clip.CustomTextCLIP if (cfg.pop("custom_text", False) or is_hf_text) else open_clip.CLIP
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            with _quiet_open_clip(), contextlib.nullcontext() if init else _no_init():
                clip = cls(**cfg)
        except ModelError:
            raise
        except Exception as e:  # e.g. an HF text tower without `transformers`
            raise ModelError(
                f"model.arch: cannot build this architecture here: {type(e).__name__}: {_first_line(e)}"
            ) from e
    pp = dataclasses.asdict(PreprocessCfg())
    if getattr(clip.visual, "image_size", None) is not None:
        pp["size"] = clip.visual.image_size
    pp = merge_preprocess_dict(pp, preprocess_cfg or {})
    open_clip.set_model_preprocess_cfg(clip, pp)
    return _to(clip, device)


def _to(module: nn.Module, device: torch.device) -> nn.Module:
    """``module.to(device)``, skipped for a module built on the CPU that stays there: the walk over every
    submodule is a noticeable part of loading a small model."""
    return module if device.type == "cpu" else module.to(device)


def preprocess_config(model: HeadedCLIP) -> dict[str, Any]:
    """The settings of ``model``'s image preprocessing (size, resize mode, interpolation, mean, std): with
    the image bytes and the decoding libraries, what decides a preprocessed image."""
    return dict(open_clip.get_model_preprocess_cfg(model.clip))


def _transforms(clip: nn.Module) -> tuple[Callable, Callable]:
    cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip))
    return (image_transform_v2(cfg, is_train=False), image_transform_v2(cfg, is_train=True))


def _tokenizer(name: str | None, model_cfg: dict | None, context_length: int) -> Callable:
    """open_clip's tokenizer for the model, always at the model's own context length. Built-in names go
    through open_clip (which picks e.g. SigLIP's tokenizer by name); anything else is built from the
    model's config, so that a hub model or a checkpoint needs no hub access to tokenize. Built once per
    (name, config, length): reading the BPE vocabulary costs about as much as building a small model, and
    a run or a verify loads two models with the same tokenizer."""
    key = (name, json.dumps(model_cfg, sort_keys=True, default=str), context_length)
    with _TOKENIZER_LOCK:
        tok = _TOKENIZERS.get(key)
        if tok is None:
            tok = _TOKENIZERS[key] = _build_tokenizer(name, model_cfg, context_length)
    return tok


_TOKENIZERS: dict[tuple, Callable] = {}
_TOKENIZER_LOCK = threading.Lock()


def _build_tokenizer(name: str | None, model_cfg: dict | None, context_length: int) -> Callable:
    try:
        if name and not name.startswith(("hf-hub:", "local-dir:")) and open_clip.get_model_config(name) is not None:
            with _quiet_open_clip():
                return open_clip.get_tokenizer(name, context_length=context_length)
        text_cfg = (model_cfg or {}).get("text_cfg", {})
        kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
        if text_cfg.get("hf_tokenizer_name"):
            return HFTokenizer(
                text_cfg["hf_tokenizer_name"],
                context_length=context_length,
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **kwargs,
            )
        return SimpleTokenizer(context_length=context_length, **kwargs)
    except Exception as e:
        raise ModelError(
            f"model: cannot build the tokenizer of {name or 'this model'}: {type(e).__name__}: {_first_line(e)}"
        ) from e


def _finish(
    clip: Any,
    classes: Sequence[str],
    *,
    arch: str,
    model_cfg: dict | None,
    tokenizer_name: str | None,
    heads_state: dict[str, torch.Tensor] | None,
    heads: bool,
    rank: int,
    seed: int,
    device: torch.device,
    precision: str,
    source: str,
    digest: bool = True,
) -> LoadedModel:
    """``digest=False``: the caller changes the weights further and computes the digest itself (hashing
    a model's weights costs about as much as loading them)."""
    hc = HeadedCLIP(clip, classes, arch=arch, model_cfg=model_cfg, tokenizer_name=tokenizer_name)
    if heads_state is not None:
        k, width, r = heads_state["heads.A"].shape
        hc.heads = LowRankHeads(k, width, heads_state["heads.B"].shape[2], r, device=device)
        hc.heads.load_state_dict({"A": heads_state["heads.A"], "B": heads_state["heads.B"]})
    elif heads:
        hc.add_heads(rank, seed=seed)
    _to(hc, device)
    preprocess, train_preprocess = _transforms(clip)
    tok = _tokenizer(tokenizer_name, model_cfg, int(clip.context_length))
    return LoadedModel(
        model=hc,
        preprocess=preprocess,
        tokenizer=tok,
        digest=weights_digest(hc) if digest else "",
        source=source,
        arch=arch,
        device=device,
        precision=precision,
        train_preprocess=train_preprocess,
    )


def create_model(
    arch: str,
    classes: Sequence[str],
    *,
    heads: bool = True,
    rank: int = 8,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> LoadedModel:
    """A randomly initialised model of a known architecture (deterministic given ``seed``): the start of a
    model trained from scratch, such as the demo world's v1."""
    cfg = _check_arch(arch)
    model_autocast("cpu", precision)  # validates the precision name
    dev = resolve_device(device)
    clip = _instantiate(cfg, None, dev, seed)
    return _finish(
        clip,
        classes,
        arch=arch,
        model_cfg=cfg,
        tokenizer_name=arch,
        heads_state=None,
        heads=heads,
        rank=rank,
        seed=seed,
        device=dev,
        precision=precision,
        source=f"{arch}, random initialisation (seed {seed})",
    )


#: Bump when loading a checkpoint changes what a model's weights are (its remembered digests then miss).
CHECKPOINT_DIGEST_V = 1


def _load_from_checkpoint(mp: ModelPlan, classes: Sequence[str], device: torch.device, seed: int) -> LoadedModel:
    """The old model from a safespec checkpoint: the CLIP weights, then what safespec added to them (heads,
    class offsets, class image towers), each checked against the spec before it is used."""
    path = Path(mp.checkpoint)  # type: ignore[arg-type]
    # the finished model's digest follows from the file's bytes and these options: remembered by the file's
    # signature (as image digests are), a second load of an unchanged checkpoint does not hash it again
    options = json.dumps([CHECKPOINT_DIGEST_V, mp.arch, mp.heads, mp.rank, seed, list(classes)])
    sig = signature_of(path)
    known = remembered("weights", sig, options) if sig is not None else None
    sd, meta = load_checkpoint(path)
    clip_sd, heads_sd = _split_state(sd)
    if meta.get("arch") and meta["arch"] != mp.arch:
        raise ModelError(f"model.arch: {path} holds a {meta['arch']!r} model but the spec says {mp.arch!r}")
    model_cfg = meta.get("model_cfg") or _check_arch(mp.arch)
    if heads_sd is not None:
        _check_heads(path, heads_sd, meta, mp, classes)
    clip = _instantiate(model_cfg, meta.get("preprocess_cfg"), torch.device("cpu"), seed=0, init=False)
    _load_clip_state(path, clip, clip_sd, mp.arch)  # strict: every weight comes from the checkpoint
    _to(clip, device)
    desc = f"checkpoint {path}"
    if heads_sd is None and mp.heads:
        desc += " (no heads: fresh task-dependent heads added, B = 0)"
    bias = sd.get("class_bias")
    if bias is not None:
        _check_class_bias(path, bias, classes)
        desc += " (with calibrated class offsets)"
    order, rivals = sd.get("rival_order"), sd.get("rival_bias")
    if order is not None or rivals is not None:
        _check_rival_bias(path, order, rivals, classes)
        desc += " (with calibrated per-rival offsets)"
    towers = {k: v for k, v in sd.items() if k.startswith(TOWER_PREFIX)}
    loaded = _finish(
        clip,
        classes,
        arch=mp.arch,
        model_cfg=model_cfg,
        tokenizer_name=meta.get("tokenizer") or mp.arch,
        heads_state=heads_sd,
        heads=mp.heads,
        rank=mp.rank,
        seed=seed,
        device=device,
        precision=mp.precision,
        source=desc,
        # else once, below, over the finished model
        digest=known is None and bias is None and order is None and not towers,
    )
    if towers:
        _load_class_towers(path, loaded, towers, classes, mp.arch, device)
    if bias is not None:
        loaded.model.set_class_bias(bias)
    if order is not None:
        loaded.model.set_rival_bias(order, rivals)
    if known is not None:
        loaded.digest = known
    else:
        if bias is not None or order is not None or towers:
            loaded.refresh_digest()
        if sig is not None:
            remember("weights", sig, options, loaded.digest)
    return loaded


def _check_heads(path: Path, heads_sd: dict, meta: dict, mp: ModelPlan, classes: Sequence[str]) -> None:
    """A checkpoint's heads belong to its classes, in order, at its rank: the spec must agree."""
    if set(heads_sd) != {"heads.A", "heads.B"} or heads_sd["heads.A"].dim() != 3 or heads_sd["heads.B"].dim() != 3:
        raise ModelError(f"{path}: malformed task-dependent heads ({', '.join(sorted(heads_sd))})")
    k, _, r = heads_sd["heads.A"].shape
    ck_classes = meta.get("classes")
    if ck_classes is not None and list(ck_classes) != list(classes):
        raise ModelError(
            f"classes: {path} has task-dependent heads for classes {_short(ck_classes)} but the "
            f"spec lists {_short(classes)}; heads belong to their classes, in order"
        )
    if k != len(classes) + 1:
        raise ModelError(
            f"classes: {path} has {k} task-dependent heads ({k - 1} classes + negatives) but the "
            f"spec lists {len(classes)} classes"
        )
    if not mp.heads:
        raise ModelError(
            f"model.heads.enabled: {path} has task-dependent heads, which are part of the old "
            f"model; set heads.enabled: true (rank {r})"
        )
    if r != mp.rank:
        raise ModelError(
            f"model.heads.rank: {path} has heads of rank {r} but the spec asks for rank {mp.rank}; "
            f"a trained head keeps its rank"
        )


def _load_clip_state(path: Path, clip: nn.Module, clip_sd: dict, arch: str) -> None:
    """Load the CLIP weights strictly (a missing or unexpected key is a located error, not a silent gap)."""
    if "logit_scale" in clip_sd and clip_sd["logit_scale"].shape != clip.logit_scale.shape:
        clip_sd["logit_scale"] = clip_sd["logit_scale"].reshape(clip.logit_scale.shape)
    try:
        result = clip.load_state_dict(clip_sd, strict=False)
    except RuntimeError as e:
        msg = " ".join(ln.strip() for ln in str(e).splitlines()[1:3]) or _first_line(e)
        raise ModelError(f"model.checkpoint: {path} does not fit architecture {arch}: {msg}") from e
    missing = [k for k in result.missing_keys if k != "attn_mask"]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if result.unexpected_keys:
            u = result.unexpected_keys
            parts.append(f"unexpected {', '.join(u[:4])}{' ...' if len(u) > 4 else ''}")
        raise ModelError(f"model.checkpoint: {path} does not fit architecture {arch}: {'; '.join(parts)}")


def _check_class_bias(path: Path, bias: torch.Tensor, classes: Sequence[str]) -> None:
    if bias.shape != (len(classes),):
        raise ModelError(
            f"classes: {path} has class offsets for {bias.shape[0] if bias.dim() else 0} classes but "
            f"the spec lists {len(classes)}"
        )
    if not torch.isfinite(bias).all():
        raise ModelError(f"model.checkpoint: {path} has non-finite class offsets")


def _check_rival_bias(
    path: Path, order: torch.Tensor | None, rivals: torch.Tensor | None, classes: Sequence[str]
) -> None:
    C = len(classes)
    if order is None or rivals is None:
        raise ModelError(
            f"model.checkpoint: {path} has per-rival offsets without their {'classes' if order is None else 'values'}"
        )
    if order.dim() != 1 or order.dtype.is_floating_point or rivals.dim() != 2 or rivals.shape[0] != order.numel():
        raise ModelError(f"model.checkpoint: {path} has malformed per-rival offsets (one class index per row expected)")
    if rivals.shape[1] != C or bool(((order < 0) | (order >= C)).any()):
        raise ModelError(f"classes: {path} has per-rival offsets for {rivals.shape[1]} classes but the spec lists {C}")
    if not torch.isfinite(rivals).all():
        raise ModelError(f"model.checkpoint: {path} has non-finite per-rival offsets")


def _load_class_towers(
    path: Path, loaded: LoadedModel, towers: dict, classes: Sequence[str], arch: str, device: torch.device
) -> None:
    """Add and load the class image towers a checkpoint holds (``model.target_tower`` of earlier cycles)."""
    indices = tower_indices(towers)
    if indices[-1] >= len(classes):
        raise ModelError(
            f"classes: {path} has an image tower for class {indices[-1]} but the spec lists {len(classes)} classes"
        )
    hc = loaded.model
    for c in indices:
        hc.add_class_tower(c)
    want = {k for k in hc.state_dict() if k.startswith(TOWER_PREFIX)}
    if set(towers) != want:
        odd = sorted(set(towers) ^ want)
        raise ModelError(f"model.checkpoint: {path}: malformed class image towers ({', '.join(odd[:4])})")
    try:
        hc.class_towers.load_state_dict({k[len(TOWER_PREFIX) :]: v for k, v in towers.items()})
    except RuntimeError as e:
        raise ModelError(
            f"model.checkpoint: {path}: its class image towers do not fit {arch} ({_first_line(e)})"
        ) from e
    hc.class_towers.to(device)
    loaded.source += f" (with image towers of {', '.join(repr(classes[c]) for c in indices)})"


def load_model(
    mp: ModelPlan,
    classes: Sequence[str],
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> LoadedModel:
    """The spec's model: pretrained (open_clip tag or ``hf-hub:`` name) or a local checkpoint, with heads
    added (``B = 0``) when the spec enables them and the weights have none."""
    if len(set(classes)) != len(classes) or not classes:
        raise ModelError("classes: the class list must be non-empty and without repeats")
    model_autocast("cpu", mp.precision)  # validates the precision name
    dev = resolve_device(device if device is not None else mp.device)
    if mp.checkpoint:
        return _load_from_checkpoint(mp, classes, dev, seed)
    if not mp.pretrained:
        raise ModelError("model: exactly one of 'pretrained' or 'checkpoint' is required")
    clip, model_cfg, tokenizer_name, source = _load_pretrained(mp.arch, mp.pretrained, dev, cache_dir)
    return _finish(
        clip,
        classes,
        arch=mp.arch,
        model_cfg=model_cfg,
        tokenizer_name=tokenizer_name,
        heads_state=None,
        heads=mp.heads,
        rank=mp.rank,
        seed=seed,
        device=dev,
        precision=mp.precision,
        source=source + (" + fresh task-dependent heads (B = 0)" if mp.heads else ""),
    )

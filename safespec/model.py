"""Models: the open_clip factory, task-dependent heads, checkpoints, digests and the zero-shot classifier.

One factory turns the spec's ``model`` section into a :class:`LoadedModel`, whatever the weights' source
(an open_clip pretrained tag, an ``hf-hub:`` name, or a local checkpoint of the old model), so that every
later stage sees the same object and the report can name exactly which weights were used (their digest).

Task-dependent heads (method.md §3) give each class its own low-rank correction of the text projection,
``h @ (W + A_k B_k)``, plus one extra head for negatives. They are computed as ``h @ W + (h @ A_k) @ B_k``
grouped by head, because the per-sample ``W + A_k B_k`` of the paper's reference code costs two orders of
magnitude more time and memory than the projection itself (see ``bench/heads.py``). ``B`` starts at zero,
so a freshly headed model computes exactly, to the bit, what the model without heads computes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from ._compat import import_open_clip
from .distributed import context as dist_context
from .errors import ModelError, atomic_write_bytes
from .plan import ModelPlan

open_clip = import_open_clip()

from open_clip.tokenizer import HFTokenizer, SimpleTokenizer  # noqa: E402
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict  # noqa: E402
from open_clip.transformer import TextTransformer, text_global_pool  # noqa: E402  (after the compat fix)

__all__ = [
    "CHECKPOINT_FORMAT",
    "SHIPPED_ARCHS",
    "HeadedCLIP",
    "LoadedModel",
    "LowRankHeads",
    "ZeroShotClassifier",
    "ZeroShotOutput",
    "build_class_tokens",
    "class_logits",
    "create_model",
    "grouped_low_rank",
    "load_checkpoint",
    "load_model",
    "model_autocast",
    "naive_routed_projection",
    "read_checkpoint_metadata",
    "register_shipped_configs",
    "resolve_device",
    "save_checkpoint",
    "tensor_digest",
    "tower_indices",
    "weights_digest",
    "zero_shot_logits",
]

SHIPPED_CONFIG_DIR = Path(__file__).with_name("model_configs")
CHECKPOINT_FORMAT = "safespec-checkpoint/1"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
TOWER_PREFIX = "class_towers."
_NETWORK_PROBE_TIMEOUT_S = 3.0


# ------------------------------------------------------------------------------------------ registry
def register_shipped_configs() -> tuple[str, ...]:
    """Make the configs shipped in ``safespec/model_configs`` known to open_clip by name (idempotent)."""
    names = tuple(sorted(p.stem for p in SHIPPED_CONFIG_DIR.glob("*.json")))
    known = set(open_clip.list_models())
    if any(n not in known for n in names):
        open_clip.add_model_config(SHIPPED_CONFIG_DIR)
    return names


SHIPPED_ARCHS: tuple[str, ...] = register_shipped_configs()


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
        raise ModelError(f"model.device: {device!r} was requested but this torch ({torch.__version__}) sees no CUDA "
                         f"device; use 'auto' or 'cpu'")
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


# ------------------------------------------------------------------------------------------ digests
def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in sorted name order: the same weights give the same
    digest whatever device they sit on or in which order a file stored them."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode("utf-8") + b"\0" + str(t.dtype).encode() + b"\0"
                 + json.dumps(list(t.shape)).encode() + b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """Digest of a module's weights (heads included for a :class:`HeadedCLIP`)."""
    return tensor_digest(model.state_dict())


# ------------------------------------------------------------------------------------------ heads
_SMALL_GROUP = 8  # heads with fewer rows than this share gathered batched matmuls
_GATHER_BLOCK = 64  # rows per gathered matmul: bounds the (rows x width x rank) gathered copy of A


class _SortedGroups(torch.autograd.Function):
    """``base + (h_i @ A[k_i]) @ B[k_i]`` per row, one segment of rows of the same head(s) at a time.

    ``order`` sorts the rows by head, or is None when they already are (the trainer's text batches:
    target captions, then negatives; class prompts class by class), in which case no row is gathered or
    scattered and each segment is added into the output in place. A segment is either all rows of one
    frequently used head (two matmuls) or a run of rows of rarely used heads (their factors gathered per
    row). The backward is written by hand so that every gradient is written once: autograd of the same ops
    zero-fills and scatters a full-size gradient of ``h`` and ``A`` per slice, index and concatenation,
    which cost as much as the projection itself.
    """

    @staticmethod
    def forward(ctx, h, A, B, base, order, ids_sorted, segments, inplace):
        if order is None and inplace:
            ctx.mark_dirty(base)
        out, hs, u = _grouped_forward(h, A, B, base, order, ids_sorted, segments, inplace)
        ctx.save_for_backward(hs, u, A, B, order, ids_sorted)
        ctx.segments = segments
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        hs, u, A, B, order, ids_sorted = ctx.saved_tensors
        g = g.contiguous()
        gs = g if order is None else g.index_select(0, order)
        need_h, need_a, need_b = ctx.needs_input_grad[:3]
        grad_hs = torch.empty_like(hs)
        grad_a = torch.zeros_like(A) if need_a else None
        grad_b = torch.zeros_like(B) if need_b else None
        for s, e, k in ctx.segments:
            gk = gs[s:e]
            if k >= 0:  # each frequent head owns exactly one segment: its gradient is written, not added
                t = gk @ B[k].T
                if grad_b is not None:
                    torch.mm(u[s:e].T, gk, out=grad_b[k])
                if grad_a is not None:
                    torch.mm(hs[s:e].T, t, out=grad_a[k])
                torch.mm(t, A[k].T, out=grad_hs[s:e])
            else:
                ks = ids_sorted[s:e]
                t = torch.bmm(gk.unsqueeze(1), B.index_select(0, ks).transpose(1, 2))  # (rows, 1, rank)
                if grad_b is not None:
                    grad_b.index_add_(0, ks, u[s:e].unsqueeze(2) * gk.unsqueeze(1))
                if grad_a is not None:
                    grad_a.index_add_(0, ks, hs[s:e].unsqueeze(2) * t)
                grad_hs[s:e] = torch.bmm(t, A.index_select(0, ks).transpose(1, 2)).squeeze(1)
        if not need_h:
            grad_h = None
        elif order is None:
            grad_h = grad_hs
        else:
            grad_h = torch.empty_like(grad_hs).index_copy_(0, order, grad_hs)
        return grad_h, grad_a, grad_b, g if ctx.needs_input_grad[3] else None, None, None, None, None


def _grouped_forward(h, A, B, base, order, ids_sorted, segments, inplace):
    """The forward of :class:`_SortedGroups`; also run alone when no gradient is wanted (evaluation), which
    spares the autograd bookkeeping. Returns the output and what the backward needs (sorted h, h @ A)."""
    hs = h if order is None else h.index_select(0, order)
    u = hs.new_empty(hs.shape[0], A.shape[2])
    if order is None:
        ys = base if inplace else base.clone()
    else:
        ys = hs.new_zeros(hs.shape[0], B.shape[2])
    for s, e, k in segments:
        if k >= 0:
            torch.mm(hs[s:e], A[k], out=u[s:e])
            ys[s:e].addmm_(u[s:e], B[k])
        else:
            ks = ids_sorted[s:e]
            u[s:e] = torch.bmm(hs[s:e].unsqueeze(1), A.index_select(0, ks)).squeeze(1)
            ys[s:e] += torch.bmm(u[s:e].unsqueeze(1), B.index_select(0, ks)).squeeze(1)
    return (ys if order is None else base.index_add(0, order, ys)), hs, u


def _segments(heads: list[int], counts: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, head) over rows sorted by head; head -1 marks a run of rarely used heads' rows."""
    out: list[tuple[int, int, int]] = []
    start, run = 0, None
    for k, c in zip(heads, counts):
        if c >= _SMALL_GROUP:
            if run is not None:
                out.append((run, start, -1))
                run = None
            out.append((start, start + c, k))
        else:
            if run is not None and start + c - run > _GATHER_BLOCK:
                out.append((run, start, -1))
                run = None
            if run is None:
                run = start
        start += c
    if run is not None:
        out.append((run, start, -1))
    return out


def grouped_low_rank(h: torch.Tensor, A: torch.Tensor, B: torch.Tensor, head_ids: torch.Tensor,
                     base: torch.Tensor | None = None, *, inplace: bool = False) -> torch.Tensor:
    """``base[i] + (h_i @ A[k_i]) @ B[k_i]`` for every row i (``base`` defaults to zeros), computed per head.

    The grouping is planned on the host from ``head_ids`` (pass them on the CPU, as safespec does, and no
    device synchronisation happens here). Rows already in head order are used where they lie; otherwise
    they are sorted once. When every head has the same number of rows (class prompts: each class has the
    same templates) one batched matmul does all heads; otherwise each frequently used head (the target's
    captions, the negatives) gets two matmuls and rarely used heads' rows share gathered ones
    (:class:`_SortedGroups`). Nothing of size (rows x width x embed) is ever built, and ``B = 0`` returns
    ``base`` bit for bit. ``inplace``: ``base`` is a temporary of the caller's (the plain projection) and may
    be updated in place and returned, which saves a copy of it.
    """
    n = h.shape[0]
    if head_ids.shape != (n,):
        raise ValueError(f"head_ids must have shape ({n},), got {tuple(head_ids.shape)}")
    if base is None:
        base = h.new_zeros(n, B.shape[-1])
    if n == 0:
        return base
    # planned in numpy: a few small torch ops here cost as much as the low-rank matmuls themselves
    ids = head_ids.detach().to("cpu", torch.long).numpy()
    order_np = None if (np.diff(ids) >= 0).all() else np.argsort(ids, kind="stable")
    ids_np = ids if order_np is None else ids[order_np]
    starts = np.flatnonzero(np.r_[True, ids_np[1:] != ids_np[:-1]])
    u_l, c_l = ids_np[starts].tolist(), np.diff(np.r_[starts, n]).tolist()
    if u_l[0] < 0 or u_l[-1] >= A.shape[0]:
        raise ValueError(f"head ids must lie in [0, {A.shape[0]}), got {u_l[0]}..{u_l[-1]}")
    dev = h.device
    order = None if order_np is None else torch.from_numpy(order_np).to(dev, non_blocking=True)
    ids_sorted = torch.from_numpy(ids_np)
    g = len(u_l)
    if g == 1:
        return base + (h @ A[u_l[0]]) @ B[u_l[0]]
    m = c_l[0]
    if all(c == m for c in c_l):
        uniq = torch.tensor(u_l).to(dev, non_blocking=True)  # a blocking copy would sync the stream
        Au, Bu = A.index_select(0, uniq), B.index_select(0, uniq)
        hs = h if order is None else h.index_select(0, order)
        ys = torch.bmm(torch.bmm(hs.view(g, m, -1), Au), Bu).reshape(n, -1)
        return base + ys.to(base.dtype) if order is None else base.index_add(0, order, ys.to(base.dtype))
    # the hand-written backward runs in h's dtype: keep autocast (which would recast each matmul) out
    args = (h, A.to(h.dtype), B.to(h.dtype), base.to(h.dtype), order, ids_sorted.to(dev, non_blocking=True),
            _segments(u_l, c_l), inplace and base.dtype == h.dtype)
    with torch.autocast(dev.type, enabled=False) if torch.is_autocast_enabled(dev.type) else contextlib.nullcontext():
        if torch.is_grad_enabled() and any(t.requires_grad for t in args[:4]):
            return _SortedGroups.apply(*args).to(base.dtype)
        return _grouped_forward(*args)[0].to(base.dtype)


def naive_routed_projection(h: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            head_ids: torch.Tensor) -> torch.Tensor:
    """The paper's reference routing, ``h_i @ (W + A_k B_k)`` with a per-sample matrix. Kept only as the
    numerical reference for tests and the cost baseline in ``bench/heads.py``; never used for training."""
    per_sample = W.unsqueeze(0) + torch.bmm(A[head_ids], B[head_ids])  # (N, width, embed)
    return torch.bmm(h.unsqueeze(1), per_sample).squeeze(1)


class LowRankHeads(nn.Module):
    """One low-rank correction ``A_k B_k`` of the text projection per head (classes, then negatives)."""

    def __init__(self, num_heads: int, width: int, embed_dim: int, rank: int, *, seed: int = 0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if num_heads < 1 or rank < 1:
            raise ValueError(f"need at least one head of rank >= 1 (got {num_heads} heads, rank {rank})")
        g = torch.Generator().manual_seed(int(seed))
        bound = width ** -0.5  # LoRA's scale: h @ A has the magnitude of h, so B learns at the rate of W
        a = (torch.rand(num_heads, width, rank, generator=g) * 2 - 1) * bound
        self.A = nn.Parameter(a.to(device=device, dtype=dtype or torch.float32))
        self.B = nn.Parameter(torch.zeros(num_heads, rank, embed_dim, device=device, dtype=dtype or torch.float32))

    @property
    def num_heads(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[2]

    def forward(self, h: torch.Tensor, head_ids: torch.Tensor, base: torch.Tensor | None = None, *,
                inplace: bool = False) -> torch.Tensor:
        """``base + (h @ A_k) @ B_k`` per row (see :func:`grouped_low_rank`)."""
        return grouped_low_rank(h, self.A.to(h.dtype), self.B.to(h.dtype), head_ids, base, inplace=inplace)


class HeadedCLIP(nn.Module):
    """An open_clip model plus optional task-dependent heads on its text projection, and optional class
    image towers.

    Head ``k < len(classes)`` belongs to class ``k``; head ``len(classes)`` (:attr:`negative_head`) encodes
    the captions of negative examples. Without heads (an old model) it is exactly the open_clip model.

    A class image tower (``model.target_tower``) is that class's own copy of the image tower: class ``c``'s
    similarity is read from it, every other class's from the shared tower. A cycle that trains only the
    target's tower leaves every other class's logit exactly as it was, so the only decisions it can change
    are those into and out of the target class.
    """

    def __init__(self, clip: nn.Module, classes: Sequence[str], heads: LowRankHeads | None = None, *,
                 arch: str = "", model_cfg: dict | None = None, tokenizer_name: str | None = None):
        super().__init__()
        # open_clip's modules are untyped: through nn.Module.__getattr__ every attribute would read as
        # Tensor | Module, so the wrapped model is Any to the type checker
        self.clip: Any = clip
        self.classes: tuple[str, ...] = tuple(classes)
        self.heads = heads
        self.arch = arch
        self.model_cfg = copy.deepcopy(model_cfg) if model_cfg is not None else None
        self.tokenizer_name = tokenizer_name
        self.class_towers = nn.ModuleDict()  # str(class index) -> that class's image tower
        if heads is not None and heads.num_heads != len(self.classes) + 1:
            raise ValueError(f"{heads.num_heads} heads for {len(self.classes)} classes (need classes + 1)")

    # -- the calibrated decision offsets
    @property
    def class_bias(self) -> torch.Tensor | None:
        """Per-class offsets added to the cosine similarities before the temperature, ``(cos + bias) / tau``
        (the target's offset chosen on validation, optimize.calibrate), or None. A buffer only while set, so
        a model without one has exactly the state dict, and so the digest, it always had."""
        return self._buffers.get("class_bias")

    def set_class_bias(self, bias: torch.Tensor | None) -> None:
        if bias is None or not bool(torch.any(bias != 0)):
            self._buffers.pop("class_bias", None)
            return
        if bias.shape != (len(self.classes),):
            raise ValueError(f"class bias must have shape ({len(self.classes)},), got {tuple(bias.shape)}")
        dev = next(self.clip.parameters()).device
        # straight into _buffers: register_buffer refuses a name that the property above already holds
        self._buffers["class_bias"] = bias.detach().to(dev, torch.float32).clone()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, with the optional class bias set (or cleared) and the class image towers made
        (or dropped) to match the state."""
        sd = dict(state_dict)
        bias = sd.pop("class_bias", None)
        self.set_class_bias(None)
        wanted = tower_indices(sd)
        for key in [k for k in self.class_towers if int(k) not in wanted]:
            del self.class_towers[key]
        for c in wanted:
            if str(c) not in self.class_towers:
                self.add_class_tower(c)
        result = super().load_state_dict(sd, strict=strict, assign=assign)
        self.set_class_bias(bias)
        return result

    # -- structure
    @property
    def negative_head(self) -> int:
        return len(self.classes)

    def _text_tower(self) -> tuple[str, Any]:
        c = self.clip
        if isinstance(c, open_clip.CLIP):
            return "clip", c
        text = getattr(c, "text", None)
        if isinstance(text, TextTransformer):
            return "custom", text
        return "other", c

    def _projection(self) -> torch.Tensor | nn.Linear | None:
        kind, tower = self._text_tower()
        return getattr(tower, "text_projection", None) if kind != "other" else None

    @property
    def text_width(self) -> int:
        proj = self._projection()
        if isinstance(proj, nn.Linear):
            return proj.in_features
        if proj is None:
            raise ModelError(f"model.heads: the text tower of {self.arch or type(self.clip).__name__} has no "
                             f"linear text projection for task-dependent heads to adapt; set heads.enabled: false")
        return proj.shape[0]

    @property
    def embed_dim(self) -> int:
        proj = self._projection()
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if proj is None:
            return int(getattr(self.clip, "embed_dim", 0) or self.clip.visual.output_dim)
        return proj.shape[1]

    def add_heads(self, rank: int, seed: int = 0) -> LowRankHeads:
        """Give every class (and the negatives) a fresh head with ``B = 0``: the model's outputs do not change."""
        kind, _ = self._text_tower()
        if kind == "other":
            raise ModelError(f"model.heads: task-dependent heads need open_clip's own text transformer; "
                             f"{self.arch or type(self.clip).__name__} uses a {type(getattr(self.clip, 'text', self.clip)).__name__} "
                             f"text tower; set heads.enabled: false")
        proj = self._projection()
        ref = proj.weight if isinstance(proj, nn.Linear) else proj
        if ref is None:
            raise ModelError("model.heads: this text tower has no text projection to adapt; set heads.enabled: false")
        self.heads = LowRankHeads(len(self.classes) + 1, self.text_width, self.embed_dim, rank, seed=seed,
                                  device=ref.device, dtype=ref.dtype)
        return self.heads

    # -- class image towers
    @property
    def tower_classes(self) -> tuple[int, ...]:
        """The classes with their own image tower, in order."""
        return tuple(sorted(int(k) for k in self.class_towers))

    def add_class_tower(self, index: int) -> nn.Module:
        """Give class ``index`` its own image tower, a copy of the shared one: the model's outputs do not
        change until it trains."""
        if not 0 <= index < len(self.classes):
            raise ValueError(f"class index {index} out of range for {len(self.classes)} classes")
        if str(index) in self.class_towers:
            return self.class_towers[str(index)]
        tower = copy.deepcopy(self.clip.visual)
        self.class_towers[str(index)] = tower
        return tower

    # -- encoders
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The shared image tower's features (what every class without a tower of its own reads)."""
        feats = self.clip.encode_image(images)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_tower_images(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Normalised features of ``images`` from every class image tower ({} without towers)."""
        return {c: F.normalize(self.class_towers[str(c)](images), dim=-1) for c in self.tower_classes}

    def text_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled text feature ``h`` just before the text projection (what the heads adapt)."""
        kind, t = self._text_tower()
        if kind == "clip":  # mirrors open_clip.CLIP.encode_text up to the projection
            cast_dtype = t.transformer.get_cast_dtype()
            x = t.token_embedding(tokens).to(cast_dtype)
            x = x + t.positional_embedding.to(cast_dtype)
            x = t.transformer(x, attn_mask=t.attn_mask)
            x = t.ln_final(x)
            return text_global_pool(x, tokens, t.text_pool_type, eos_token_id=getattr(t, "text_eos_id", None))
        if kind == "custom":  # mirrors open_clip.TextTransformer.forward up to the projection
            x, attn_mask = t._embeds(tokens)
            x = t.transformer(x, attn_mask=attn_mask)
            if t.cls_emb is not None:
                return t.ln_final(text_global_pool(x, pool_type="last"))
            x = t.ln_final(x)
            return text_global_pool(x, tokens, pool_type=t.pool_type, eos_token_id=getattr(t, "eos_id", None))
        raise ModelError(f"model.heads: cannot reach the text projection of {type(self.clip).__name__}; "
                         f"set heads.enabled: false")

    def project_text(self, h: torch.Tensor, head_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``h @ W`` (+ ``(h @ A_k) @ B_k`` per row when heads exist and ``head_ids`` is given)."""
        proj = self._projection()
        if proj is None:
            plain = h
        elif isinstance(proj, nn.Linear):
            plain = proj(h)
        else:
            plain = h @ proj
        if self.heads is None or head_ids is None:
            return plain
        return self.heads(h, head_ids, base=plain, inplace=True)  # plain is ours: no copy of it

    def encode_text(self, tokens: torch.Tensor, head_ids: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """Text embeddings; row i goes through head ``head_ids[i]``, or through the shared projection
        alone when ``head_ids`` is None or the model has no heads."""
        if self.heads is None or head_ids is None:
            feats = self.clip.encode_text(tokens)
        else:
            feats = self.project_text(self.text_hidden(tokens), head_ids)
        return F.normalize(feats, dim=-1) if normalize else feats

    def class_prompts(self, class_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(C, T, L) prompt tokens -> the (C*T, L) prompts class by class and their head ids (class c's
        templates through head c; None without heads). The ids live on the host: grouping them needs no
        device sync."""
        if class_tokens.dim() != 3:
            raise ValueError(f"class tokens must be (classes, templates, length), got {tuple(class_tokens.shape)}")
        c, t, length = class_tokens.shape
        ids = None
        if self.heads is not None:
            if c != len(self.classes):
                raise ValueError(f"{c} classes of prompts for a model with heads for {len(self.classes)} classes")
            ids = torch.arange(c).repeat_interleave(t)
        return class_tokens.reshape(c * t, length), ids

    @staticmethod
    def pool_templates(prompt_features: torch.Tensor, classes: int) -> torch.Tensor:
        """Normalised per-prompt features, class by class -> (C, D): averaged over templates, renormalised."""
        return F.normalize(prompt_features.view(classes, -1, prompt_features.shape[-1]).mean(dim=1), dim=-1)

    def class_text_features(self, class_tokens: torch.Tensor) -> torch.Tensor:
        """(C, T, L) prompt tokens -> (C, D): every template of class c through head c, each prompt
        normalised, averaged over templates, renormalised."""
        flat, ids = self.class_prompts(class_tokens)
        return self.pool_templates(self.encode_text(flat, ids, normalize=True), class_tokens.shape[0])

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                head_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(tokens, head_ids) if tokens is not None else None
        return img, txt


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


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs through the root logger ("initialized randomly", download chatter); safespec reports
    what it loaded itself, so these lines would only be noise in a CLI run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _close(name: str, options: Iterable[str], n: int = 5) -> str:
    opts = list(options)
    close = difflib.get_close_matches(name, opts, n=n, cutoff=0.5)
    if not close:
        close = [o for o in opts if name.lower().split("-")[0] in o.lower()][:n]
    return ", ".join(close)


def _check_arch(arch: str) -> dict:
    cfg = open_clip.get_model_config(arch) if not arch.startswith(("hf-hub:", "local-dir:")) else None
    if cfg is None:
        near = _close(arch, open_clip.list_models())
        hint = f"; did you mean {near}?" if near else f"; shipped configs: {', '.join(SHIPPED_ARCHS)}"
        raise ModelError(f"model.arch: unknown open_clip architecture {arch!r}{hint}")
    return cfg


def _instantiate(model_cfg: dict, preprocess_cfg: dict | None, device: torch.device, seed: int | None) -> Any:
    """Build an open_clip model from a config dict (random init: weights come from a checkpoint or stay random)."""
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
            with _quiet_open_clip():
                clip = cls(**cfg)
        except ModelError:
            raise
        except Exception as e:  # e.g. an HF text tower without `transformers`
            raise ModelError(f"model.arch: cannot build this architecture here: {type(e).__name__}: "
                             f"{_first_line(e)}") from e
    pp = dataclasses.asdict(PreprocessCfg())
    if getattr(clip.visual, "image_size", None) is not None:
        pp["size"] = clip.visual.image_size
    pp = merge_preprocess_dict(pp, preprocess_cfg or {})
    open_clip.set_model_preprocess_cfg(clip, pp)
    return clip.to(device)


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
            return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                               tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
        return SimpleTokenizer(context_length=context_length, **kwargs)
    except Exception as e:
        raise ModelError(f"model: cannot build the tokenizer of {name or 'this model'}: {type(e).__name__}: "
                         f"{_first_line(e)}") from e


def _finish(clip: Any, classes: Sequence[str], *, arch: str, model_cfg: dict | None, tokenizer_name: str | None,
            heads_state: dict[str, torch.Tensor] | None, heads: bool, rank: int, seed: int, device: torch.device,
            precision: str, source: str) -> LoadedModel:
    hc = HeadedCLIP(clip, classes, arch=arch, model_cfg=model_cfg, tokenizer_name=tokenizer_name)
    if heads_state is not None:
        k, width, r = heads_state["heads.A"].shape
        hc.heads = LowRankHeads(k, width, heads_state["heads.B"].shape[2], r, device=device)
        hc.heads.load_state_dict({"A": heads_state["heads.A"], "B": heads_state["heads.B"]})
    elif heads:
        hc.add_heads(rank, seed=seed)
    hc.to(device)
    preprocess, train_preprocess = _transforms(clip)
    tok = _tokenizer(tokenizer_name, model_cfg, int(clip.context_length))
    return LoadedModel(model=hc, preprocess=preprocess, tokenizer=tok, digest=weights_digest(hc), source=source,
                       arch=arch, device=device, precision=precision, train_preprocess=train_preprocess)


def create_model(arch: str, classes: Sequence[str], *, heads: bool = True, rank: int = 8, seed: int = 0,
                 device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    """A randomly initialised model of a known architecture (deterministic given ``seed``): the start of a
    model trained from scratch, such as the demo world's v1."""
    cfg = _check_arch(arch)
    model_autocast("cpu", precision)  # validates the precision name
    dev = resolve_device(device)
    clip = _instantiate(cfg, None, dev, seed)
    return _finish(clip, classes, arch=arch, model_cfg=cfg, tokenizer_name=arch, heads_state=None, heads=heads,
                   rank=rank, seed=seed, device=dev, precision=precision,
                   source=f"{arch}, random initialisation (seed {seed})")


# ------------------------------------------------------------------------------------------ pretrained weights
def _hub_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in truthy:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in truthy:
        return True
    try:
        from huggingface_hub import constants
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
    from huggingface_hub import try_to_load_from_cache
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
        f"safespec.model.save_checkpoint and set model.checkpoint to that file")


def _fetch_command(model_name: str, tag: str | None) -> str:
    args = repr(model_name) + (f", pretrained={tag!r}" if tag else "")
    return f'python -c "import open_clip; open_clip.create_model({args})"'


def _ensure_available(files: list[tuple[str, list[str]]], url: str | None, what: str, cache_dir: str | None,
                      fetch: str) -> bool:
    """Fail fast, with one line, when weights are neither cached nor fetchable. Returns True when cached."""
    from huggingface_hub import constants
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


def _load_pretrained(arch: str, pretrained: str, device: torch.device, cache_dir: str | None
                     ) -> tuple[nn.Module, dict, str | None, str]:
    """(clip, model_cfg, tokenizer name, source) for an open_clip tag or an ``hf-hub:`` name."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    kwargs: dict[str, Any] = {}
    if pretrained.startswith("hf-hub:") or arch.startswith("hf-hub:"):
        name = pretrained if pretrained.startswith("hf-hub:") else arch
        repo = name[len("hf-hub:"):]
        if not repo or repo.count("/") != 1:
            raise ModelError(f"model.pretrained: {name!r} is not an 'hf-hub:org/name' model id")
        _ensure_available([(repo, [HF_CONFIG_NAME]), (repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME])], None,
                          f"of {name}", cache_dir, _fetch_command(name, None))
        model_name, tag, tokenizer_name, source = name, None, None, name
    else:
        _check_arch(arch)
        pcfg = open_clip.get_pretrained_cfg(arch, pretrained)
        if not pcfg:
            if os.path.isfile(pretrained):
                raise ModelError(f"model.pretrained: {pretrained!r} is a file; local weights go in model.checkpoint")
            tags = open_clip.list_pretrained_tags_by_model(arch)
            near = _close(pretrained, tags) or ", ".join(tags[:8])
            raise ModelError(f"model.pretrained: open_clip has no pretrained tag {pretrained!r} for {arch}"
                             + (f"; known tags: {near}" if near else "; it ships no pretrained weights"))
        if "file" not in pcfg:
            hub = pcfg.get("hf_hub", "")
            files: list[tuple[str, list[str]]] = []
            url = None
            if hub:
                repo, fn = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
                fn = fn or HF_WEIGHTS_NAME
                alts = [HF_SAFE_WEIGHTS_NAME] if fn == HF_WEIGHTS_NAME else (
                    [fn[:-4] + ".safetensors"] if fn.endswith((".bin", ".pth")) else [])
                files = [(repo, [*alts, fn])]
            else:
                url = pcfg.get("url") or None
            _ensure_available(files, url, f"{arch}/{pretrained} ({hub.rstrip('/') or url})", cache_dir,
                              _fetch_command(arch, pretrained))
        if pcfg.get("quick_gelu", False) and not open_clip.get_model_config(arch).get("quick_gelu", False):
            kwargs["force_quick_gelu"] = True  # the tag was trained with QuickGELU: build what it was trained as
        model_name, tag, tokenizer_name, source = arch, pretrained, arch, f"{arch} / {pretrained} (open_clip)"
    try:
        with _quiet_open_clip():
            clip = open_clip.create_model(model_name, pretrained=tag, device=device, cache_dir=cache_dir,
                                          require_pretrained=True, weights_only=True, **kwargs)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"model.pretrained: could not load {source}: {type(e).__name__}: {_first_line(e)}") from e
    if model_name.startswith("hf-hub:"):
        cfg_path = _hf_cached(model_name[len("hf-hub:"):], [HF_CONFIG_NAME], cache_dir)
        with open(cfg_path, encoding="utf-8") as f:  # type: ignore[arg-type]
            hub_cfg = json.load(f)
        model_cfg = hub_cfg.get("model_cfg", hub_cfg)
    else:
        model_cfg = open_clip.get_model_config(arch)
        if kwargs.get("force_quick_gelu"):
            model_cfg["quick_gelu"] = True
    return clip, model_cfg, tokenizer_name, source


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
    from safetensors import safe_open
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
        from safetensors.torch import load_file
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
            what = ("refused: unpickling this checkpoint would run code" if needs_code else
                    "not a readable torch checkpoint: the weights-only unpickler rejected it")
            raise ModelError(f"{p}: {what} ({reason}); safespec loads only tensors (torch.load weights_only=True); "
                             f"re-save the model's state_dict, or use .safetensors") from e
        except Exception as e:
            raise ModelError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {_first_line(e)})") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not obj or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise ModelError(f"{p}: expected a state dict (names -> tensors), got {type(obj).__name__}")
        sd = dict(obj)
    else:
        raise ModelError(f"model.checkpoint: {p}: unsupported file type {suffix or '(none)'!r}; "
                         f"expected .safetensors, .pt, .pth or .bin")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, meta


def save_checkpoint(model: HeadedCLIP, path: str | os.PathLike, metadata: dict | None = None) -> str:
    """Write ``model`` (heads included) as safetensors, atomically; returns its weights digest."""
    from safetensors.torch import save
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


def tower_indices(sd: Mapping[str, torch.Tensor]) -> list[int]:
    """The classes whose image tower a state dict holds (keys ``class_towers.<index>.``)."""
    out = set()
    for k in sd:
        if k.startswith(TOWER_PREFIX):
            head = k[len(TOWER_PREFIX):].split(".", 1)[0]
            if not head.isdigit():
                raise ModelError(f"unexpected tensor {k!r}: a class image tower is named by its class index")
            out.add(int(head))
    return sorted(out)


def _split_state(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A safespec checkpoint prefixes the open_clip weights with ``clip.``; a plain open_clip one does not."""
    if any(k.startswith("clip.") for k in sd):
        clip_sd = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")}
        heads = {k: v for k, v in sd.items() if k.startswith("heads.")}
        other = sorted(k for k in sd if not k.startswith(("clip.", "heads.", TOWER_PREFIX)) and k != "class_bias")
        if other:
            raise ModelError(f"unexpected tensors in a safespec checkpoint: {', '.join(other[:5])}")
        return clip_sd, (heads or None)
    return dict(sd), None


def _load_from_checkpoint(mp: ModelPlan, classes: Sequence[str], device: torch.device, seed: int) -> LoadedModel:
    path = Path(mp.checkpoint)  # type: ignore[arg-type]
    sd, meta = load_checkpoint(path)
    clip_sd, heads_sd = _split_state(sd)
    if meta.get("arch") and meta["arch"] != mp.arch:
        raise ModelError(f"model.arch: {path} holds a {meta['arch']!r} model but the spec says {mp.arch!r}")
    model_cfg = meta.get("model_cfg") or _check_arch(mp.arch)
    tokenizer_name = meta.get("tokenizer") or mp.arch

    if heads_sd is not None:
        if set(heads_sd) != {"heads.A", "heads.B"} or heads_sd["heads.A"].dim() != 3 or heads_sd["heads.B"].dim() != 3:
            raise ModelError(f"{path}: malformed task-dependent heads ({', '.join(sorted(heads_sd))})")
        k, _, r = heads_sd["heads.A"].shape
        ck_classes = meta.get("classes")
        if ck_classes is not None and list(ck_classes) != list(classes):
            raise ModelError(f"classes: {path} has task-dependent heads for classes {_short(ck_classes)} but the "
                             f"spec lists {_short(classes)}; heads belong to their classes, in order")
        if k != len(classes) + 1:
            raise ModelError(f"classes: {path} has {k} task-dependent heads ({k - 1} classes + negatives) but the "
                             f"spec lists {len(classes)} classes")
        if not mp.heads:
            raise ModelError(f"model.heads.enabled: {path} has task-dependent heads, which are part of the old "
                             f"model; set heads.enabled: true (rank {r})")
        if r != mp.rank:
            raise ModelError(f"model.heads.rank: {path} has heads of rank {r} but the spec asks for rank {mp.rank}; "
                             f"a trained head keeps its rank")

    clip = _instantiate(model_cfg, meta.get("preprocess_cfg"), torch.device("cpu"), seed=0)
    if "logit_scale" in clip_sd and clip_sd["logit_scale"].shape != clip.logit_scale.shape:
        clip_sd["logit_scale"] = clip_sd["logit_scale"].reshape(clip.logit_scale.shape)
    try:
        result = clip.load_state_dict(clip_sd, strict=False)
    except RuntimeError as e:
        msg = " ".join(ln.strip() for ln in str(e).splitlines()[1:3]) or _first_line(e)
        raise ModelError(f"model.checkpoint: {path} does not fit architecture {mp.arch}: {msg}") from e
    missing = [k for k in result.missing_keys if k != "attn_mask"]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if result.unexpected_keys:
            u = result.unexpected_keys
            parts.append(f"unexpected {', '.join(u[:4])}{' ...' if len(u) > 4 else ''}")
        raise ModelError(f"model.checkpoint: {path} does not fit architecture {mp.arch}: {'; '.join(parts)}")
    clip.to(device)
    desc = f"checkpoint {path}"
    if heads_sd is None and mp.heads:
        desc += " (no heads: fresh task-dependent heads added, B = 0)"
    bias = sd.get("class_bias")
    if bias is not None:
        if bias.shape != (len(classes),):
            raise ModelError(f"classes: {path} has class offsets for {bias.shape[0] if bias.dim() else 0} classes but "
                             f"the spec lists {len(classes)}")
        if not torch.isfinite(bias).all():
            raise ModelError(f"model.checkpoint: {path} has non-finite class offsets")
        desc += " (with calibrated class offsets)"
    loaded = _finish(clip, classes, arch=mp.arch, model_cfg=model_cfg, tokenizer_name=tokenizer_name,
                     heads_state=heads_sd, heads=mp.heads, rank=mp.rank, seed=seed, device=device,
                     precision=mp.precision, source=desc)
    towers = {k: v for k, v in sd.items() if k.startswith(TOWER_PREFIX)}
    if towers:
        indices = tower_indices(towers)
        if indices[-1] >= len(classes):
            raise ModelError(f"classes: {path} has an image tower for class {indices[-1]} but the spec lists "
                             f"{len(classes)} classes")
        hc = loaded.model
        for c in indices:
            hc.add_class_tower(c)
        want = {k for k in hc.state_dict() if k.startswith(TOWER_PREFIX)}
        if set(towers) != want:
            odd = sorted(set(towers) ^ want)
            raise ModelError(f"model.checkpoint: {path}: malformed class image towers ({', '.join(odd[:4])})")
        try:
            hc.class_towers.load_state_dict({k[len(TOWER_PREFIX):]: v for k, v in towers.items()})
        except RuntimeError as e:
            raise ModelError(f"model.checkpoint: {path}: its class image towers do not fit {mp.arch} "
                             f"({_first_line(e)})") from e
        hc.class_towers.to(device)
        loaded.source += f" (with image towers of {', '.join(repr(classes[c]) for c in indices)})"
    if bias is not None:
        loaded.model.set_class_bias(bias)
    if bias is not None or towers:
        loaded.refresh_digest()
    return loaded


def _short(names: Sequence[str], n: int = 6) -> str:
    names = list(names)
    return "[" + ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "") + "]"


def load_model(mp: ModelPlan, classes: Sequence[str], *, device: str | torch.device | None = None,
               seed: int = 0, cache_dir: str | None = None) -> LoadedModel:
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
    return _finish(clip, classes, arch=mp.arch, model_cfg=model_cfg, tokenizer_name=tokenizer_name,
                   heads_state=None, heads=mp.heads, rank=mp.rank, seed=seed, device=dev, precision=mp.precision,
                   source=source + (" + fresh task-dependent heads (B = 0)" if mp.heads else ""))


# ------------------------------------------------------------------------------------------ zero-shot
def build_class_tokens(tokenizer: Callable[[Sequence[str]], torch.Tensor], classes: Sequence[str],
                       templates: Sequence[str]) -> torch.Tensor:
    """(C, T, L) tokens: every template filled with every class name."""
    if not templates:
        raise ValueError("at least one prompt template is required")
    flat = [t.format(c) for c in classes for t in templates]
    tok = tokenizer(flat)
    return tok.view(len(classes), len(templates), -1)


def zero_shot_logits(image_features: torch.Tensor, text_features: torch.Tensor, tau: float) -> torch.Tensor:
    """Cosine similarity / tau between every image and every class (inputs need not be normalised)."""
    return F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T / tau


def class_logits(image_features: torch.Tensor, text_features: torch.Tensor, tau: float,
                 bias: torch.Tensor | None = None, towers: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Zero-shot logits of normalised features, ``(cos + bias) / tau`` (``bias``: the model's calibrated
    class offsets, if any). Class ``c``'s cosine is read from ``towers[c]``, the features of its own image
    tower, where given; every other class's from the shared ``image_features``, so its logit is exactly
    what it is without towers."""
    sims = image_features @ text_features.T
    if towers:
        idx = torch.tensor(list(towers), device=sims.device)
        # the full product, one column kept: the same kernel as the shared one, so a tower that is still a
        # copy of the shared tower gives the same bits
        cols = torch.stack([(f.to(sims.dtype) @ text_features.T)[:, c] for c, f in towers.items()], 1)
        sims = sims.index_copy(1, idx, cols)
    return (sims if bias is None else sims + bias.to(sims.dtype)) / tau


@dataclass
class ZeroShotOutput:
    logits: torch.Tensor  # (N, C) float32, on CPU
    predictions: torch.Tensor  # (N,) int64, on CPU


class ZeroShotClassifier:
    """Classify images by their cosine similarity to each class's prompt embedding (through its own head)."""

    def __init__(self, model: HeadedCLIP, tokenizer: Callable[[Sequence[str]], torch.Tensor],
                 templates: Sequence[str], tau: float = 0.05, precision: str = "fp32"):
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.model = model
        self.tau = float(tau)
        self.precision = precision
        self.templates = tuple(templates)
        self.class_tokens = build_class_tokens(tokenizer, model.classes, self.templates)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_features(self, *, grad: bool = False) -> torch.Tensor:
        """(C, D) class embeddings; without gradients unless ``grad`` (training through the text tower)."""
        tokens = self.class_tokens.to(self.device)
        with model_autocast(self.device, self.precision), torch.set_grad_enabled(grad):
            return self.model.class_text_features(tokens)

    def logits(self, images_or_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) cosine / tau for a batch of images (N, 3, H, W) or of image features (N, D)."""
        if text_features is None:
            text_features = self.text_features()
        x = images_or_features
        towers: dict[int, torch.Tensor] = {}
        if x.dim() == 4:
            with model_autocast(self.device, self.precision):
                images = x.to(self.device)
                x = self.model.encode_image(images)
                towers = self.model.encode_tower_images(images)
        elif self.model.class_towers:
            raise ValueError("a model with class image towers classifies images, not shared features")
        return class_logits(F.normalize(x.float(), dim=-1), F.normalize(text_features.float().to(x.device), dim=-1),
                            self.tau, self.model.class_bias,
                            {c: F.normalize(f.float(), dim=-1) for c, f in towers.items()})  # as the shared features

    @torch.no_grad()
    def predict_batches(self, batches: Iterable[Any]) -> ZeroShotOutput:
        """Logits and predictions over batches of images (a tensor, or a tuple whose first item is one);
        the text side is computed once for all batches."""
        was_training = self.model.training
        self.model.eval()
        try:
            text = self.text_features()
            out = []
            for batch in batches:
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                out.append(self.logits(images, text).cpu())
        finally:
            self.model.train(was_training)
        logits = torch.cat(out) if out else torch.zeros(0, len(self.model.classes))
        return ZeroShotOutput(logits=logits, predictions=logits.argmax(dim=1))

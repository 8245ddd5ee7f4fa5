"""The headed CLIP: an open_clip model with task-dependent heads, per-class image towers and class biases,
and the one zero-shot logits function every path (training, evaluation, the classifier) uses."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._compat import import_open_clip
from ..errors import ModelError
from . import prompt_tree as _tree
from .heads import LowRankHeads
from .prompt_tree import PromptTree, supports, tree_text_hidden

open_clip = import_open_clip()  # open_clip only after the torchvision fix
from open_clip.transformer import TextTransformer, text_global_pool  # noqa: E402  (after the torchvision fix)

TOWER_PREFIX = "class_towers."


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

    def __init__(
        self,
        clip: nn.Module,
        classes: Sequence[str],
        heads: LowRankHeads | None = None,
        *,
        arch: str = "",
        model_cfg: dict | None = None,
        tokenizer_name: str | None = None,
    ):
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

    @property
    def rival_bias(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-rival offsets (optimize.calibrate.target_offset: per-rival), or None: ``(order, offsets)``,
        row ``r`` of ``offsets`` (cosine units, one per class) raising class ``order[r]``'s cosine by the
        entry of its strongest rival (:class:`DecisionBias`). Buffers only while set, as the class bias."""
        order, offsets = self._buffers.get("rival_order"), self._buffers.get("rival_bias")
        return None if order is None or offsets is None else (order, offsets)

    def set_rival_bias(self, order: torch.Tensor | None, offsets: torch.Tensor | None) -> None:
        self._buffers.pop("rival_order", None)
        self._buffers.pop("rival_bias", None)
        if order is None or offsets is None or order.numel() == 0:
            return
        C = len(self.classes)
        if order.dim() != 1 or offsets.shape != (order.numel(), C):
            raise ValueError(f"rival offsets must be (rows, {C}) with one class index per row")
        if order.dtype.is_floating_point or bool(((order < 0) | (order >= C)).any()):
            raise ValueError(f"rival offsets' class indices must be integers in [0, {C})")
        dev = next(self.clip.parameters()).device
        self._buffers["rival_order"] = order.detach().to(dev, torch.int64).clone()
        self._buffers["rival_bias"] = offsets.detach().to(dev, torch.float32).clone()

    @property
    def decision_bias(self) -> DecisionBias | None:
        """Every calibrated decision offset the model has, for :func:`class_logits`; None if it has none."""
        bias, rivals = self.class_bias, self.rival_bias
        if bias is None and rivals is None:
            return None
        return DecisionBias(bias, *(rivals or (None, None)))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, with the optional class bias and rival offsets set (or cleared) and the class
        image towers made (or dropped) to match the state."""
        sd = dict(state_dict)
        bias = sd.pop("class_bias", None)
        order, offsets = sd.pop("rival_order", None), sd.pop("rival_bias", None)
        self.set_class_bias(None)
        self.set_rival_bias(None, None)
        wanted = tower_indices(sd)
        for key in [k for k in self.class_towers if int(k) not in wanted]:
            del self.class_towers[key]
        for c in wanted:
            if str(c) not in self.class_towers:
                self.add_class_tower(c)
        result = super().load_state_dict(sd, strict=strict, assign=assign)
        self.set_class_bias(bias)
        self.set_rival_bias(order, offsets)
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
            raise ModelError(
                f"model.heads: the text tower of {self.arch or type(self.clip).__name__} has no "
                f"linear text projection for task-dependent heads to adapt; set heads.enabled: false"
            )
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
            raise ModelError(
                f"model.heads: task-dependent heads need open_clip's own text transformer; "
                f"{self.arch or type(self.clip).__name__} uses a {type(getattr(self.clip, 'text', self.clip)).__name__} "
                f"text tower; set heads.enabled: false"
            )
        proj = self._projection()
        ref = proj.weight if isinstance(proj, nn.Linear) else proj
        if ref is None:
            raise ModelError("model.heads: this text tower has no text projection to adapt; set heads.enabled: false")
        self.heads = LowRankHeads(
            len(self.classes) + 1, self.text_width, self.embed_dim, rank, seed=seed, device=ref.device, dtype=ref.dtype
        )
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

    def prompt_tree(self, tokens: torch.Tensor) -> PromptTree | None:
        """``tokens`` as a tree of shared prefixes (model.prompt_tree), which :meth:`text_hidden` encodes at
        a cost that follows the distinct prefix tokens; None where this text tower is not one it covers, or
        for fewer than ``prompt_tree.MIN_PROMPTS`` prompts."""
        kind, t = self._text_tower()
        if kind != "clip" or not supports(t) or tokens.shape[0] < _tree.MIN_PROMPTS:
            return None
        return PromptTree.build(tokens).to(tokens.device)

    def text_hidden(self, tokens: torch.Tensor | PromptTree) -> torch.Tensor:
        """The pooled text feature ``h`` just before the text projection (what the heads adapt), of padded
        prompt tokens or of a :meth:`prompt_tree` of them."""
        kind, t = self._text_tower()
        if isinstance(tokens, PromptTree):
            if kind != "clip" or not supports(t):
                raise ModelError(
                    f"a prompt tree cannot encode the text tower of {self.arch or type(self.clip).__name__}"
                )
            return tree_text_hidden(t, tokens)
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
        raise ModelError(
            f"model.heads: cannot reach the text projection of {type(self.clip).__name__}; set heads.enabled: false"
        )

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

    def encode_text(
        self, tokens: torch.Tensor | PromptTree, head_ids: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Text embeddings; row i goes through head ``head_ids[i]``, or through the shared projection
        alone when ``head_ids`` is None or the model has no heads."""
        if isinstance(tokens, PromptTree):
            feats = self.project_text(self.text_hidden(tokens), head_ids)
        elif self.heads is None or head_ids is None:
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

    def forward(
        self,
        images: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        head_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        img = self.encode_image(images) if images is not None else None
        txt = self.encode_text(tokens, head_ids) if tokens is not None else None
        return img, txt


def tower_indices(sd: Mapping[str, torch.Tensor]) -> list[int]:
    """The classes whose image tower a state dict holds (keys ``class_towers.<index>.``)."""
    out = set()
    for k in sd:
        if k.startswith(TOWER_PREFIX):
            head = k[len(TOWER_PREFIX) :].split(".", 1)[0]
            if not head.isdigit():
                raise ModelError(f"unexpected tensor {k!r}: a class image tower is named by its class index")
            out.add(int(head))
    return sorted(out)


# ------------------------------------------------------------------------------------------ zero-shot
def build_class_tokens(
    tokenizer: Callable[[Sequence[str]], torch.Tensor], classes: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, T, L) tokens: every template filled with every class name."""
    if not templates:
        raise ValueError("at least one prompt template is required")
    flat = [t.format(c) for c in classes for t in templates]
    tok = tokenizer(flat)
    return tok.view(len(classes), len(templates), -1)


def zero_shot_logits(image_features: torch.Tensor, text_features: torch.Tensor, tau: float) -> torch.Tensor:
    """Cosine similarity / tau between every image and every class (inputs need not be normalised)."""
    return F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T / tau


class DecisionBias:
    """A model's calibrated decision offsets, in cosine units.

    ``classes`` (one per class, or None) is added to every image's cosines. Each row ``r`` of ``rivals``
    then raises class ``order[r]``'s cosine by ``rivals[r, k]``, where ``k`` is that image's strongest rival
    of it (the best other class) as the cosines stand after the rows before: the class's threshold depends
    on the class it competes with, and no other class moves. Rows apply in order, one per cycle that set
    one, so a later cycle's row is calibrated on exactly the logits the earlier rows leave."""

    def __init__(
        self, classes: torch.Tensor | None, order: torch.Tensor | None = None, rivals: torch.Tensor | None = None
    ):
        self.classes, self.order, self.rivals = classes, order, rivals

    def apply(self, sims: torch.Tensor) -> torch.Tensor:
        if self.classes is not None:
            sims = sims + self.classes.to(sims.dtype)
        if self.order is None or self.rivals is None:
            return sims
        cols = torch.arange(sims.shape[1], device=sims.device)
        for c, row in zip(self.order.tolist(), self.rivals.to(sims.dtype)):
            rest = sims.detach().masked_fill(cols == c, float("-inf"))
            sims = sims + (cols == c).to(sims.dtype) * row[rest.argmax(1)].unsqueeze(1)
        return sims


def class_logits(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    tau: float,
    bias: torch.Tensor | DecisionBias | None = None,
    towers: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Zero-shot logits of normalised features, ``(cos + bias) / tau`` (``bias``: the model's calibrated
    class offsets, if any, or all its decision offsets as a :class:`DecisionBias`). Class ``c``'s cosine
    is read from ``towers[c]``, the features of its own image tower, where given; every other class's from
    the shared ``image_features``, so its logit is exactly what it is without towers."""
    sims = image_features @ text_features.T
    if towers:
        idx = torch.tensor(list(towers), device=sims.device)
        # the full product, one column kept: the same kernel as the shared one, so a tower that is still a
        # copy of the shared tower gives the same bits
        cols = torch.stack([(f.to(sims.dtype) @ text_features.T)[:, c] for c, f in towers.items()], 1)
        sims = sims.index_copy(1, idx, cols)
    if isinstance(bias, DecisionBias):
        return bias.apply(sims) / tau
    return (sims if bias is None else sims + bias.to(sims.dtype)) / tau

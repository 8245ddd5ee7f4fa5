"""Class prompts encoded as a tree of shared prefixes.

With the text tower trained, every step encodes every class's prompts, so a step with hundreds of
protected classes spends most of its time there. Those prompts are mostly the same tokens: "a photo of a"
opens every prompt of a template, and a context of fixed length pads each one with tokens after its
end-of-text that nothing reads. Under CLIP's causal mask a token's hidden state depends only on the tokens
before it, so a prefix shared by several prompts has the same hidden states in all of them, and the tokens
after the pooled end-of-text never reach the pooled feature at all.

A :class:`PromptTree` therefore holds each distinct prefix once, up to each prompt's end-of-text: one node
per distinct prefix, which attends to its ancestors (its own prefix) and to nothing else. Encoding the tree
computes the same pooled features as encoding the padded prompts one by one, up to float rounding (the
reductions run in another order), with its cost following the number of distinct prefix tokens rather than
prompts x context length. The last block runs its queries, its MLP and the final norm only for the pooled
nodes: nothing reads the others' outputs there.

A node's attention over its ancestors comes in two parts. The shallow depths hold few distinct nodes ("<sot>
a photo of a" is the same five nodes under every class of a template), so every node scores those shared keys
with one matrix product and masks the ones that are not its ancestors; only the deep, class-specific depths
gather each node's own keys. The gathered tensors are memory-bound elementwise work, the shared product is a
small dense one, and the softmax runs over both parts together, so the result is the same attention
(bench/RESULTS.md, "Scaling": what it saves, and the floor no attention can go below).

It covers open_clip's own ``CLIP`` text tower with its causal mask and argmax (end-of-text) pooling, the
tower every shipped and most pretrained configs use; :func:`supports` says when, and anything else is
encoded the plain way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Below this many prompts a step encodes them padded, as before the tree: their text side is a few
#: percent of a step (bench/RESULTS.md, "Scaling": 4% with 5 classes), and the padded encoding keeps a
#: spec's numbers bit-for-bit those of earlier versions (the tree's agree only to float rounding).
MIN_PROMPTS = 64

#: At most this many distinct nodes are scored densely by every node (the shared part of the attention):
#: the ancestors at the depths with the fewest distinct nodes, taken while they fit. Past a few dozen keys the
#: dense product costs more than gathering each node's own.
SHARED_KEYS = 64


@dataclass(frozen=True)
class PromptTree:
    """Distinct prompt prefixes as nodes. ``ancestors[i, j]`` is node ``i``'s ancestor at depth ``j``
    (itself at its own depth; 0 past it, masked by ``mask``); :attr:`pooled` ``[p]`` is the node of prompt
    ``p``'s end-of-text, whose hidden state is that prompt's pooled feature."""

    tokens: torch.Tensor  # (N,) token id of each node
    depth: torch.Tensor  # (N,) position of each node in its prompts
    ancestors: torch.Tensor  # (N, D) long
    mask: torch.Tensor  # (N, D) float: 0 where attended, -inf elsewhere
    keep: torch.Tensor  # (K,) long: the distinct pooled nodes, ascending (the last block runs only these)
    where: torch.Tensor  # (P,) long: prompt p's pooled node is keep[where[p]]
    shared: torch.Tensor  # (S,) long: the nodes every node scores densely (the shallow depths' ancestors)
    shared_mask: torch.Tensor  # (N, S) float: 0 where shared[s] is an ancestor of node i, -inf elsewhere
    deep: torch.Tensor  # (N, E) long: each node's ancestors at the other depths, gathered (0 past it)
    deep_mask: torch.Tensor  # (N, E) float: 0 where attended, -inf elsewhere

    @property
    def pooled(self) -> torch.Tensor:
        """(P,): the node of each prompt's end-of-text."""
        return self.keep[self.where]

    @property
    def prompts(self) -> int:
        return int(self.where.shape[0])

    @property
    def nodes(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def build(cls, tokens: torch.Tensor, shared_keys: int | None = None) -> PromptTree:
        """The tree of ``tokens`` (P, L), each row cut after its argmax token (open_clip's end-of-text
        pooling); at most ``shared_keys`` (default :data:`SHARED_KEYS`) nodes attended densely."""
        if tokens.dim() != 2 or tokens.shape[0] == 0:
            raise ValueError(f"prompt tokens must be a non-empty (prompts, length) matrix, got {tuple(tokens.shape)}")
        ends = tokens.argmax(dim=-1).tolist()
        rows = tokens.tolist()
        index: dict[tuple[int, ...], int] = {}
        node_token: list[int] = []
        node_path: list[list[int]] = []  # each node's ancestors from the root, itself last
        pooled = []
        for row, e in zip(rows, ends, strict=True):
            path: list[int] = []
            for j in range(e + 1):
                key = tuple(row[: j + 1])
                node = index.get(key)
                if node is None:
                    node = index[key] = len(node_token)
                    node_token.append(row[j])
                    node_path.append([*path, node])
                path = node_path[node]
            pooled.append(path[-1])
        n, d = len(node_token), max(len(p) for p in node_path)
        ancestors = torch.zeros(n, d, dtype=torch.long)
        mask = torch.full((n, d), float("-inf"))
        for i, p in enumerate(node_path):
            ancestors[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = 0.0
        keep = sorted(set(pooled))
        slot = {node: k for k, node in enumerate(keep)}
        shared_cols = _shared_depths(ancestors, mask, SHARED_KEYS if shared_keys is None else shared_keys)
        deep_cols = [j for j in range(d) if j not in shared_cols]
        attended = mask == 0
        shared = sorted({int(a) for j in shared_cols for a in ancestors[attended[:, j], j]})
        shared_mask = torch.full((n, len(shared)), float("-inf"))
        column = {node: s for s, node in enumerate(shared)}
        for j in shared_cols:
            live = attended[:, j].nonzero().flatten()
            shared_mask[live, torch.tensor([column[int(a)] for a in ancestors[live, j]], dtype=torch.long)] = 0.0
        return cls(
            tokens=torch.tensor(node_token, dtype=torch.long),
            depth=torch.tensor([len(p) - 1 for p in node_path], dtype=torch.long),
            ancestors=ancestors,
            mask=mask,
            keep=torch.tensor(keep, dtype=torch.long),
            where=torch.tensor([slot[node] for node in pooled], dtype=torch.long),
            shared=torch.tensor(shared, dtype=torch.long),
            shared_mask=shared_mask,
            deep=ancestors[:, deep_cols].contiguous(),
            deep_mask=mask[:, deep_cols].contiguous(),
        )

    def to(self, device: torch.device | str) -> PromptTree:
        return PromptTree(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _shared_depths(ancestors: torch.Tensor, mask: torch.Tensor, budget: int) -> set[int]:
    """The depths whose ancestors are scored densely: those with the fewest distinct nodes, while their
    nodes together stay within ``budget``."""
    counts = [(int(ancestors[mask[:, j] == 0, j].unique().numel()), j) for j in range(ancestors.shape[1])]
    chosen: set[int] = set()
    total = 0
    for count, j in sorted(counts):
        if total + count > budget:
            break
        chosen.add(j)
        total += count
    return chosen


def supports(text_tower: Any) -> bool:
    """Whether ``text_tower`` (an ``open_clip.CLIP``) is one the tree encodes exactly: a causal mask,
    argmax pooling, plain residual attention blocks (self-attention through ``nn.MultiheadAttention``, no
    key/value biases or dropout) and no gradient checkpointing."""
    transformer = getattr(text_tower, "transformer", None)
    if getattr(text_tower, "text_pool_type", None) != "argmax" or getattr(text_tower, "attn_mask", None) is None:
        return False
    blocks = getattr(transformer, "resblocks", ())
    if transformer is None or getattr(transformer, "grad_checkpointing", False) or not len(blocks):
        return False
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv"):
            return False
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn or attn.dropout > 0:
            return False
        if not all(hasattr(block, a) for a in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")):
            return False
    return True


def _attention(block: nn.Module, y: torch.Tensor, tree: PromptTree, rows: torch.Tensor | None) -> torch.Tensor:
    """``block``'s self-attention at the nodes ``rows`` (all nodes if None), each over its ancestors.
    ``y``: every node's normed input; the keys and values of every node are needed, the queries only at
    ``rows``."""
    attn: Any = block.attn
    width = y.shape[-1]
    heads = attn.num_heads
    dh = width // heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    k, v = F.linear(y, w[width:], None if b is None else b[width:]).chunk(2, -1)
    q = F.linear(y if rows is None else y[rows], w[:width], None if b is None else b[:width])
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    n = q.shape[0]
    q = q.view(n, heads, dh)
    parts, values = [], []
    if tree.shared.numel():  # the shallow depths: one dense product against the few shared keys
        ks = k.index_select(0, tree.shared).view(-1, heads, dh)
        parts.append(torch.einsum("nhd,shd->nhs", q, ks) * dh**-0.5 + pick(tree.shared_mask).to(q.dtype).unsqueeze(1))
        values.append(v.index_select(0, tree.shared).view(-1, heads, dh))
    deep = pick(tree.deep)
    e = deep.shape[1]
    if e:  # the deep depths: each node's own keys, gathered. One query over at most E keys: elementwise
        # products beat batched matmuls and SDPA of that shape (their kernels are built for long sequences)
        flat = deep.reshape(-1)
        kd = k.index_select(0, flat).view(n, e, heads, dh)
        vd = v.index_select(0, flat).view(n, e, heads, dh)
        scores = (q.unsqueeze(1) * kd).sum(-1) * dh**-0.5 + pick(tree.deep_mask).to(q.dtype).unsqueeze(-1)
        parts.append(scores.transpose(1, 2))
    p = torch.cat(parts, -1).softmax(dim=-1)  # (n, heads, S + E): one softmax over every ancestor
    outs = []
    if tree.shared.numel():
        outs.append(torch.einsum("nhs,shd->nhd", p[..., : values[0].shape[0]], values[0]))
    if e:
        outs.append((p[..., -e:].transpose(1, 2).unsqueeze(-1) * vd).sum(1))
    o = outs[0] if len(outs) == 1 else outs[0] + outs[1]
    return attn.out_proj(o.reshape(n, width))


def tree_text_hidden(text_tower: Any, tree: PromptTree) -> torch.Tensor:
    """The pooled text features before the projection, (P, width), of the prompts ``tree`` holds: what
    ``HeadedCLIP.text_hidden`` computes from their padded tokens."""
    t = text_tower
    cast_dtype = t.transformer.get_cast_dtype()
    x = t.token_embedding(tree.tokens).to(cast_dtype) + t.positional_embedding.to(cast_dtype).index_select(
        0, tree.depth
    )
    blocks = list(t.transformer.resblocks)
    keep, where = tree.keep, tree.where  # built on the host: a step reads nothing back from the device
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        rows = keep if last else None
        y = block.ln_1(x)
        out = (x if rows is None else x[rows]) + block.ls_1(_attention(block, y, tree, rows))
        x = out + block.ls_2(block.mlp(block.ln_2(out)))
    return t.ln_final(x)[where]

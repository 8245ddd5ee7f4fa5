"""The prompt tree (safespec.model.prompt_tree): the class prompts encoded once per distinct prefix give the
features, and the gradients, of encoding every padded prompt on its own."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from safespec.api import load_inputs, make_train_data
from safespec.evaluate import PredictionCache
from safespec.model import build_class_tokens, create_model, load_model
from safespec.model.prompt_tree import PromptTree, supports, tree_text_hidden
from safespec.train import Trainer

from world_spec import write_world_spec

ARCH = "safespec-micro-vit"
CLASSES = ("bear", "cat", "dog", "zebra", "polar bear", "cattle dog")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "{}")
ATOL = 2e-5  # float rounding: the tree's reductions run in another order


@pytest.fixture(scope="module")
def world_inputs(small_world, tmp_path_factory):
    return load_inputs(write_world_spec(tmp_path_factory.mktemp("spec"), small_world), log=lambda s: None)


@pytest.fixture(scope="module")
def headed():
    loaded = create_model(ARCH, CLASSES, heads=True, rank=4, seed=0)
    with torch.no_grad():  # heads that are not the identity, so head routing is exercised too
        loaded.model.heads.B.normal_(std=0.2, generator=torch.Generator().manual_seed(3))
    return loaded


@pytest.fixture(autouse=True)
def _every_prompt_count(monkeypatch):
    """The tests' few prompts are below the count at which a step builds a tree."""
    monkeypatch.setattr("safespec.model.prompt_tree.MIN_PROMPTS", 1)


def _prompts(loaded):
    # a prompt longer than the context (cut, its end-of-text at the last position) and a duplicate too
    extra = loaded.tokenizer(["a photo of a " + "very " * 30 + "big dog.", "a photo of a dog."])
    flat, ids = loaded.model.class_prompts(build_class_tokens(loaded.tokenizer, CLASSES, TEMPLATES))
    return torch.cat([flat, extra]), torch.cat([ids, torch.tensor([2, 2])])


def test_a_prefix_is_one_node_and_padding_is_none():
    tokens = torch.tensor(
        [
            [9, 1, 2, 3, 99, 0, 0],  # 9 1 2 3 <eot>
            [9, 1, 2, 4, 99, 0, 0],  # shares 9 1 2
            [9, 1, 99, 0, 0, 0, 0],  # shares 9 1
            [9, 1, 2, 3, 99, 0, 0],  # a duplicate: no new node
        ]
    )
    tree = PromptTree.build(tokens)
    prefixes = {tuple(r[: r.index(99) + 1]) for r in tokens.tolist()}
    every = {p[: j + 1] for p in prefixes for j in range(len(p))}
    assert tree.nodes == len(every) == 8
    assert tree.prompts == 4
    assert tree.pooled[0] == tree.pooled[3] and len(set(tree.pooled.tolist())) == 3
    for p, row in enumerate(tokens.tolist()):  # each prompt's pooled node spells out its prompt
        node = int(tree.pooled[p])
        d = int(tree.depth[node])
        chain = tree.ancestors[node, : d + 1].tolist()
        assert [int(tree.tokens[i]) for i in chain] == row[: int(tokens[p].argmax()) + 1]
        assert (tree.mask[node, : d + 1] == 0).all() and torch.isinf(tree.mask[node, d + 1 :]).all()
    with pytest.raises(ValueError, match="non-empty"):
        PromptTree.build(torch.zeros(0, 7, dtype=torch.long))


def test_the_tree_gives_the_padded_prompts_features(headed):
    m = headed.model
    tokens, ids = _prompts(headed)
    tree = m.prompt_tree(tokens)
    assert tree is not None and tree.nodes < int((tokens.argmax(-1) + 1).sum()) < tokens.numel()
    with torch.no_grad():
        plain = m.text_hidden(tokens)
        ours = m.text_hidden(tree)
        assert ours.shape == plain.shape
        assert torch.allclose(ours, plain, atol=ATOL, rtol=0), (ours - plain).abs().max()
        # through the heads and the projection, and without heads (the shared projection, as open_clip)
        assert torch.allclose(m.encode_text(tree, ids), m.encode_text(tokens, ids), atol=ATOL, rtol=0)
        shared = F.normalize(m.clip.encode_text(tokens), dim=-1)
        assert torch.allclose(m.encode_text(tree), shared, atol=ATOL, rtol=0)


def test_shallow_depths_are_shared_and_deep_ones_gathered(headed):
    tokens, _ = _prompts(headed)
    tree = PromptTree.build(tokens, shared_keys=8)
    assert 0 < tree.shared.numel() <= 8 and tree.deep.shape[1] > 0
    assert int(tree.tokens[tree.shared[0]]) == int(tokens[0, 0])  # <sot>: every prompt's first node
    # each node attends to exactly its ancestors, split between the two parts without overlap
    for i in range(tree.nodes):
        d = int(tree.depth[i])
        full = set(tree.ancestors[i, : d + 1].tolist())
        shared = {int(tree.shared[s]) for s in (tree.shared_mask[i] == 0).nonzero().flatten()}
        deep = {int(a) for a, m in zip(tree.deep[i], tree.deep_mask[i], strict=True) if m == 0}
        assert shared | deep == full and not shared & deep
    assert PromptTree.build(tokens, shared_keys=0).shared.numel() == 0
    assert PromptTree.build(tokens, shared_keys=10_000).deep.shape[1] == 0


@pytest.mark.parametrize("shared_keys", [0, 8, 10_000])
def test_the_tree_gives_the_padded_prompts_gradients(headed, shared_keys):
    """Every split of the attention (all gathered, the default's, all shared) is the padded encoding's."""
    tokens, ids = _prompts(headed)
    weights = torch.randn(tokens.shape[0], headed.model.embed_dim, generator=torch.Generator().manual_seed(5))
    grads = []
    tree = PromptTree.build(tokens, shared_keys=shared_keys)
    with torch.no_grad():
        assert torch.allclose(headed.model.text_hidden(tree), headed.model.text_hidden(tokens), atol=ATOL, rtol=0)
    for inputs in (tokens, tree):
        m = copy.deepcopy(headed.model)
        (m.encode_text(inputs, ids) * weights).sum().backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    plain, ours = grads
    assert set(plain) == set(ours) and any(k.startswith("clip.transformer.") for k in plain)
    for k in plain:
        assert torch.allclose(ours[k], plain[k], atol=ATOL, rtol=1e-4), (k, (ours[k] - plain[k]).abs().max())


def test_few_prompts_are_encoded_padded(headed, monkeypatch):
    """Below MIN_PROMPTS the padded encoding stays: bit-for-bit the numbers of earlier versions."""
    tokens, _ = _prompts(headed)
    monkeypatch.setattr("safespec.model.prompt_tree.MIN_PROMPTS", tokens.shape[0] + 1)
    assert headed.model.prompt_tree(tokens) is None
    monkeypatch.setattr("safespec.model.prompt_tree.MIN_PROMPTS", tokens.shape[0])
    assert headed.model.prompt_tree(tokens) is not None


def test_towers_it_does_not_cover_are_encoded_the_plain_way(headed):
    m = copy.deepcopy(headed.model)
    tokens, _ = _prompts(headed)
    assert supports(m.clip)
    m.clip.transformer.grad_checkpointing = True
    assert m.prompt_tree(tokens) is None and not supports(m.clip)
    m.clip.transformer.grad_checkpointing = False
    m.clip.text_pool_type = "last"  # the last position is padding: no tree can stand for it
    assert m.prompt_tree(tokens) is None
    with pytest.raises(Exception, match="prompt tree"):
        m.text_hidden(PromptTree.build(tokens))


def test_a_step_with_the_text_tower_trained_encodes_the_tree(world_inputs, tmp_path, monkeypatch):
    plan = world_inputs.plan
    plan = dataclasses.replace(plan, model=dataclasses.replace(plan.model, freeze=(), target_tower=False))
    torch.manual_seed(0)
    trainee = load_model(plan.model, plan.classes)
    trainer = Trainer(
        plan, trainee, make_train_data(world_inputs, trainee.preprocess), cache=PredictionCache(tmp_path), quiet=True
    )
    assert not trainer.text_frozen and trainer.fixed_text is None
    prompts = trainer._prompts(0, trainer.prompt_tokens.shape[0])
    assert isinstance(prompts, PromptTree) and prompts.prompts == trainer.prompt_tokens.shape[0]
    assert trainer._prompts(0, trainer.prompt_tokens.shape[0]) is prompts  # built once
    with torch.no_grad():
        _, _, txt, _ = trainer.towers(None, prompts, trainer.prompt_heads)
        plain = trainee.model.encode_text(trainer.prompt_tokens, trainer.prompt_heads)
        assert torch.allclose(txt, plain, atol=ATOL, rtol=0)
    seen = []
    real = tree_text_hidden
    monkeypatch.setattr("safespec.model.headed.tree_text_hidden", lambda t, tree: seen.append(tree) or real(t, tree))
    loss = trainer.train_step()
    assert torch.isfinite(torch.as_tensor(loss)) and seen and seen[0] is prompts

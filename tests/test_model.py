"""Models, heads, checkpoints and the zero-shot classifier, on the shipped micro config (random init, no downloads)."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import time

import pytest
import torch

from safespec.plan import ModelPlan
from safespec.errors import ModelError
from safespec._compat import import_open_clip
from safespec.model import (
    CHECKPOINT_FORMAT,
    SHIPPED_ARCHS,
    HeadedCLIP,
    LowRankHeads,
    ZeroShotClassifier,
    build_class_tokens,
    create_model,
    grouped_low_rank,
    load_checkpoint,
    load_model,
    model_autocast,
    naive_routed_projection,
    read_checkpoint_metadata,
    resolve_device,
    save_checkpoint,
    tensor_digest,
    weights_digest,
    zero_shot_logits,
)

from safespec.model import heads as heads_module

open_clip = import_open_clip()

ARCH = "safespec-micro-vit"
CLASSES = ("bear", "cat", "dog", "zebra")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.", "a {} silhouette.")


def plan(**kw) -> ModelPlan:
    base = dict(
        arch=ARCH, pretrained=None, checkpoint=None, heads=True, rank=4, device="cpu", precision="fp32", freeze=()
    )
    base.update(kw)
    return ModelPlan(**base)


@pytest.fixture(scope="module")
def headless():
    return create_model(ARCH, CLASSES, heads=False, seed=0)


@pytest.fixture(scope="module")
def headed():
    return create_model(ARCH, CLASSES, heads=True, rank=4, seed=0)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 32, 32, generator=g)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


# ------------------------------------------------------------------------------------------ heads
def test_heads_are_the_identity_at_step_zero_to_the_bit(headless, headed, images):
    assert headed.model.heads is not None and headless.model.heads is None
    assert torch.count_nonzero(headed.model.heads.B) == 0 and torch.count_nonzero(headed.model.heads.A) > 0
    zs_old = ZeroShotClassifier(headless.model, headless.tokenizer, TEMPLATES)
    zs_new = ZeroShotClassifier(headed.model, headed.tokenizer, TEMPLATES)
    with torch.no_grad():
        assert torch.equal(zs_old.text_features(), zs_new.text_features())
        assert torch.equal(zs_old.logits(images), zs_new.logits(images))
        tok = headed.tokenizer(["a photo of a dog.", "some caption", "another one"])
        ids = torch.tensor([2, headed.model.negative_head, 0])
        assert torch.equal(headed.model.encode_text(tok, ids), headless.model.encode_text(tok))


def test_text_path_matches_open_clip(headed):
    tok = headed.tokenizer(["a photo of a dog.", "a cat"])
    m = headed.model
    with torch.no_grad():
        ours = m.project_text(m.text_hidden(tok))
        theirs = m.clip.encode_text(tok)
    assert torch.equal(ours, theirs)


def test_a_perturbed_head_changes_only_its_class(headed, images):
    model = HeadedCLIP(headed.model.clip, CLASSES)
    model.add_heads(rank=4, seed=3)
    tokens = build_class_tokens(headed.tokenizer, CLASSES, TEMPLATES)
    with torch.no_grad():
        before = model.class_text_features(tokens)
        model.heads.B[2].normal_(std=0.5)
        after = model.class_text_features(tokens)
        changed = ~(before == after).all(dim=1)
        assert changed.tolist() == [False, False, True, False]
        # the negative head is not used by class prompts
        model.heads.B.zero_()
        model.heads.B[model.negative_head].normal_(std=0.5)
        assert torch.equal(model.class_text_features(tokens), before)
        cap = headed.tokenizer(["a caption"])
        assert not torch.equal(model.encode_text(cap, torch.tensor([model.negative_head])), model.encode_text(cap))


def test_gradients_reach_only_the_heads_that_were_used(headed):
    model = HeadedCLIP(headed.model.clip, CLASSES)
    model.add_heads(rank=4, seed=0)
    tok = headed.tokenizer(["a b", "c d", "e f"])
    out = model.encode_text(tok, torch.tensor([1, 1, 4]))
    out.sum().backward()
    used = model.heads.B.grad.flatten(1).abs().sum(1) > 0
    assert used.tolist() == [False, True, False, False, True]
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "ids",
    [
        [0, 1, 2, 3] * 8,  # equal groups: one batched matmul
        [5] * 28 + [0, 1, 2, 3],  # one big head + rare heads
        [0] * 10 + [1] * 2 + [2] * 12 + [3] + [4] * 3 + [5] * 20,  # rare heads between big ones
        [40] * 30 + list(range(100)),  # more rare rows than one gathered block
        [2] * 32,  # one head
        list(range(32)),  # one row per head
    ],
    ids=["equal", "skewed", "interleaved", "blocked", "single", "all-distinct"],
)
@pytest.mark.parametrize("shuffled", [True, False], ids=["shuffled", "in-head-order"])
@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_grouped_routing_equals_the_naive_per_sample_routing(ids, shuffled, inplace):
    g = torch.Generator().manual_seed(0)
    n, width, embed, rank, k = len(ids), 24, 16, 3, 101
    h = torch.randn(n, width, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(width, embed, generator=g, dtype=torch.float64)
    A = torch.randn(k, width, rank, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(k, rank, embed, generator=g, dtype=torch.float64, requires_grad=True)
    head_ids = torch.tensor(ids)[torch.randperm(n, generator=g)] if shuffled else torch.tensor(ids)
    ours = grouped_low_rank(h, A, B, head_ids, base=h @ W, inplace=inplace)
    ref = naive_routed_projection(h, W, A, B, head_ids)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(n, embed, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((ours * w).sum(), (h, A, B))
    grads_ref = torch.autograd.grad((ref * w).sum(), (h, A, B))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # B = 0: the base comes back bit for bit, whatever the path
        base = (h @ W).float()
        assert torch.equal(
            grouped_low_rank(h.float(), A.float(), torch.zeros_like(B).float(), head_ids, base=base), base
        )


def test_grouping_plans_are_kept_by_value_not_by_tensor():
    """The grouping of a sequence of head ids is planned once and reused; a tensor changed in place is a
    sequence of its own."""
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    A, B = (
        torch.randn(3, 8, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 2, 5, generator=g, dtype=torch.float64),
    )
    ids = torch.tensor([1] * 4 + [0, 2])
    grouped_low_rank(h, A, B, ids, base=h @ W)
    hits = heads_module._plan.cache_info().hits
    torch.testing.assert_close(
        grouped_low_rank(h, A, B, ids.clone(), base=h @ W), naive_routed_projection(h, W, A, B, ids)
    )
    assert heads_module._plan.cache_info().hits == hits + 1
    ids[0], ids[5] = 2, 1  # the same tensor, other values: another grouping (now shuffled)
    torch.testing.assert_close(grouped_low_rank(h, A, B, ids, base=h @ W), naive_routed_projection(h, W, A, B, ids))


def test_grouped_routing_rejects_bad_head_ids():
    h, A, B = torch.zeros(3, 4), torch.zeros(2, 4, 1), torch.zeros(2, 1, 5)
    with pytest.raises(ValueError, match="head ids"):
        grouped_low_rank(h, A, B, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        grouped_low_rank(h, A, B, torch.tensor([0, 1]))
    assert grouped_low_rank(h[:0], A, B, torch.tensor([], dtype=torch.long)).shape == (0, 5)


def test_heads_are_seeded_and_sized(headed):
    m = headed.model
    assert m.heads.num_heads == len(CLASSES) + 1 and m.negative_head == len(CLASSES)
    assert m.heads.A.shape == (len(CLASSES) + 1, m.text_width, 4) and m.heads.B.shape[2] == m.embed_dim
    a1 = LowRankHeads(3, 8, 5, 2, seed=7).A
    assert torch.equal(a1, LowRankHeads(3, 8, 5, 2, seed=7).A)
    assert not torch.equal(a1, LowRankHeads(3, 8, 5, 2, seed=8).A)


def test_custom_text_clip_towers_support_heads(images):
    cfg = dict(open_clip.get_model_config(ARCH), custom_text=True)
    torch.manual_seed(0)
    clip = open_clip.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    plain = HeadedCLIP(clip, CLASSES)
    headed = HeadedCLIP(clip, CLASSES)
    headed.add_heads(rank=2, seed=0)
    tok = open_clip.get_tokenizer(ARCH)(["a photo of a cat.", "x"])
    with torch.no_grad():
        assert torch.equal(headed.encode_text(tok, torch.tensor([1, 4])), plain.encode_text(tok))
        headed.heads.B[1].normal_()
        moved = headed.encode_text(tok, torch.tensor([1, 4]))
        assert not torch.equal(moved[0], plain.encode_text(tok)[0]) and torch.equal(moved[1], plain.encode_text(tok)[1])


# ------------------------------------------------------------------------------------------ factory
def test_shipped_configs_are_registered_with_open_clip():
    assert {"safespec-tiny-vit", "safespec-micro-vit"} <= set(SHIPPED_ARCHS) <= set(open_clip.list_models())
    cfg = open_clip.get_model_config("safespec-tiny-vit")
    assert cfg["vision_cfg"]["image_size"] == 32 and cfg["text_cfg"]["vocab_size"] == 49408


def test_tiny_config_size():
    lm = create_model("safespec-tiny-vit", CLASSES, heads=False)
    vision = sum(p.numel() for p in lm.model.clip.visual.parameters())
    assert 2.0e6 < vision < 4.0e6, vision
    assert lm.context_length == 16 and lm.model.embed_dim == 128


def test_tokenizer_honours_the_config_context_length(headed):
    assert headed.context_length == 16
    long = " ".join(["word"] * 40)
    tok = headed.tokenizer(["a photo of a dog.", long])
    assert tok.dtype == torch.long and tok.shape == (2, 16)
    eot = headed.tokenizer.eot_token_id
    assert tok[1, -1].item() == eot  # truncated, still ends with the end-of-text token the pooling looks for
    assert (tok[0] == eot).sum() == 1 and tok[0, -1].item() == 0


def test_create_model_is_deterministic_given_the_seed(headed):
    again = create_model(ARCH, CLASSES, heads=True, rank=4, seed=0)
    other = create_model(ARCH, CLASSES, heads=True, rank=4, seed=1)
    assert again.digest == headed.digest != other.digest
    assert headed.digest.startswith("sha256:") and len(headed.digest) == 7 + 64
    with torch.no_grad():
        again.model.clip.logit_scale.add_(1e-3)
    assert weights_digest(again.model) != headed.digest
    assert again.refresh_digest() == weights_digest(again.model)


def test_digest_is_order_and_device_independent():
    t = {"b": torch.arange(6.0).view(2, 3), "a": torch.tensor(1.5, dtype=torch.bfloat16)}
    assert tensor_digest(t) == tensor_digest(dict(reversed(list(t.items()))))
    assert tensor_digest(t) != tensor_digest({"b": t["b"].T.contiguous(), "a": t["a"]})  # shape is hashed
    assert tensor_digest(t) != tensor_digest({"c": t["b"], "a": t["a"]})  # names are hashed


def test_unknown_arch_names_close_matches():
    with pytest.raises(ModelError) as e:
        create_model("ViT-B-61", CLASSES)
    msg = one_line(e)
    assert "model.arch" in msg and "ViT-B-16" in msg
    with pytest.raises(ModelError) as e:
        load_model(plan(arch="safespec-tiny-vt", pretrained="openai"), CLASSES)
    assert "safespec-tiny-vit" in one_line(e)


def test_unknown_pretrained_tag_lists_known_tags():
    with pytest.raises(ModelError) as e:
        load_model(plan(arch="ViT-B-32", pretrained="opnai"), CLASSES)
    msg = one_line(e)
    assert "model.pretrained" in msg and "openai" in msg


@pytest.mark.parametrize("arch,pretrained", [("ViT-B-32", "openai"), ("ViT-B-16", "hf-hub:timm/ViT-B-16-SigLIP")])
def test_offline_weights_fail_fast_with_one_line(monkeypatch, tmp_path, arch, pretrained):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(ModelError) as e:
        load_model(plan(arch=arch, pretrained=pretrained), CLASSES, cache_dir=str(tmp_path))
    assert time.monotonic() - t0 < 20
    msg = one_line(e)
    assert "not in the cache" in msg and "HF_HUB_OFFLINE" in msg and "model.checkpoint" in msg
    assert pretrained.split(":")[-1] in msg


def test_unreachable_hub_fails_fast_without_the_offline_flag(monkeypatch, tmp_path):
    import safespec.model.hub as m

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(m, "_hub_offline", lambda: False)
    monkeypatch.setattr(m, "_reachable", lambda host, *a, **k: False)
    with pytest.raises(ModelError) as e:
        load_model(plan(arch="ViT-B-32", pretrained="laion2b_s34b_b79k"), CLASSES, cache_dir=str(tmp_path))
    assert "unreachable" in one_line(e)


def test_device_and_precision():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="model.device"):
            resolve_device("cuda:0")
    with model_autocast("cpu", "bf16"):
        assert not torch.is_autocast_enabled("cpu")  # CPU runs stay fp32
    with pytest.raises(ModelError, match="model.precision"):
        model_autocast("cpu", "fp8")


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_keeps_digest_and_logits(headed, images, tmp_path):
    model = HeadedCLIP(headed.model.clip, CLASSES, arch=ARCH, model_cfg=headed.model.model_cfg, tokenizer_name=ARCH)
    model.add_heads(rank=4, seed=5)
    with torch.no_grad():
        model.heads.B.normal_(std=0.1)  # trained heads, so the round trip must carry them
    path = tmp_path / "v2.safetensors"
    digest = save_checkpoint(model, path, {"method": "penalty", "step": 3})
    meta = read_checkpoint_metadata(path)
    assert meta["format"] == CHECKPOINT_FORMAT and meta["classes"] == list(CLASSES)
    assert meta["has_heads"] is True and meta["head_rank"] == 4 and meta["arch"] == ARCH
    assert meta["digest"] == digest and meta["extra"] == {"method": "penalty", "step": 3}
    loaded = load_model(plan(checkpoint=str(path)), CLASSES)
    assert loaded.digest == digest == weights_digest(model)
    assert str(path) in loaded.source
    zs_a = ZeroShotClassifier(model, headed.tokenizer, TEMPLATES)
    zs_b = ZeroShotClassifier(loaded.model, loaded.tokenizer, TEMPLATES)
    with torch.no_grad():
        assert torch.equal(zs_a.logits(images), zs_b.logits(images))
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_a_checkpoint_load_draws_no_initial_weights(headless, tmp_path, monkeypatch):
    """Every weight of a checkpoint's model comes from the file (a strict load), so none is drawn first;
    a fresh model still draws its own."""
    calls = []
    real = torch.nn.init.normal_
    spy = lambda t, *a, **k: calls.append(1) or real(t, *a, **k)  # noqa: E731
    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    path = tmp_path / "v1.safetensors"
    save_checkpoint(headless.model, path)
    loaded = load_model(plan(checkpoint=str(path), heads=False), CLASSES)
    assert calls == [] and loaded.digest == headless.digest
    assert torch.nn.init.normal_ is spy  # restored after the load
    create_model(ARCH, CLASSES, heads=False, seed=0)
    assert calls


def test_a_second_load_of_an_unchanged_checkpoint_does_not_hash_it_again(headed, tmp_path, monkeypatch):
    """The finished model's digest is remembered by the file's signature and the load's options; any change
    to the file, or other options, hashes it again, and a file written a moment ago is never trusted."""
    import time

    from safespec.data import digests as digests_mod
    from safespec.model import digest as digest_mod
    from safespec.model import factory as factory_mod

    path = tmp_path / "v2.safetensors"
    model = copy.deepcopy(headed.model)
    bias = torch.zeros(len(CLASSES))
    bias[1] = 0.25
    model.set_class_bias(bias)  # a digest over the finished model, offsets included
    digest = save_checkpoint(model, path)
    hashed = []
    real = digest_mod.weights_digest
    monkeypatch.setattr(factory_mod, "weights_digest", lambda m: hashed.append(1) or real(m))
    monkeypatch.setattr(digests_mod, "RACY_SECONDS", 0.0)
    first = load_model(plan(checkpoint=str(path)), CLASSES)
    assert first.digest == digest and len(hashed) == 1
    second = load_model(plan(checkpoint=str(path)), CLASSES)
    assert second.digest == digest and len(hashed) == 1  # remembered
    other_seed = load_model(plan(checkpoint=str(path)), CLASSES, seed=3)  # other options: hashed again
    assert len(hashed) == 2 and other_seed.digest == digest
    bias[1] = 0.5
    model.set_class_bias(bias)
    changed = save_checkpoint(model, path)  # the same path, other bytes
    time.sleep(0.01)
    third = load_model(plan(checkpoint=str(path)), CLASSES)
    assert third.digest == changed != digest and len(hashed) == 3
    monkeypatch.setattr(digests_mod, "RACY_SECONDS", 3600.0)  # every file is fresh: nothing is trusted
    load_model(plan(checkpoint=str(path)), CLASSES)
    load_model(plan(checkpoint=str(path)), CLASSES)
    assert len(hashed) == 5


def test_torch_state_dict_checkpoints_load_with_weights_only(headless, tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in headless.model.clip.state_dict().items()}}, path)
    loaded = load_model(plan(checkpoint=str(path), heads=False), CLASSES)
    assert loaded.digest == headless.digest


def _malicious(marker):
    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Exploit()


@pytest.mark.parametrize("how", ["torch.save", "raw-pickle"])
def test_a_checkpoint_that_needs_code_is_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "hook": _malicious(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ModelError) as e:
        load_model(plan(checkpoint=str(path)), CLASSES)
    msg = one_line(e)
    assert "refused" in msg and str(path) in msg and "weights_only" in msg
    assert not marker.exists()


def test_headless_checkpoint_loads_classifies_and_gets_fresh_heads(headless, images, tmp_path):
    path = tmp_path / "v1.safetensors"
    digest = save_checkpoint(headless.model, path)
    assert read_checkpoint_metadata(path)["has_heads"] is False
    plain = load_model(plan(checkpoint=str(path), heads=False), CLASSES)
    assert plain.model.heads is None and plain.digest == digest
    with_heads = load_model(plan(checkpoint=str(path), heads=True, rank=4), CLASSES)
    assert with_heads.model.heads is not None and torch.count_nonzero(with_heads.model.heads.B) == 0
    assert with_heads.digest != digest  # the heads are weights too
    assert "fresh" in with_heads.source
    batches = [images[:4], (images[4:], torch.tensor([0, 1]))]
    out_plain = ZeroShotClassifier(plain.model, plain.tokenizer, TEMPLATES).predict_batches(batches)
    out_heads = ZeroShotClassifier(with_heads.model, with_heads.tokenizer, TEMPLATES).predict_batches(batches)
    assert out_plain.logits.shape == (6, len(CLASSES)) and out_plain.predictions.shape == (6,)
    assert torch.equal(out_plain.logits, out_heads.logits)
    assert torch.equal(out_plain.predictions, out_plain.logits.argmax(1))


def test_heads_that_do_not_match_the_spec_are_refused(headed, tmp_path):
    path = tmp_path / "v2.safetensors"
    save_checkpoint(headed.model, path)
    cases = [
        (dict(), ("dog", "cat", "bear", "zebra"), "classes"),  # same names, other order
        (dict(), CLASSES + ("horse",), "classes"),  # one more class
        (dict(heads=False), CLASSES, "heads.enabled"),
        (dict(rank=8), CLASSES, "heads.rank"),
    ]
    for kw, classes, field in cases:
        with pytest.raises(ModelError) as e:
            load_model(plan(checkpoint=str(path), **kw), classes)
        assert field in one_line(e) and str(path) in str(e.value)
    # heads without metadata (e.g. a .pt): the head count still has to match
    pt = tmp_path / "v2.pt"
    torch.save(headed.model.state_dict(), pt)
    with pytest.raises(ModelError) as e:
        load_model(plan(checkpoint=str(pt)), CLASSES[:3])
    assert "5 task-dependent heads" in one_line(e) and "lists 3 classes" in str(e.value)
    assert load_model(plan(checkpoint=str(pt)), CLASSES).digest == headed.digest


def test_broken_and_mismatched_checkpoints_are_clear_errors(headless, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file")
    garbage_pt = tmp_path / "bad.pth"
    garbage_pt.write_bytes(b"garbage")
    other = tmp_path / "other.safetensors"
    save_checkpoint(create_model("safespec-tiny-vit", CLASSES, heads=False).model, other)
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, wrong)
    for path, kw, needle in [
        (tmp_path / "missing.safetensors", {}, "no such file"),
        (bad, {}, "not a readable safetensors"),
        (garbage_pt, {}, "not a readable torch checkpoint"),
        (tmp_path / "model.onnx", {}, "unsupported file type"),
        (other, {}, "model.arch"),
        (wrong, {}, "does not fit"),
    ]:
        if path.suffix == ".onnx":
            path.write_bytes(b"x")
        with pytest.raises(ModelError) as e:
            load_model(plan(checkpoint=str(path), **kw), CLASSES)
        assert needle in one_line(e), (path, str(e.value))


def test_load_checkpoint_returns_tensors_and_metadata(headed, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(headed.model, path, {"note": "x"})
    sd, meta = load_checkpoint(path)
    assert set(sd) == set(headed.model.state_dict()) and meta["extra"] == {"note": "x"}


# ------------------------------------------------------------------------------------------ zero-shot
def test_zero_shot_logits_are_cosine_over_tau():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[6.0, 8.0], [0.0, 2.0]])
    got = zero_shot_logits(a, t, 0.05)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.8], [0.6, 0.0]]) / 0.05)


def test_classifier_computes_the_text_side_once_per_evaluation(headed, images):
    calls = []
    model = headed.model
    original = model.class_text_features

    def counting(tokens):
        calls.append(tokens.shape)
        return original(tokens)

    zs = ZeroShotClassifier(model, headed.tokenizer, TEMPLATES, tau=0.1)
    assert zs.class_tokens.shape == (len(CLASSES), len(TEMPLATES), 16)
    object.__setattr__(model, "class_text_features", counting)
    try:
        model.train()
        out = zs.predict_batches([images[i : i + 2] for i in range(0, 6, 2)])
        assert model.training  # mode restored
    finally:
        del model.class_text_features
    assert len(calls) == 1 and calls[0] == (len(CLASSES), len(TEMPLATES), 16)
    with torch.no_grad():
        feats = model.encode_image(images)
        direct = zs.logits(feats)
    torch.testing.assert_close(out.logits, direct)
    assert not zs.text_features().requires_grad and zs.text_features(grad=True).requires_grad


def _fake_hub_cache(cache, repo: str, clip, cfg: dict) -> None:
    """The layout huggingface_hub's cache uses, holding an open_clip model: what `hf download` leaves."""
    import json

    from safetensors.torch import save_file

    rev = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, snap / "open_clip_model.safetensors")


def test_cached_hf_hub_models_load_offline_through_open_clip(monkeypatch, tmp_path, headless, images):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = open_clip.get_model_config(ARCH)
    _fake_hub_cache(tmp_path / "hub", "safespec-test/micro", headless.model.clip, cfg)
    t0 = time.monotonic()
    lm = load_model(
        plan(pretrained="hf-hub:safespec-test/micro", heads=False), CLASSES, cache_dir=str(tmp_path / "hub")
    )
    assert time.monotonic() - t0 < 20
    assert lm.digest == headless.digest and "hf-hub:safespec-test/micro" in lm.source
    assert lm.tokenizer(["a photo of a cat."]).shape == (1, 16)
    with_heads = load_model(plan(pretrained="hf-hub:safespec-test/micro"), CLASSES, cache_dir=str(tmp_path / "hub"))
    zs = ZeroShotClassifier(with_heads.model, with_heads.tokenizer, TEMPLATES)
    zs0 = ZeroShotClassifier(headless.model, headless.tokenizer, TEMPLATES)
    with torch.no_grad():
        assert torch.equal(zs.logits(images), zs0.logits(images))
    # the saved model reloads without the hub: its config travels in the checkpoint
    path = tmp_path / "from-hub.safetensors"
    digest = save_checkpoint(with_heads.model, path)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert load_model(plan(checkpoint=str(path)), CLASSES).digest == digest == with_heads.digest


def test_heads_need_open_clips_own_text_tower():
    class HFLike(torch.nn.Module):  # a CustomTextCLIP whose text tower is not open_clip's transformer
        def __init__(self):
            super().__init__()
            self.text = torch.nn.Linear(4, 4)
            self.visual = torch.nn.Linear(4, 4)

    model = HeadedCLIP(HFLike(), CLASSES)
    with pytest.raises(ModelError) as e:
        model.add_heads(rank=2)
    assert "heads.enabled: false" in one_line(e)


def test_hand_written_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([0] * 9 + [1, 2, 2] + [3] * 8 + [4])[torch.randperm(21, generator=g)]
    h = torch.randn(21, 5, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(6, 5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(6, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, A, B: grouped_low_rank(h, A, B, ids), (h, A, B))
    # frozen heads: only h gets a gradient, and it is the same one
    (gh,) = torch.autograd.grad(grouped_low_rank(h, A.detach(), B.detach(), ids).sum(), (h,))
    (gh_all,) = torch.autograd.grad(grouped_low_rank(h, A, B, ids).sum(), (h,))
    torch.testing.assert_close(gh, gh_all)


def test_grouped_routing_under_autocast_keeps_the_base_dtype():
    ids = torch.tensor([0] * 9 + [1] + [2] * 10)
    h, A, B = torch.randn(20, 8), torch.randn(3, 8, 2), torch.randn(3, 2, 4)
    W = torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = h @ W
        out = grouped_low_rank(h, A, B, ids, base=base)
    assert out.dtype == base.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_routed_projection(h, W, A, B, ids), rtol=0.05, atol=0.1)


# ------------------------------------------------------------------------------------------ class offsets
def test_a_class_bias_shifts_the_logits_round_trips_and_is_absent_by_default(headed, images, tmp_path):
    """The calibrated offset is part of the model: it moves exactly its class's logit by bias / tau, is saved
    and loaded with the checkpoint (and its digest), and a model without one keeps its old state dict."""
    model = HeadedCLIP(headed.model.clip, CLASSES, arch=ARCH, model_cfg=headed.model.model_cfg, tokenizer_name=ARCH)
    model.add_heads(rank=4, seed=5)
    before = weights_digest(model)
    assert model.class_bias is None and "class_bias" not in model.state_dict()
    model.set_class_bias(torch.zeros(len(CLASSES)))  # an all-zero offset is no offset
    assert model.class_bias is None and weights_digest(model) == before
    zs = ZeroShotClassifier(model, headed.tokenizer, TEMPLATES, tau=0.05)
    with torch.no_grad():
        plain = zs.logits(images)
        model.set_class_bias(torch.tensor([0.0, 0.0, -0.1, 0.0]))
        shifted = zs.logits(images)
    torch.testing.assert_close(shifted - plain, torch.tensor([0.0, 0.0, -2.0, 0.0]).expand_as(plain), rtol=0, atol=1e-4)
    digest = save_checkpoint(model, tmp_path / "v2.safetensors")
    assert digest != before
    loaded = load_model(plan(checkpoint=str(tmp_path / "v2.safetensors")), CLASSES)
    assert loaded.digest == digest and "calibrated class offsets" in loaded.source
    torch.testing.assert_close(loaded.model.class_bias, model.class_bias)
    # load_state_dict sets and clears it with the state, as for any other tensor of the model
    sd = model.state_dict()
    model.load_state_dict({k: v for k, v in sd.items() if k != "class_bias"})
    assert model.class_bias is None
    model.load_state_dict(sd)
    assert model.class_bias is not None
    with pytest.raises(ValueError, match="shape"):
        model.set_class_bias(torch.ones(3))


def test_class_offsets_for_other_classes_are_refused(headed, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "v2.safetensors"
    model = HeadedCLIP(headed.model.clip, CLASSES, arch=ARCH, model_cfg=headed.model.model_cfg, tokenizer_name=ARCH)
    model.add_heads(rank=4, seed=5)
    model.set_class_bias(torch.tensor([0.0, 0.1, 0.0, 0.0]))
    save_checkpoint(model, path)
    meta = load_checkpoint(path)[1]
    sd = load_file(path)
    sd["class_bias"] = torch.zeros(7)
    sd["class_bias"][0] = 1.0
    save_file(sd, path, metadata={"safespec": __import__("json").dumps(meta)})
    with pytest.raises(ModelError) as e:
        load_model(plan(checkpoint=str(path)), CLASSES)
    assert "class offsets for 7 classes" in one_line(e)


def test_a_rival_row_moves_its_class_by_the_offset_of_each_images_strongest_rival():
    """DecisionBias: row r raises class order[r] by the entry of the image's best other class, found on
    the cosines the rows before it left; no other class moves; rows apply in order."""
    from safespec.model import DecisionBias, class_logits

    sims = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.1, 0.8, 0.5, 0.0], [0.0, 0.1, 0.5, 0.3]])
    text = torch.eye(4)
    row = torch.tensor([[0.30, 0.05, 0.0, 0.2]])  # class 2's offset against classes 0, 1, 3
    out = class_logits(sims, text, 0.5, DecisionBias(None, torch.tensor([2]), row))
    want = sims.clone()
    want[:, 2] += torch.tensor([0.30, 0.05, 0.2])  # rivals: 0, 1, 3
    torch.testing.assert_close(out, want / 0.5)
    # the class bias first, then the rows; a second row for class 0 sees class 2 as already raised
    bias = torch.tensor([0.0, 0.0, 0.0, 0.25])
    rows = torch.tensor([[0.30, 0.05, 0.0, 0.2], [0.0, 0.0, -0.5, 0.0]])
    out = class_logits(sims, text, 1.0, DecisionBias(bias, torch.tensor([2, 0]), rows))
    want = sims + bias
    want[:, 2] += torch.tensor([0.30, 0.05, 0.2])  # image 3: class 3 at 0.55 beats class 1 as the rival
    want[:, 0] += torch.tensor([-0.5, 0.0, -0.5])  # class 0's rival: 2 (raised), 1, 2
    torch.testing.assert_close(out, want)
    # gradients pass through the raised class as through a plain logit
    s = sims.clone().requires_grad_()
    class_logits(s, text, 1.0, DecisionBias(None, torch.tensor([2]), row))[:, 2].sum().backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(3, 4))


def test_rival_offsets_round_trip_and_are_absent_by_default(headed, images, tmp_path):
    from safetensors.torch import load_file, save_file

    model = HeadedCLIP(headed.model.clip, CLASSES, arch=ARCH, model_cfg=headed.model.model_cfg, tokenizer_name=ARCH)
    model.add_heads(rank=4, seed=5)
    before = weights_digest(model)
    assert model.rival_bias is None and model.decision_bias is None
    assert not {"rival_order", "rival_bias"} & set(model.state_dict())
    zs = ZeroShotClassifier(model, headed.tokenizer, TEMPLATES, tau=0.05)
    with torch.no_grad():
        plain = zs.logits(images)
        model.set_rival_bias(torch.tensor([2]), torch.tensor([[0.1, 0.2, 0.0, 0.3]]))
        moved = zs.logits(images)
    others = [0, 1, 3]
    assert torch.equal(moved[:, others], plain[:, others])
    rest = plain.clone()
    rest[:, 2] = float("-inf")
    want = plain[:, 2] + torch.tensor([0.1, 0.2, 0.0, 0.3])[rest.argmax(1)] / 0.05
    torch.testing.assert_close(moved[:, 2], want)
    path = tmp_path / "v2.safetensors"
    digest = save_checkpoint(model, path)
    assert digest != before
    loaded = load_model(plan(checkpoint=str(path)), CLASSES)
    assert loaded.digest == digest and "per-rival offsets" in loaded.source
    torch.testing.assert_close(
        ZeroShotClassifier(loaded.model, loaded.tokenizer, TEMPLATES, tau=0.05).logits(images), moved
    )
    model.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("rival_")})
    assert model.rival_bias is None and weights_digest(model) == before
    with pytest.raises(ValueError, match="class indices"):
        model.set_rival_bias(torch.tensor([4]), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="rows"):
        model.set_rival_bias(torch.tensor([2]), torch.zeros(2, 4))
    # a checkpoint whose rows are for other classes, or lack their class, is refused in one line
    meta, sd = load_checkpoint(path)[1], load_file(path)
    for change, fragment in (
        ({"rival_bias": torch.zeros(1, 7)}, "per-rival offsets for 7 classes"),
        ({"rival_order": torch.tensor([9])}, "per-rival offsets for 4 classes"),
        ({"rival_bias": torch.full((1, 4), float("nan"))}, "non-finite per-rival offsets"),
    ):
        save_file({**sd, **change}, path, metadata={"safespec": __import__("json").dumps(meta)})
        with pytest.raises(ModelError) as e:
            load_model(plan(checkpoint=str(path)), CLASSES)
        assert fragment in one_line(e)
    save_file(
        {k: v for k, v in sd.items() if k != "rival_order"}, path, metadata={"safespec": __import__("json").dumps(meta)}
    )
    with pytest.raises(ModelError) as e:
        load_model(plan(checkpoint=str(path)), CLASSES)
    assert "without their classes" in one_line(e)


# ------------------------------------------------------------------------------------------ class image towers
def _logits(loaded, images):
    return ZeroShotClassifier(loaded.model, loaded.tokenizer, TEMPLATES).predict_batches([images]).logits


def test_a_class_tower_starts_as_the_identity_and_moves_only_its_own_class(headed, images):
    loaded = dataclasses.replace(headed, model=copy.deepcopy(headed.model))
    before = _logits(loaded, images)
    tower = loaded.model.add_class_tower(2)
    assert loaded.model.tower_classes == (2,)
    assert torch.equal(_logits(loaded, images), before)  # a copy of the shared tower: nothing changes
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = _logits(loaded, images)
    others = [c for c in range(len(CLASSES)) if c != 2]
    assert torch.equal(after[:, others], before[:, others])  # every other class's logit, to the bit
    assert not torch.allclose(after[:, 2], before[:, 2])


def test_a_checkpoint_keeps_its_class_towers(headed, images, tmp_path):
    model = copy.deepcopy(headed.model)
    with torch.no_grad():
        for p in model.add_class_tower(1).parameters():
            p.mul_(0.9)
    path = tmp_path / "towered.safetensors"
    digest = save_checkpoint(model, path)
    assert read_checkpoint_metadata(path)["class_towers"] == ["cat"]
    loaded = load_model(plan(checkpoint=str(path)), CLASSES)
    assert loaded.model.tower_classes == (1,) and loaded.digest == digest
    assert "image towers of 'cat'" in loaded.source
    assert torch.equal(_logits(loaded, images), _logits(dataclasses.replace(headed, model=model), images))


def test_loading_a_state_makes_or_drops_class_towers_to_match_it(headed):
    model = copy.deepcopy(headed.model)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.add_class_tower(3)
    towered = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(plain)
    assert model.tower_classes == () and weights_digest(model) == weights_digest(headed.model)
    model.load_state_dict(towered)
    assert model.tower_classes == (3,)


def test_malformed_class_towers_in_a_checkpoint_are_one_located_line(headed, tmp_path):
    model = copy.deepcopy(headed.model)
    model.add_class_tower(0)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    bad_index = {
        ("class_towers.9." + k.split(".", 2)[2] if k.startswith("class_towers.") else k): v for k, v in sd.items()
    }
    save_file(bad_index, str(tmp_path / "a.safetensors"))
    with pytest.raises(ModelError) as e:
        load_model(plan(checkpoint=str(tmp_path / "a.safetensors")), CLASSES)
    assert "image tower for class 9" in one_line(e) and "4 classes" in str(e.value)
    truncated = {k: v for k, v in sd.items() if not k.startswith("class_towers.0.proj")}
    save_file(truncated, str(tmp_path / "b.safetensors"))
    with pytest.raises(ModelError) as e:
        load_model(plan(checkpoint=str(tmp_path / "b.safetensors")), CLASSES)
    assert "malformed class image towers" in one_line(e) and "class_towers.0.proj" in str(e.value)
    named = {
        ("class_towers.dog." + k.split(".", 2)[2] if k.startswith("class_towers.") else k): v for k, v in sd.items()
    }
    save_file(named, str(tmp_path / "c.safetensors"))
    with pytest.raises(ModelError) as e:
        load_model(plan(checkpoint=str(tmp_path / "c.safetensors")), CLASSES)
    assert "named by its class index" in one_line(e)

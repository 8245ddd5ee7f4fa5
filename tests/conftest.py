"""Shared fixtures.

``small_world``: a demo world small enough to build in seconds (40 held-out images per class, a micro-ViT
v1 trained for 300 small steps; held-out mean accuracy about 0.5), built once per test session in a temporary folder. Tests that need a real model, real
manifests and real PNGs use it instead of the full demo world, which is for ``safespec demo``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from safespec.demo import World, WorldConfig, build_world

#: The test world: every split and the mirror top-up exercised, at a fraction of the demo's size.
SMALL_WORLD = WorldConfig(
    heldout_per_class=40,
    validation_per_class=20,
    base_per_class=40,
    target_in_base=12,
    store_min_per_class=60,  # 40 base images + 20 mirrors per protected class
    target_positives=60,
    target_negatives_per_class=6,
    arch="safespec-micro-vit",  # ~20x cheaper per step than the demo's tiny ViT
    steps=300,
    batch_size=32,
    lr=2e-3,
    warmup_steps=30,
    threads=1,  # one: on a 2-core machine shared with other busy processes, two threads can be 10-50x slower
)


@pytest.fixture(scope="session")
def small_world_config() -> WorldConfig:
    return SMALL_WORLD


@pytest.fixture(scope="session")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A built small world (read-only for tests: copy it before changing anything)."""
    root: Path = tmp_path_factory.mktemp("small-world") / "world"
    return build_world(root, SMALL_WORLD, progress=False, log=lambda *_: None)


def pytest_configure(config):
    """Caches (predictions, image features, file digests) go to a folder of this test session, never to the
    user's ~/.cache: tests must not depend on, or leave behind, what earlier runs cached."""
    import os
    import tempfile

    if "SAFESPEC_CACHE_DIR" not in os.environ:
        config._safespec_cache = os.environ["SAFESPEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="safespec-test-cache-")


def pytest_unconfigure(config):
    import shutil

    folder = getattr(config, "_safespec_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)

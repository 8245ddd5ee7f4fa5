"""The embedded demo worlds (bench, tests and ``safespec demo``): labelled image sets turned into the
splits of a development cycle and the old model v1 trained on them, reproducibly and verified by digest.

Modules: ``sources`` (the image sets), ``config`` (a world's recipe), ``world`` (building and reusing a
world), ``v1`` (training the old model)."""

from __future__ import annotations

from .config import SPLITS, WORLD_FORMAT, WorldConfig
from .sources import (
    ANIMAL_CLASSES,
    DATA_FILES,
    DEFAULT_SOURCE,
    DISTRIBUTION,
    FASHION_CLASSES,
    FASHION_DEB,
    FASHION_ENV,
    FASHION_FILES,
    FASHION_INSTALL_HINT,
    FASHION_TRAIN_FILES,
    INSTALL_HINT,
    PACKAGE,
    SOURCES,
    Source,
    animal_mnist_files,
    fashion_mnist_dirs,
    fashion_mnist_files,
    get_source,
    load_animal_mnist,
    load_fashion_mnist,
    load_numpy_pickle,
    read_idx,
)
from .v1 import evaluate_accuracy, train_v1
from .world import World, build_world, deduplicate, plan_splits

__all__ = [
    "ANIMAL_CLASSES",
    "DATA_FILES",
    "DEFAULT_SOURCE",
    "DISTRIBUTION",
    "FASHION_CLASSES",
    "FASHION_DEB",
    "FASHION_ENV",
    "FASHION_FILES",
    "FASHION_INSTALL_HINT",
    "FASHION_TRAIN_FILES",
    "INSTALL_HINT",
    "PACKAGE",
    "SOURCES",
    "SPLITS",
    "WORLD_FORMAT",
    "Source",
    "World",
    "WorldConfig",
    "animal_mnist_files",
    "build_world",
    "deduplicate",
    "evaluate_accuracy",
    "fashion_mnist_dirs",
    "fashion_mnist_files",
    "get_source",
    "load_animal_mnist",
    "load_fashion_mnist",
    "load_numpy_pickle",
    "plan_splits",
    "read_idx",
    "train_v1",
]

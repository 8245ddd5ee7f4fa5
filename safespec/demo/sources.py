"""The labelled image sets a world is built from (Animal-MNIST from its PyPI package, Fashion-MNIST from
Debian's package), read without unpickling anything but plain numpy arrays."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import math
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

ANIMAL_CLASSES: tuple[str, ...] = (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
PACKAGE = "animal_mnist"
DISTRIBUTION = "animal-mnist"
DATA_FILES = {"images": "animal_data_version_3.gz", "labels": "animal_label_version_3.gz"}
INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"
#: The demo world's source. A config with this source leaves ``source`` out of its digest, so that worlds
#: built before sources existed keep their digest.
DEFAULT_SOURCE = "animal-mnist"


# ------------------------------------------------------------------------------------------ source data
def _reconstruct() -> Callable:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray._reconstruct


def _frombuffer() -> Callable:
    try:
        from numpy._core import numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import numeric  # type: ignore[no-redef]
    return numeric._frombuffer  # type: ignore[attr-defined]  # private: what numpy's pickles name


#: The only globals a pickled plain numpy array names (protocols 3-5, numpy 1.x and 2.x spellings);
#: each builds an array or a dtype from data and nothing else.
_NUMPY_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5 (out-of-band buffers)
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly the globals a pickled plain numpy array refers to, and nothing else."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        get = _NUMPY_GLOBALS.get((module, name))
        if get is None:
            raise DataError(
                f"{self.source}: refusing to unpickle {module}.{name}: only plain numpy arrays are "
                "accepted in a data file (a pickle that names other globals could run code)"
            )
        return get()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: refusing a pickle with persistent ids: only plain numpy arrays are accepted")


def load_numpy_pickle(data: bytes, source: str) -> np.ndarray:
    """A plain numpy array from pickle bytes, refusing any pickle that names anything else."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{source}: not a readable numpy pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, np.ndarray) or obj.dtype.hasobject:
        raise DataError(
            f"{source}: expected a plain numpy array, got {type(obj).__name__}"
            + (f" of dtype {obj.dtype}" if isinstance(obj, np.ndarray) else "")
        )
    return obj


def animal_mnist_files() -> dict[str, Path]:
    """Paths of the data files inside the installed package, found without importing it (its loader
    module imports TensorFlow)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the demo world needs the Animal-MNIST data package, which is not installed: run "
            f"`{INSTALL_HINT}` (--no-deps: its TensorFlow dependency is not needed)"
        )
    base = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    files = {k: base / v for k, v in DATA_FILES.items()}
    for p in files.values():
        if not p.is_file():
            raise DataError(
                f"{p}: Animal-MNIST data file missing from the installed package; reinstall it with `{INSTALL_HINT}`"
            )
    return files


def _gunzip(path: Path) -> tuple[bytes, str]:
    """A source file's decompressed bytes and the digest of the file as shipped (for the provenance)."""
    raw = path.read_bytes()
    try:
        return gzip.decompress(raw), "sha256:" + hashlib.sha256(raw).hexdigest()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a gzip file: {e}") from None


def load_animal_mnist() -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """``(images (N, 28, 28) uint8, labels (N,) int64 in ANIMAL_CLASSES order, source info)``."""
    files = animal_mnist_files()
    arrays, info = {}, {}
    for k, p in files.items():
        data, info[k] = _gunzip(p)
        arrays[k] = load_numpy_pickle(data, str(p))
    images, labels = arrays["images"], arrays["labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise DataError(f"{files['images']}: expected (N, 28, 28) uint8 images, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{files['labels']}: expected {len(images)} integer labels in 0..9")
    try:
        info["version"] = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        info["version"] = "unknown"
    return images, labels.astype(np.int64), info


#: Fashion-MNIST (Zalando, MIT): 70,000 grey 28x28 photos of 10 kinds of garment. No PyPI package ships
#: its data; Debian's ``dataset-fashion-mnist`` does (the upstream IDX files), and ``make install`` unpacks
#: it into the virtual environment. The world uses its official test split: 1,000 images per class.
FASHION_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
FASHION_DEB = "dataset-fashion-mnist=0.0~git20200523.55506a9-1"
FASHION_FILES = {"images": "t10k-images-idx3-ubyte.gz", "labels": "t10k-labels-idx1-ubyte.gz"}
#: The official training split (6,000 images per class), for the tuning world only: its images are disjoint
#: from the test split the second world is built from.
FASHION_TRAIN_FILES = {"images": "train-images-idx3-ubyte.gz", "labels": "train-labels-idx1-ubyte.gz"}
FASHION_ENV = "SAFESPEC_FASHION_MNIST_DIR"
FASHION_INSTALL_HINT = (
    f"`make install` (it unpacks Debian's {FASHION_DEB} into the virtual environment), "
    f"`apt-get install dataset-fashion-mnist`, or set {FASHION_ENV} to a folder holding "
    f"{' and '.join(FASHION_FILES.values())}"
)


def fashion_mnist_dirs() -> list[Path]:
    """Where the Fashion-MNIST files are looked for, in order: $SAFESPEC_FASHION_MNIST_DIR alone when it is set,
    else the virtual environment's share/ (``make install``) and the system's (``apt-get install``)."""
    env = os.environ.get(FASHION_ENV)
    if env:
        return [Path(env)]
    return [Path(sys.prefix) / "share" / "datasets" / "fashion-mnist", Path("/usr/share/datasets/fashion-mnist")]


def fashion_mnist_files(names: dict[str, str] = FASHION_FILES) -> dict[str, Path]:
    for d in fashion_mnist_dirs():
        files = {k: d / v for k, v in names.items()}
        if all(p.is_file() for p in files.values()):
            return files
    where = ", ".join(str(d) for d in fashion_mnist_dirs())
    raise DataError(
        f"the fashion-mnist world needs {' and '.join(names.values())}, found in none of {where}: "
        f"install them with {FASHION_INSTALL_HINT}"
    )


def read_idx(data: bytes, source: str, *, ndim: int) -> np.ndarray:
    """A uint8 array from an IDX file's bytes (the MNIST format: magic 0x0000 08 <ndim>, big-endian int32
    sizes, then the raw bytes). Only unsigned bytes are accepted; the sizes must account for every byte."""
    head = 4 + 4 * ndim
    if len(data) < head or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise DataError(f"{source}: not an IDX file of unsigned bytes with {ndim} dimension(s)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if math.prod(shape) != len(data) - head:
        raise DataError(f"{source}: IDX header says {shape} ({math.prod(shape)} bytes) but {len(data) - head} follow")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(shape)


def load_fashion_mnist(names: dict[str, str] = FASHION_FILES) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """``(images (N, 28, 28) uint8, labels (N,) int64 in FASHION_CLASSES order, source info)``."""
    files = fashion_mnist_files(names)
    arrays, info = {}, {}
    for (k, p), ndim in zip(files.items(), (3, 1)):
        data, info[k] = _gunzip(p)
        arrays[k] = read_idx(data, str(p), ndim=ndim)
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[1:] != (28, 28):
        raise DataError(f"{files['images']}: expected 28x28 images, got {images.shape[1:]}")
    if len(labels) != len(images) or labels.max(initial=0) > 9:
        raise DataError(f"{files['labels']}: expected {len(images)} labels in 0..9")
    info["version"] = FASHION_DEB.split("=", 1)[1]
    return np.ascontiguousarray(images), labels.astype(np.int64), info


@dataclass(frozen=True)
class Source:
    """A labelled data set of grey 28x28 images that a world can be built from.

    ``files`` finds the data files (a one-line DataError saying how to install them when they are missing);
    ``load`` reads ``(images (N, 28, 28) uint8, labels (N,) int64 in ``classes`` order, info)``, where info
    holds a ``sha256:`` digest per file and the package version."""

    name: str
    classes: tuple[str, ...]
    package: str  # the distribution the files come from, for world.json
    licence: str
    what: str  # one line for world.json
    files: Callable[[], dict[str, Path]]
    load: Callable[[], tuple[np.ndarray, np.ndarray, dict[str, str]]]
    near_duplicate: float  # the suggested WorldConfig.near_duplicate for this data


SOURCES: dict[str, Source] = {
    "animal-mnist": Source(
        "animal-mnist",
        ANIMAL_CLASSES,
        DISTRIBUTION,
        "MIT",
        "safespec demo world: Animal-MNIST silhouettes (28x28 grey PNG) and the old model v1",
        lambda: animal_mnist_files(),
        lambda: load_animal_mnist(),
        near_duplicate=0.12,
    ),  # 284 exact and a few near duplicates; distinct silhouettes stay apart
    "fashion-mnist": Source(
        "fashion-mnist",
        FASHION_CLASSES,
        "dataset-fashion-mnist (Debian)",
        "MIT",
        "safespec second world (bench and tests only): Fashion-MNIST garments (28x28 grey PNG) and the old model v1",
        lambda: fashion_mnist_files(),
        lambda: load_fashion_mnist(),
        # no exact duplicates in the test split; below 0.08 only a handful of trousers and bags pair up,
        # where a class's median nearest neighbour is at 0.23-0.59
        near_duplicate=0.08,
    ),
    # The tuning world's (bench only): settings are chosen on it and reported on the other two worlds.
    "fashion-mnist-train": Source(
        "fashion-mnist-train",
        FASHION_CLASSES,
        "dataset-fashion-mnist (Debian)",
        "MIT",
        "safespec tuning world (bench only): Fashion-MNIST's training split (28x28 grey PNG) and the old model v1",
        lambda: fashion_mnist_files(FASHION_TRAIN_FILES),
        lambda: load_fashion_mnist(FASHION_TRAIN_FILES),
        near_duplicate=0.08,
    ),
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"world: unknown source {name!r} (expected one of {', '.join(SOURCES)})") from None

"""Images as tensors: decoding (threaded for large images), preloaded banks, and fixed augmented views."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .manifests import Manifest

#: Preload a bank into one tensor when its preprocessed images fit in this many bytes.
PRELOAD_BYTES = 1 << 30
#: Decoding threads pay off only for images of real model size: 2 threads decoded 224-px JPEGs 1.9x faster
#: than one on 2 cores, but the demo's 32-px PNGs 1.4x slower (per image, Python holds the GIL longer than
#: the C decoder releases it).
THREADED_MIN_PIXELS = 96 * 96


def decode_workers() -> int:
    """Threads for decoding images: one per core this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


# ------------------------------------------------------------------------------------------ image banks
def load_image(manifest: Manifest, i: int) -> Image.Image:
    """Decode record ``i`` fully, as RGB (grey or palette images become 3-channel, as CLIP expects)."""
    r = manifest.records[i]
    try:
        with Image.open(r.path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        where = f"{manifest.source}:row {r.row}" if not manifest.is_folder else f"{manifest.source}"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: cannot read image {r.path}: {reason}") from None


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, manifest: Manifest, preprocess: Callable[[Image.Image], torch.Tensor]):
        self.manifest, self.preprocess = manifest, preprocess

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_image(self.manifest, i))


class ImageBank:
    """Decoded, preprocessed images of a manifest, addressable by index.

    Small data (the demo world, most protected stores of a few thousand images) is decoded once into one
    tensor, so a training step costs an index, not a decode. Large data is decoded on demand.
    ``preload=None`` picks by size. ``num_workers > 1`` decodes images of at least
    :data:`THREADED_MIN_PIXELS` with that many threads (the preload, each batch of large data, and in
    :meth:`iter_batches` the next batch while the caller uses this one)."""

    def __init__(
        self,
        manifest: Manifest,
        preprocess: Callable[[Image.Image], torch.Tensor],
        *,
        preload: bool | None = None,
        num_workers: int = 0,
        progress: Callable[[int], Any] | None = None,
        images: torch.Tensor | None = None,
    ):
        """``images``: the manifest's images as ``preprocess`` makes them, decoded before (a cache); the
        bank is then preloaded with them and decodes nothing."""
        self.manifest = manifest
        self.preprocess = preprocess
        self.num_workers = num_workers
        self._pool = None
        self._data = _ImageDataset(manifest, preprocess)
        if len(manifest) == 0:
            raise DataError(f"{manifest.source}: empty manifest: no images to load")
        if images is not None:
            if images.dim() < 2 or images.shape[0] != len(manifest):
                raise DataError(
                    f"{manifest.source}: {tuple(images.shape)} decoded images for a manifest of {len(manifest)}"
                )
            self.item_shape = tuple(images.shape[1:])
            self.threads = 0
            self.tensor: torch.Tensor | None = images
            return
        first = self._data[0]
        self.item_shape = tuple(first.shape)
        self.threads = num_workers if first.shape[-1] * first.shape[-2] >= THREADED_MIN_PIXELS else 0
        if preload is None:
            preload = len(manifest) * first.numel() * first.element_size() <= PRELOAD_BYTES
        self.tensor = None
        if preload:
            t = torch.empty((len(manifest), *self.item_shape), dtype=first.dtype)
            t[0] = first
            rest = range(1, len(manifest))
            try:
                decoded = (
                    map(self._data.__getitem__, rest)
                    if self.threads <= 1
                    else self._decoder().map(self._data.__getitem__, rest)
                )
                for i, img in zip(rest, decoded):
                    t[i] = img
                    if progress is not None:
                        progress(i)
            finally:
                self._close_pool()  # preloaded (or failed): no decoding after this
            self.tensor = t

    @property
    def preloaded(self) -> bool:
        return self.tensor is not None

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest.labels

    def __getitem__(self, idx: Any) -> torch.Tensor:
        """``bank[idx_array] -> (B, C, H, W)``; an int gives one image (C, H, W)."""
        if isinstance(idx, (int, np.integer)):
            return self.tensor[int(idx)] if self.tensor is not None else self._data[int(idx)]
        ix = torch.as_tensor(np.asarray(idx, dtype=np.int64)) if not torch.is_tensor(idx) else idx.long().cpu()
        if self.tensor is not None:
            return self.tensor.index_select(0, ix)
        if ix.numel() == 0:
            return torch.empty((0, *self.item_shape))
        rows = ix.tolist()
        if self.threads > 1 and len(rows) > 1:
            return torch.stack(list(self._decoder().map(self._data.__getitem__, rows)))
        return torch.stack([self._data[i] for i in rows])

    def _decoder(self):
        """Threads that decode images: PIL's decoders and the tensor transforms release the GIL, so threads
        use every core, and an error is re-raised in the caller as it was raised (a one-line DataError)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="safespec-decode")
        return self._pool

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def iter_batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(indices, images)`` over rows ``[start, stop)`` of the bank (all of it by default), in
        manifest order (a torchrun rank evaluates its own contiguous shard)."""
        n = len(self) if stop is None else min(stop, len(self))
        batches = [np.arange(s, min(s + batch_size, n), dtype=np.int64) for s in range(start, n, batch_size)]
        if self.tensor is not None or self.threads <= 1:
            for idx in batches:
                yield idx, self[idx]
            return
        # large data: the next batch is decoded (by the decoding threads) while the caller uses this one
        with ThreadPoolExecutor(1, thread_name_prefix="safespec-prefetch") as ahead:
            pending = ahead.submit(self.__getitem__, batches[0]) if batches else None
            for k, idx in enumerate(batches):
                assert pending is not None  # a batch to read means one was submitted
                images = pending.result()
                if k + 1 < len(batches):
                    pending = ahead.submit(self.__getitem__, batches[k + 1])
                yield idx, images


class ViewBank:
    """A bank's images followed by ``views`` fixed augmented copies of each (store views).

    The protected store is usually the old model's own training data, which it fits far more confidently
    than images it never saw: constraints measured there barely move while held-out images flip
    (bench/RESULTS.md). A randomly shifted, rotated, rescaled or mirrored copy of a stored image is an
    image the old model did not fit, closer to what the certificate will see. The copies are fixed:
    their affine parameters are drawn once from ``seed`` (per view and image), so the old model's
    references on them are computed once and cached like any split, and a resumed run sees the same views.

    Row ``v * n + i`` is view ``v`` of image ``i`` (view 0 is the image itself). Augmentation runs on the
    preprocessed tensor (``grid_sample``, border padding), batch by batch, so nothing is stored twice."""

    #: shift as a fraction of the side, rotation in degrees, relative scale change; mirror with p = 1/2
    SHIFT, ROTATE, SCALE = 0.1, 12.0, 0.1

    def __init__(self, base: ImageBank, views: int, seed: int = 0):
        if views < 0:
            raise ValueError(f"views must be >= 0, got {views}")
        self.base, self.views, self.n = base, int(views), len(base)
        self.item_shape = base.item_shape
        g = torch.Generator().manual_seed(int(seed))
        m = self.n * self.views
        u = torch.rand((5, m), generator=g, dtype=torch.float64) * 2 - 1
        ang = u[0] * np.radians(self.ROTATE)
        scale = 1 + u[1] * self.SCALE
        flip = torch.where(u[4] < 0, -1.0, 1.0).double()
        cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
        shift = 2 * self.SHIFT  # affine_grid coordinates span [-1, 1]
        self._theta = torch.stack(
            [torch.stack([cos * flip, -sin, u[2] * shift], 1), torch.stack([sin * flip, cos, u[3] * shift], 1)], 1
        ).float()

    def __len__(self) -> int:
        return self.n * (1 + self.views)

    @property
    def labels(self) -> np.ndarray:
        return np.tile(self.base.labels, 1 + self.views)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, (int, np.integer)):
            return self[np.array([int(idx)])][0]
        ix = np.asarray(idx.cpu() if torch.is_tensor(idx) else idx, dtype=np.int64)
        images = self.base[ix % self.n]
        aug = ix >= self.n
        if aug.any():
            sel = torch.as_tensor(np.flatnonzero(aug))
            x = images.index_select(0, sel)
            theta = self._theta.index_select(0, torch.as_tensor(ix[aug] - self.n))
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            images = images.clone()
            images[sel] = F.grid_sample(x.float(), grid, padding_mode="border", align_corners=False).to(images.dtype)
        return images

    def iter_batches(
        self, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        n = len(self) if stop is None else min(stop, len(self))
        for s in range(start, n, batch_size):
            idx = np.arange(s, min(s + batch_size, n), dtype=np.int64)
            yield idx, self[idx]

    def digest(self, base_digest: str) -> str:
        """The views' digest: the base split's, the view count, the seed's draw and the augmentation."""
        h = hashlib.sha256(base_digest.encode())
        h.update(
            json.dumps({"views": self.views, "shift": self.SHIFT, "rotate": self.ROTATE, "scale": self.SCALE}).encode()
        )
        h.update(self._theta.numpy().tobytes())
        return "sha256:" + h.hexdigest()

"""The data stage: manifests, image banks, class-balanced samplers and data digests.

Everything a certificate rests on is data, so this module is strict: a manifest that names a missing,
unreadable or corrupt image, an unknown label or a malformed row is a one-line :class:`DataError` naming
the file and row, and nothing is ever skipped. Digests cover the manifest and the bytes of every image it
names, so the report can prove which data a verdict was computed on.

Rows in CSV manifests are numbered as an editor shows them: the header is row 1, the first record row 2.

Modules: ``manifests``, ``digests``, ``images`` (decoding, banks, views), ``samplers``.
"""

from __future__ import annotations

from .digests import cache_root, file_digest
from .images import PRELOAD_BYTES, THREADED_MIN_PIXELS, ImageBank, ViewBank, decode_workers, load_image
from .manifests import IMAGE_EXTENSIONS, Manifest, Record, check_disjoint, read_manifest, write_manifest
from .samplers import ProtectedSampler, TargetSampler

__all__ = [
    "IMAGE_EXTENSIONS",
    "PRELOAD_BYTES",
    "THREADED_MIN_PIXELS",
    "ImageBank",
    "Manifest",
    "ProtectedSampler",
    "Record",
    "TargetSampler",
    "ViewBank",
    "cache_root",
    "check_disjoint",
    "decode_workers",
    "file_digest",
    "load_image",
    "read_manifest",
    "write_manifest",
]

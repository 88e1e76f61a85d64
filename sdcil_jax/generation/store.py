"""The replay store: generated images on disk, one checksummed shard per class.

Layout of a store directory::

    manifest.json          fingerprint + readable fingerprint fields + one entry per finished shard
    class_00003.npz        uint8 images (n, H, W, C) and their int image indices; the number is
                           the DATASET label id (not the incremental label)
    preview.png            a grid of a few images per class (written by generate_replay_pool)

Shards and the manifest are written atomically (temporary file in the same folder, fsync,
os.replace).
A shard counts as finished only once the manifest lists it with its sha256, so a run killed between
writing a shard and updating the manifest regenerates that shard; a shard whose checksum no longer
matches is reported and regenerated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdcil_jax.errors import GenerationError
from sdcil_jax.fileio import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def shard_name(class_id: int) -> str:
    """File name of the shard of dataset class ``class_id``."""
    return f"class_{int(class_id):05d}.npz"


def _canonical(obj: Any) -> Any:
    """JSON-ready, order-independent form (tuples -> lists, mappings with string keys)."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def fingerprint_of(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the fingerprint fields."""
    text = json.dumps(_canonical(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ReplayStore:
    """A replay store directory (see the module docstring). Call :meth:`open_or_create` or
    :meth:`open` before reading or writing."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(os.path.expanduser(str(directory)))
        self.manifest: dict[str, Any] | None = None
        self._verified: dict[int, tuple[str, int, int]] = {}  # class -> (sha, mtime_ns, size)

    # ---------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    def _read_manifest(self) -> dict[str, Any] | None:
        if not os.path.exists(self.manifest_path):
            return None
        try:
            with open(self.manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            manifest["shards"]  # noqa: B018  (shape check)
            manifest["fingerprint"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise GenerationError(
                f"Replay store manifest {self.manifest_path} is unreadable ({exc}); delete the "
                "store folder and rerun --mode generate."
            ) from None
        return manifest

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=1, sort_keys=True).encode("utf-8")
        atomic_write(self.manifest_path, lambda f: f.write(text))

    def open_or_create(self, fingerprint_fields: Mapping[str, Any]) -> ReplayStore:
        """Open the store for the generation described by ``fingerprint_fields`` (create if new).

        Raises :class:`GenerationError` if the folder holds a store made with other settings.
        """
        fields = _canonical(dict(fingerprint_fields))
        fingerprint = fingerprint_of(fields)
        os.makedirs(self.directory, exist_ok=True)
        manifest = self._read_manifest()
        if manifest is None:
            self.manifest = {
                "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                "fields": fields, "shards": {},
            }
            self._write_manifest()
        elif manifest["fingerprint"] != fingerprint:
            old = manifest.get("fields", {})
            differing = sorted(k for k in set(old) | set(fields) if old.get(k) != fields.get(k))
            raise GenerationError(
                f"Replay store {self.directory} was generated with different settings (differing: "
                f"{', '.join(differing) or 'fingerprint'}); set generation.store_dir to another "
                "folder or delete this store to regenerate."
            )
        else:
            self.manifest = manifest
        return self

    def open(self) -> ReplayStore:
        """Open an existing store for reading (training time); raise if there is none."""
        manifest = self._read_manifest()
        if manifest is None:
            raise GenerationError(
                f"No replay store at {self.directory} (no {MANIFEST}); run --mode generate first "
                "or point generation.store_dir to an existing store."
            )
        self.manifest = manifest
        return self

    def _require_open(self) -> dict[str, Any]:
        if self.manifest is None:
            self.open()
        return self.manifest

    @property
    def fingerprint(self) -> str:
        """The store's fingerprint (sha256 hex)."""
        return self._require_open()["fingerprint"]

    @property
    def fields(self) -> dict[str, Any]:
        """The readable fields the fingerprint was computed from."""
        return self._require_open()["fields"]

    # ---------------------------------------------------------------- shards
    def shard_path(self, class_id: int) -> str:
        """Path of the shard of dataset class ``class_id``."""
        return os.path.join(self.directory, shard_name(class_id))

    def entry(self, class_id: int) -> dict[str, Any] | None:
        """The manifest entry of a finished shard, or None."""
        return self._require_open()["shards"].get(str(int(class_id)))

    def class_ids(self) -> list[int]:
        """Dataset class ids with a shard listed in the manifest."""
        return sorted(int(k) for k in self._require_open()["shards"])

    def count(self, class_id: int) -> int:
        """Number of images in the listed shard of ``class_id`` (0 if none)."""
        entry = self.entry(class_id)
        return int(entry["count"]) if entry else 0

    def _checksum_ok(self, class_id: int, entry: Mapping[str, Any]) -> bool:
        path = self.shard_path(class_id)
        if not os.path.isfile(path):
            return False
        stat = os.stat(path)
        cached = self._verified.get(int(class_id))
        if cached == (entry["sha256"], stat.st_mtime_ns, stat.st_size):
            return True
        if _sha256_file(path) != entry["sha256"]:
            return False
        self._verified[int(class_id)] = (entry["sha256"], stat.st_mtime_ns, stat.st_size)
        return True

    def has_valid_shard(self, class_id: int) -> bool:
        """True if ``class_id`` has a shard listed in the manifest whose checksum matches."""
        entry = self.entry(class_id)
        return entry is not None and self._checksum_ok(class_id, entry)

    def is_complete(self, class_id: int, count: int) -> bool:
        """True if the shard exists, is in the manifest, its checksum matches and holds >= count.

        A shard whose checksum fails is logged (one warning line) and reported as incomplete.
        """
        entry = self.entry(class_id)
        if entry is None:
            return False
        if not self._checksum_ok(class_id, entry):
            if os.path.isfile(self.shard_path(class_id)):
                log.warning(
                    "Replay shard %s failed its checksum (corrupt or modified); regenerating it.",
                    self.shard_path(class_id),
                )
            return False
        return int(entry["count"]) >= int(count)

    def write_shard(
        self, class_id: int, images: np.ndarray, indices: Sequence[int], **extra: Any
    ) -> None:
        """Atomically write the shard of ``class_id`` then list it in the manifest.

        ``extra`` (JSON-able) is stored in the shard's manifest entry (e.g. the class name).
        """
        manifest = self._require_open()
        images = np.asarray(images)
        indices = np.asarray(indices, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(indices):
            raise ValueError(
                f"shard images must be uint8 (n, H, W, C) with n == len(indices); got "
                f"{images.dtype} {images.shape} and {len(indices)} indices"
            )
        path = self.shard_path(class_id)
        atomic_write(path, lambda f: np.savez(f, images=images, indices=indices))
        entry = {
            "class_id": int(class_id), "file": shard_name(class_id), "count": int(len(images)),
            "sha256": _sha256_file(path), "shape": list(images.shape[1:]),
        }
        entry.update(_canonical(extra))
        manifest["shards"][str(int(class_id))] = entry
        self._verified.pop(int(class_id), None)
        self._write_manifest()

    def _read_shard(self, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        entry = self.entry(class_id)
        if entry is None:
            raise GenerationError(
                f"Replay store {self.directory} has no finished shard for class {int(class_id)}; "
                "rerun --mode generate to complete it."
            )
        if not self._checksum_ok(class_id, entry):
            raise GenerationError(
                f"Replay shard {self.shard_path(class_id)} is missing or corrupt (checksum "
                "mismatch); rerun --mode generate to regenerate it."
            )
        with np.load(self.shard_path(class_id)) as data:
            return data["images"], data["indices"]

    def load(self, class_id: int, count: int | None = None) -> np.ndarray:
        """uint8 images (n, H, W, C) of ``class_id`` (first ``count`` by index if given)."""
        images, _ = self.load_with_indices(class_id, count)
        return images

    def load_with_indices(
        self, class_id: int, count: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`load` but also returns the image indices (ascending)."""
        images, indices = self._read_shard(class_id)
        order = np.argsort(indices, kind="stable")
        images, indices = images[order], indices[order]
        if count is not None:
            if count > len(images):
                raise GenerationError(
                    f"Replay store {self.directory} holds {len(images)} images of class "
                    f"{int(class_id)} but {count} were requested; raise generation.per_class and "
                    "rerun --mode generate, or use fewer (synthetic.per_class)."
                )
            images, indices = images[:count], indices[:count]
        return images, indices

"""The replay store: generated images on disk in checksummed sub-shards, read whole or on demand.

Layout of a store directory (local or ``gs://``; every access goes through :mod:`sdcil_jax.fileio`)::

    manifest.json                  format_version, fingerprint and its readable fields, the codec,
                                   per-class notes (name, prompts) and one entry per listed shard
    class_00003_000064.shard       images 64.. of dataset class 3 (the DATASET label id), encoded
                                   with the store's codec (:mod:`sdcil_jax.generation.shards`)
    preview.png                    a grid of a few images per class (written by generate_replay_pool)

A class's images are spread over shards of consecutive indices (``generation.images_per_shard``),
so a killed generation loses at most the shard it was writing. Shard files are written atomically
(temporary name carrying the process index, then rename) and check themselves (their header holds
the payload's sha256); the manifest lists every shard with the sha256 of its whole file.
Generation writes shards from every process and merges them into the manifest once, after all
processes finished (:meth:`ReplayStore.merge`); a shard file that the manifest does not list (a run
killed before its merge) is adopted by the next generation if it checks out. Training reads only
listed shards whose checksum matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdcil_jax import fileio
from sdcil_jax.errors import GenerationError
from sdcil_jax.fingerprint import canonical, fingerprint_of, to_json
from sdcil_jax.generation import shards as shard_lib

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 1: one .npz per class (no longer read); 2: self-checking sub-shards


def _stat(path: str) -> tuple[int, int] | None:
    """(mtime_ns, size) of a local file, None elsewhere (object stores: no cheap cache key)."""
    if not fileio.is_local(path):
        return None
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with fileio.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ReplayStore:
    """A replay store directory (see the module docstring). Call :meth:`open_or_create` or
    :meth:`open` before reading or writing."""

    def __init__(self, directory: str):
        directory = os.fspath(directory)
        self.directory = (os.path.abspath(os.path.expanduser(directory))
                          if fileio.is_local(directory) else directory)
        self.manifest: dict[str, Any] | None = None
        self._verified: dict[str, tuple[str, Any]] = {}  # shard -> (sha, stat when checked)
        self._written: dict[str, dict[str, Any]] = {}  # entries of shards this object wrote

    def path(self, name: str) -> str:
        return os.fspath(fileio.path(self.directory) / name)

    # ---------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> str:
        return self.path(MANIFEST)

    def _read_manifest(self) -> dict[str, Any] | None:
        path = fileio.path(self.manifest_path)
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
            version = manifest.get("format_version")
            manifest["shards"], manifest["fingerprint"]  # noqa: B018  (shape check)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GenerationError(
                f"Replay store manifest {self.manifest_path} is unreadable ({exc}); delete the "
                "store folder and rerun --mode generate.") from None
        if version != FORMAT_VERSION:
            raise GenerationError(
                f"Replay store {self.directory} is in the old format {version} (one .npz file per "
                "class), which this version no longer reads; set generation.store_dir to a new "
                "folder (or move this one aside) and rerun --mode generate.")
        return manifest

    def _write_manifest(self) -> None:
        text = json.dumps(to_json(self.manifest), indent=1, sort_keys=True)
        fileio.atomic_write_text(self.manifest_path, text)

    def open_or_create(self, fingerprint_fields: Mapping[str, Any], codec: str = "raw"
                       ) -> ReplayStore:
        """Open the store for the generation described by ``fingerprint_fields`` (create it, with
        ``codec``, if new). Raises :class:`GenerationError` if the folder holds a store made with
        other settings."""
        fields = canonical(dict(fingerprint_fields))
        fingerprint = fingerprint_of(fields)
        fileio.path(self.directory).mkdir(parents=True, exist_ok=True)
        manifest = self._read_manifest()
        if manifest is None:
            self.manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                             "fields": fields, "codec": shard_lib.resolve_format(codec, (0, 0)),
                             "classes": {}, "shards": {}}
            self._write_manifest()
        elif manifest["fingerprint"] != fingerprint:
            old = manifest.get("fields", {})
            differing = sorted(k for k in set(old) | set(fields) if old.get(k) != fields.get(k))
            raise GenerationError(
                f"Replay store {self.directory} was generated with different settings (differing: "
                f"{', '.join(differing) or 'fingerprint'}); set generation.store_dir to another "
                "folder or delete this store to regenerate.")
        else:
            self.manifest = manifest
        return self

    def open(self) -> ReplayStore:
        """Open an existing store for reading (training time); raise if there is none."""
        manifest = self._read_manifest()
        if manifest is None:
            raise GenerationError(
                f"No replay store at {self.directory} (no {MANIFEST}); run --mode generate first "
                "or point generation.store_dir to an existing store.")
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

    @property
    def codec(self) -> str:
        """How new shards are encoded (``raw``, ``png`` or ``jpeg``)."""
        return self._require_open()["codec"]

    def note_class(self, class_id: int, **info: Any) -> None:
        """Readable notes on a class (its name, prompts), kept in the manifest."""
        self._require_open().setdefault("classes", {})[str(int(class_id))] = canonical(info)

    def class_note(self, class_id: int) -> dict[str, Any]:
        """The notes of :meth:`note_class` (e.g. ``{'name': ..., 'prompts': [...]}``), or {}."""
        return dict(self._require_open().get("classes", {}).get(str(int(class_id)), {}))

    # ---------------------------------------------------------------- listing
    def shards(self, class_id: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        """``(file name, entry)`` of the listed shards (of one class), by class then first index."""
        items = self._require_open()["shards"].items()
        if class_id is not None:
            items = [(n, e) for n, e in items if e["class_id"] == int(class_id)]
        return sorted(items, key=lambda item: (item[1]["class_id"], item[1]["first"]))

    def class_ids(self) -> list[int]:
        """Dataset class ids with at least one listed shard."""
        return sorted({e["class_id"] for _, e in self.shards()})

    def indices(self, class_id: int) -> list[int]:
        """Image indices of ``class_id`` that listed shards hold, ascending."""
        return sorted(i for _, e in self.shards(class_id)
                      for i in range(e["first"], e["first"] + e["count"]))

    def count(self, class_id: int) -> int:
        """Number of listed images of ``class_id`` (0 if none)."""
        return sum(e["count"] for _, e in self.shards(class_id))

    def _checksum_ok(self, name: str, entry: Mapping[str, Any]) -> bool:
        path = self.path(name)
        try:
            stat = _stat(path)
            if stat is not None and self._verified.get(name) == (entry["sha256"], stat):
                return True
            ok = _sha256_file(path) == entry["sha256"]
        except OSError:  # missing
            return False
        if ok:
            self._verified[name] = (entry["sha256"], stat)
        return ok

    def is_complete(self, class_id: int, count: int) -> bool:
        """True if listed shards hold images ``0..count-1`` of the class and every listed shard of
        the class matches its checksum (a mismatch is logged as a warning)."""
        ok = True
        for name, entry in self.shards(class_id):
            if not self._checksum_ok(name, entry):
                log.warning("Replay shard %s is missing or failed its checksum (corrupt or "
                            "modified); rerun --mode generate to regenerate it.", self.path(name))
                ok = False
        return ok and set(range(int(count))) <= set(self.indices(class_id))

    def repair(self, class_ids: Sequence[int]) -> None:
        """Before generating: unlist every listed shard of ``class_ids`` that fails its checksum
        (warning once), unless the file checks itself (a shard regenerated by a run killed before
        its merge: relisted with its new checksum)."""
        for c in class_ids:
            for name, entry in self.shards(c):
                if self._checksum_ok(name, entry):
                    continue
                checked = shard_lib.check_shard_file(self.path(name))
                if checked is not None and _matches(checked[0], entry):
                    entry.update(sha256=checked[1])
                    continue
                if fileio.path(self.path(name)).exists():
                    log.warning("Replay shard %s failed its checksum (corrupt or modified); "
                                "regenerating it.", self.path(name))
                del self.manifest["shards"][name]

    # ---------------------------------------------------------------- writing
    def write_shard(self, class_id: int, first: int, images: np.ndarray, *, process: int = 0,
                    commit: bool = True) -> tuple[str, dict[str, Any]]:
        """Atomically write images ``first, first + 1, ...`` of ``class_id`` as one shard file.

        ``commit`` lists it in the manifest at once (one process); otherwise :meth:`merge` lists it.
        Returns ``(file name, manifest entry)``.
        """
        self._require_open()
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
            raise ValueError(f"shard images must be uint8 (n, H, W, C) with n > 0; got "
                             f"{images.dtype} {images.shape}")
        data = shard_lib.encode_shard(class_id, first, images, self.codec, process)
        name = shard_lib.shard_name(class_id, first)
        fileio.atomic_write(self.path(name), lambda f: f.write(data))
        entry = {"class_id": int(class_id), "first": int(first), "count": int(len(images)),
                 "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                 "process": int(process)}
        self._written[name] = entry
        self._verified.pop(name, None)
        if commit:
            self.manifest["shards"][name] = entry
            self._write_manifest()
        return name, entry

    def merge(self) -> list[str]:
        """List every shard file of the folder that the manifest does not list yet: those written
        through this object (checksums known) and those of other processes or of a killed run
        (checked first; a file that fails, or whose images a listed shard already holds, is left
        out). Writes the manifest; returns the names listed now."""
        manifest = self._require_open()
        listed = manifest["shards"]
        added = []
        for path in sorted(fileio.path(self.directory).glob(f"class_*{shard_lib.SUFFIX}")):
            name = path.name
            if name in listed:
                continue
            entry = self._written.get(name)
            stat = _stat(self.path(name)) if entry is not None else None
            if entry is None or (stat is not None and stat[1] != entry["bytes"]):
                checked = shard_lib.check_shard_file(self.path(name))
                if checked is None:
                    log.warning("Replay shard file %s is incomplete or corrupt; ignoring it.",
                                self.path(name))
                    continue
                header, sha = checked
                entry = {k: header[k] for k in ("class_id", "first", "count", "process")}
                entry.update(sha256=sha, bytes=sum(header["sizes"]))
            have = set(self.indices(entry["class_id"]))
            if name != shard_lib.shard_name(entry["class_id"], entry["first"]) or \
                    have & set(range(entry["first"], entry["first"] + entry["count"])):
                continue
            listed[name] = entry
            added.append(name)
        self._write_manifest()
        return added

    def remove_temporary_files(self) -> None:
        """Delete temporary files of killed writers (call only while no process writes)."""
        for path in fileio.path(self.directory).glob(f".tmp-*{shard_lib.SUFFIX}"):
            try:
                path.unlink()
            except OSError:
                pass

    # ---------------------------------------------------------------- reading
    def _covering(self, class_id: int, start: int, count: int) -> list[tuple[int, int, str]]:
        """``(first, count, file)`` of the listed shards of a class; raises unless they hold
        images ``start .. start + count - 1``."""
        entries = [(e["first"], e["count"], n) for n, e in self.shards(class_id)]
        have = set(self.indices(class_id))
        if not set(range(start, start + count)) <= have:
            if not entries:
                raise GenerationError(
                    f"Replay store {self.directory} has no finished shard for class "
                    f"{int(class_id)}; rerun --mode generate to complete it.")
            raise GenerationError(
                f"Replay store {self.directory} holds {len(have)} images of class {int(class_id)} "
                f"but images {start}..{start + count - 1} were requested; raise "
                "generation.per_class and rerun --mode generate, or use fewer (synthetic.per_class).")
        return entries

    def reader(self, class_ids: Sequence[int], start: int, count: int) -> shard_lib.StoreReader:
        """Lazy random access to images ``[start, start + count)`` of each class in ``class_ids``
        (see :class:`~sdcil_jax.generation.shards.StoreReader`): nothing is read until asked."""
        by_class = {int(c): self._covering(int(c), int(start), int(count)) for c in class_ids}
        return shard_lib.StoreReader(self.directory, list(class_ids), start, count, by_class)

    def load(self, class_id: int, count: int | None = None) -> np.ndarray:
        """uint8 images (n, H, W, C) of ``class_id`` (first ``count`` by index if given)."""
        images, _ = self.load_with_indices(class_id, count)
        return images

    def load_with_indices(self, class_id: int, count: int | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`load` but also returns the image indices (ascending). Reads only the shards
        it needs and checks their checksums first."""
        indices = self.indices(class_id)
        count = len(indices) if count is None else int(count)
        if count > len(indices) or not indices:
            self._covering(class_id, 0, max(count, 1))  # raises the right message
        wanted = set(indices[:count])
        images, found = [], []
        for name, entry in self.shards(class_id):
            span = range(entry["first"], entry["first"] + entry["count"])
            if not wanted.intersection(span):
                continue
            if not self._checksum_ok(name, entry):
                raise GenerationError(
                    f"Replay shard {self.path(name)} is missing or corrupt (checksum mismatch); "
                    "rerun --mode generate to regenerate it.")
            with fileio.path(self.path(name)).open("rb") as f:
                header, _ = shard_lib.parse_header(f)
                payload = f.read()
            offsets = np.concatenate([[0], np.cumsum(header["sizes"])]).astype(int)
            for j, i in enumerate(span):
                if i in wanted:
                    images.append(shard_lib.decode(payload[offsets[j]:offsets[j + 1]],
                                                   header["codec"], header["shape"]))
                    found.append(i)
        order = np.argsort(found, kind="stable")
        return np.stack(images)[order], np.asarray(found, np.int64)[order]


def _matches(header: Mapping[str, Any], entry: Mapping[str, Any]) -> bool:
    return all(header[k] == entry[k] for k in ("class_id", "first", "count"))

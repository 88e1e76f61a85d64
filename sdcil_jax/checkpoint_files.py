"""Files of a checkpoint: host copies, content digests, the file list, fitting restored trees.

Helpers of :mod:`sdcil_jax.checkpoint` (kept apart so each module stays readable): every leaf and
JSON item gets a blake2b digest stored in the checkpoint's ``meta``; every file gets a size and
digest in ``sdcil_files.json``; a restored tree is checked leaf by leaf against the caller's
template (structure, shape, dtype).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from sdcil_jax import fileio
from sdcil_jax.errors import UserError
from sdcil_jax.fingerprint import dumps

ITEMS = ("state", "old", "memory", "progress", "metrics", "meta")
FILE_LIST = "sdcil_files.json"


class CheckpointError(UserError):
    """The checkpoint folder cannot be used."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoints in the folder belong to another config, model or format version."""


def key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(key_str(k) for k in path), leaf) for path, leaf in leaves]


def to_host(tree: Any) -> Any:
    """Copy every leaf to a host numpy array (orbax then stores no device sharding)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def tree_digest(tree: Any) -> str:
    """blake2b of every leaf's path, dtype, shape and bytes, in path order (layout-independent)."""
    digest = hashlib.blake2b(digest_size=20)
    for path, leaf in sorted(flat(tree), key=lambda item: item[0]):
        arr = np.asarray(leaf)
        digest.update(json.dumps([list(path), arr.dtype.str, list(arr.shape)]).encode("utf-8"))
        if arr.size:
            digest.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def json_digest(obj: Any) -> str:
    return hashlib.blake2b(dumps(obj).encode("utf-8"), digest_size=20).hexdigest()


def file_digest(path) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with fileio.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(folder) -> list[str]:
    """Every file of the items (orbax's own step metadata files are left out), relative paths."""
    root = fileio.path(folder)
    out = []
    for item in ITEMS:
        base = root / item
        if base.exists():
            for folder, _, names in base.walk():
                out.extend(os.fspath((folder / n).relative_to(root)) for n in names)
    return sorted(out)


def write_file_list(folder) -> None:
    """Write ``folder/sdcil_files.json`` (size and digest of every file) atomically."""
    root = fileio.path(folder)
    files = {rel: [(root / rel).stat().length, file_digest(root / rel)] for rel in list_files(root)}
    fileio.atomic_write_text(root / FILE_LIST, json.dumps(files, sort_keys=True))


def check_file_list(folder) -> None:
    """Raise ValueError if a file listed in ``sdcil_files.json`` is missing or changed."""
    root = fileio.path(folder)
    listing = root / FILE_LIST
    if not listing.exists():
        return  # killed between the save and the list: the item checksums still apply
    files = json.loads(listing.read_text())
    for rel, (size, digest) in sorted(files.items()):
        full = root / rel
        if not full.is_file():
            raise ValueError(f"file {rel} is missing")
        if full.stat().length != size or file_digest(full) != digest:
            raise ValueError(f"file {rel} does not match its checksum")


def describe(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def memory_to_json(memory: Mapping[int, Any]) -> dict[str, Any]:
    arrays = {int(c): np.asarray(v) for c, v in memory.items()}
    dtype = np.result_type(*arrays.values()) if arrays else np.dtype(np.int64)
    return {"dtype": np.dtype(dtype).str,
            "classes": {str(c): arrays[c].tolist() for c in sorted(arrays)}}


def memory_from_json(obj: Mapping[str, Any]) -> dict[int, np.ndarray]:
    dtype = np.dtype(obj["dtype"])
    classes = obj["classes"]
    return {int(c): np.asarray(classes[c], dtype=dtype) for c in sorted(classes, key=int)}


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def free_path(path: str) -> str:
    candidate, n = path, 1
    while fileio.path(candidate).exists():
        candidate, n = f"{path}-{n}", n + 1
    return candidate


def fit_tree(raw: Any, template: Any, where: str, item: str) -> Any:
    """Put the restored leaves of ``raw`` into ``template``'s structure, checking shapes and dtypes."""
    saved = dict(flat(raw))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [tuple(key_str(k) for k in path) for path, _ in leaves]
    missing = [p for p in paths if p not in saved]
    unexpected = sorted(set(saved) - set(paths))
    if missing or unexpected:
        parts = [f"{'.'.join(p)} missing" for p in missing[:3]]
        parts += [f"{'.'.join(p)} unexpected" for p in unexpected[:3]]
        raise CheckpointMismatchError(
            f"{where} does not fit this run's {item} ({', '.join(parts)}); use another --workdir "
            "or pass --restart to start over.")
    out = []
    for path, (_, leaf) in zip(paths, leaves, strict=True):
        arr = np.asarray(saved[path])
        if isinstance(leaf, (bool, int, float, complex)):
            shape, dtype = (), np.asarray(leaf).dtype
        else:
            shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if arr.shape != shape or arr.dtype != dtype:
            raise CheckpointMismatchError(
                f"{where} does not fit this run's {item} ({'.'.join(path)}: saved "
                f"{describe(arr.shape, arr.dtype)}, expected {describe(shape, dtype)}); use "
                "another --workdir or pass --restart to start over.")
        out.append(arr.item() if isinstance(leaf, (bool, int, float, complex)) else arr)
    return jax.tree_util.tree_unflatten(treedef, out)

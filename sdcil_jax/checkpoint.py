"""Checkpoints of a run: atomic, retained, verified on restore, refused when the config changed.

Format
------
``directory`` is the root of an orbax ``CheckpointManager``. Every checkpoint is a folder named by its
id, an integer the caller chooses and that only grows (a save counter kept in ``progress`` is the
simplest choice), holding these named items::

    <id>/state/     orbax pytree (StandardSave): the caller's training state as host numpy arrays
                    (train state with optimizer state and batch statistics, plus anything else the
                    caller wants restored bit for bit, e.g. raw PRNG keys)
    <id>/old/       orbax pytree: the frozen previous model; present only when there is one
    <id>/memory/    json {"dtype": "int64", "classes": {"<class>": [pool indices, ...]}}
    <id>/progress/  json: the caller's position (task, epoch, step in epoch, counters, wall time)
    <id>/metrics/   json: the caller's results so far (per-task dicts)
    <id>/meta/      json: format_version, library_version, fingerprint (sha256 of the fields),
                    fields (flattened config and scenario values that can change results),
                    has_old, saved_at, checksums (blake2b of every other item's content)
    <id>/sdcil_files.json  {relative path: [size, blake2b]} of every file in the items above,
                    written (atomically) right after orbax has completed the checkpoint

Atomicity: orbax writes a checkpoint into ``<id>.orbax-checkpoint-tmp-<n>`` and renames it to
``<id>`` once every item is written; :meth:`Checkpointer.save` returns only after that rename and
the file list. A process killed mid-save leaves a temporary folder that is never listed as a
checkpoint (and is removed by the next save).

Integrity: :meth:`Checkpointer.restore_latest` first checks the files of the newest checkpoint
against ``sdcil_files.json`` (so damaged files never reach tensorstore, which would print stray
asyncio errors), then restores every item and compares its content checksum with ``meta`` (this
also covers a checkpoint whose file list was not written because the process died in between). A
checkpoint that fails is moved to ``<directory>.corrupt/<id>-<time>`` (never deleted) with a
one-line warning, and the previous one is tried.

Compatibility: :meth:`Checkpointer.check_compatible` compares the stored fingerprint fields with the
current ones and raises :class:`CheckpointMismatchError` naming the differing keys;
:meth:`Checkpointer.restart` moves the old checkpoints to ``<directory>.old-<time>`` instead.

Fingerprint fields (:func:`fingerprint_fields`) are every config key except those in
:data:`NON_RESULT_KEYS`, which cannot change any metric: where checkpoints, data and the replay
store live on disk, how often checkpoints are written, the host pipeline's worker and prefetch
counts (its batches do not depend on them, see :mod:`sdcil_jax.data.host_pipeline`) and the number
of preview images. Keys that can change results even slightly are kept in: for example
``train.eval_batch_size`` changes the shapes XLA compiles for inference, so features (and hence the
herding choice of exemplars) may differ in the last bits. The library version is stored in ``meta``
for information but is not compared.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdcil_jax import __version__
from sdcil_jax.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ITEMS = ("state", "old", "memory", "progress", "metrics", "meta")
_JSON_ITEMS = ("memory", "progress", "metrics")
FILE_LIST = "sdcil_files.json"

# Config keys (or sections) that cannot change results; excluded from the fingerprint.
NON_RESULT_KEYS: tuple[str, ...] = (
    "checkpoint",
    "dataset.data_dir",
    "dataset.workers",
    "dataset.prefetch",
    "generation.store_dir",
    "generation.preview_per_class",
)


class CheckpointError(UserError):
    """The checkpoint folder cannot be used."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoints in the folder belong to another config, model or format version."""


# ---- fingerprint fields ----------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays, tuples and sets become Python values and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_jsonable(v) for v in obj)
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(obj).tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{type(obj).__name__} value {obj!r} cannot be stored as JSON in a checkpoint")


def _canonical(obj: Any) -> Any:
    return json.loads(_dumps(obj))


def _dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def fingerprint_fields(config: Any, extra: Mapping[str, Any] | None = None,
                       ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Flatten ``config`` (a ConfigDict or nested dict) to ``{'a.b': value}`` plus ``extra``.

    Keys in :data:`NON_RESULT_KEYS` and ``ignore`` (a key or a section name) are left out. ``extra``
    holds values derived from the config that also decide results (the resolved class order, the
    dataset's number of classes...); nested dicts in it are flattened the same way and its keys
    must not repeat config keys. Values come back as plain JSON types (tuples become lists).
    """
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    skip = tuple(NON_RESULT_KEYS) + tuple(ignore)
    fields = {k: v for k, v in _flatten(tree).items() if not _matches(k, skip)}
    for key, value in _flatten(extra or {}).items():
        if key in fields:
            raise ValueError(f"fingerprint extra key {key!r} repeats a config key")
        fields[key] = value
    return _canonical(fields)


def fingerprint_of(fields: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the fields."""
    return hashlib.sha256(_dumps(fields).encode("utf-8")).hexdigest()


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


_ABSENT = object()


def diff_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``['train.lr (0.1 -> 0.05)', 'seed (0 -> 1)', ...]`` for every key whose value differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a is _ABSENT or b is _ABSENT or a != b:
            left = "absent" if a is _ABSENT else _short(a)
            right = "absent" if b is _ABSENT else _short(b)
            out.append(f"{key} ({left} -> {right})")
    return out


# ---- save timer ------------------------------------------------------------------------------


class SaveTimer:
    """Decides when to save inside a task: every ``every_minutes`` and/or every ``every_steps``.

    ``due(step)`` returns True once either interval has passed since the last save and then counts
    the next interval from ``step`` (the caller is expected to save). Call ``reset(step)`` after a
    save made for another reason (task end, preemption). 0 disables an interval.
    """

    def __init__(self, every_minutes: float, every_steps: int = 0, *, start_step: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.every_seconds = float(every_minutes) * 60.0
        self.every_steps = int(every_steps)
        self._clock = clock
        self.reset(start_step)

    def reset(self, step: int) -> None:
        self._last_step = int(step)
        self._last_time = self._clock()

    def due(self, step: int) -> bool:
        by_steps = self.every_steps > 0 and step - self._last_step >= self.every_steps
        by_time = self.every_seconds > 0 and self._clock() - self._last_time >= self.every_seconds
        if by_steps or by_time:
            self.reset(step)
            return True
        return False


# ---- pytree helpers --------------------------------------------------------------------------


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_str(k) for k in path), leaf) for path, leaf in leaves]


def _to_host(tree: Any) -> Any:
    """Copy every leaf to a host numpy array (orbax then stores no device sharding)."""
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _tree_digest(tree: Any) -> str:
    """blake2b of every leaf's path, dtype, shape and bytes, in path order (layout-independent)."""
    digest = hashlib.blake2b(digest_size=20)
    for path, leaf in sorted(_flat(tree), key=lambda item: item[0]):
        arr = np.asarray(leaf)
        digest.update(json.dumps([list(path), arr.dtype.str, list(arr.shape)]).encode("utf-8"))
        if arr.size:
            digest.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _json_digest(obj: Any) -> str:
    return hashlib.blake2b(_dumps(obj).encode("utf-8"), digest_size=20).hexdigest()


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _list_files(folder: str) -> list[str]:
    """Every file of the items (orbax's own step metadata files are left out)."""
    out = []
    for item in ITEMS:
        for root, _, names in os.walk(os.path.join(folder, item)):
            out.extend(os.path.relpath(os.path.join(root, name), folder) for name in names)
    return sorted(out)


def _write_file_list(folder: str) -> None:
    """Write ``folder/sdcil_files.json`` (size and digest of every file) atomically."""
    files = {rel: [os.path.getsize(os.path.join(folder, rel)), _file_digest(os.path.join(folder, rel))]
             for rel in _list_files(folder)}
    tmp = os.path.join(folder, "." + FILE_LIST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(files, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, FILE_LIST))


def _check_file_list(folder: str) -> None:
    """Raise ValueError if a file listed in ``sdcil_files.json`` is missing or changed."""
    path = os.path.join(folder, FILE_LIST)
    if not os.path.exists(path):
        return  # killed between the save and the list: the item checksums still apply
    with open(path, encoding="utf-8") as f:
        files = json.load(f)
    for rel, (size, digest) in sorted(files.items()):
        full = os.path.join(folder, rel)
        if not os.path.isfile(full):
            raise ValueError(f"file {rel} is missing")
        if os.path.getsize(full) != size or _file_digest(full) != digest:
            raise ValueError(f"file {rel} does not match its checksum")


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _memory_to_json(memory: Mapping[int, Any]) -> dict[str, Any]:
    arrays = {int(c): np.asarray(v) for c, v in memory.items()}
    dtype = np.result_type(*arrays.values()) if arrays else np.dtype(np.int64)
    return {"dtype": np.dtype(dtype).str,
            "classes": {str(c): arrays[c].tolist() for c in sorted(arrays)}}


def _memory_from_json(obj: Mapping[str, Any]) -> dict[int, np.ndarray]:
    dtype = np.dtype(obj["dtype"])
    classes = obj["classes"]
    return {int(c): np.asarray(classes[c], dtype=dtype) for c in sorted(classes, key=int)}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _stamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _free_path(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate


# ---- checkpointer ----------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    """What :meth:`Checkpointer.restore_latest` returns."""

    step_id: int
    state: Any  # the template's structure with host numpy leaves (Python scalars stay scalars)
    old: Any | None  # None when the checkpoint had no old model
    memory: dict[int, np.ndarray]
    progress: dict[str, Any]
    metrics: Any
    meta: dict[str, Any]


Template = Any  # a pytree of arrays / ShapeDtypeStructs, a callable progress -> pytree, or None


class Checkpointer:
    """Named-item orbax checkpoints of one run in ``directory`` (see the module docstring).

    Typical use::

        ckpt = Checkpointer(workdir + "/checkpoints", keep=3, fingerprint_fields=fields)
        ckpt.restart() if user_asked_restart else ckpt.check_compatible()
        restored = ckpt.restore_latest(template_fn)  # None: start from scratch
        ...
        ckpt.save(counter, state=..., old=..., memory=..., progress=..., metrics=...)
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
                 fingerprint_fields: Mapping[str, Any]):
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = int(keep)
        self.fields = _canonical(dict(fingerprint_fields))
        self.fingerprint = fingerprint_of(self.fields)
        self.last_save_seconds: float | None = None
        self._manager = self._open()

    # -- lifecycle --
    def _open(self) -> ocp.CheckpointManager:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"Cannot create checkpoint folder {self.directory} "
                                  f"({exc.strerror}); choose a writable --workdir.") from None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=False)
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def steps(self) -> list[int]:
        """Ids of the complete checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- save --
    def save(self, step_id: int, *, state: Any, memory: Mapping[int, Any],
             progress: Mapping[str, Any], metrics: Any, old: Any = None,
             force: bool = False) -> str:
        """Write checkpoint ``step_id`` and return its folder once it is complete on disk.

        ``state`` and ``old`` are pytrees of arrays (device arrays are copied to the host first);
        ``old=None`` stores no old model. ``memory`` maps class -> index array. ``progress`` and
        ``metrics`` must be JSON-able (numpy scalars and arrays are converted). ``step_id`` must be
        larger than every existing id; ``force=True`` replaces a checkpoint with the same id.
        Only the newest ``keep`` checkpoints are kept.
        """
        start = time.perf_counter()
        step_id = int(step_id)
        steps = self.steps()
        replace = bool(steps) and force and step_id == steps[-1]
        if steps and step_id <= steps[-1] and not replace:
            raise ValueError(f"checkpoint id {step_id} is not larger than the latest id {steps[-1]} "
                             f"in {self.directory}; use an increasing save counter")
        host_state = _to_host(state)
        host_old = None if old is None else _to_host(old)
        json_items = {"memory": _memory_to_json(memory), "progress": _canonical(progress),
                      "metrics": _canonical(metrics)}
        checksums = {name: _json_digest(value) for name, value in json_items.items()}
        checksums["state"] = _tree_digest(host_state)
        if host_old is not None:
            checksums["old"] = _tree_digest(host_old)
        meta = {"format_version": FORMAT_VERSION, "library_version": __version__,
                "fingerprint": self.fingerprint, "fields": self.fields,
                "has_old": host_old is not None, "saved_at": time.time(), "checksums": checksums}
        args = {name: ocp.args.JsonSave(value) for name, value in json_items.items()}
        args["meta"] = ocp.args.JsonSave(meta)
        args["state"] = ocp.args.StandardSave(host_state)
        if host_old is not None:
            args["old"] = ocp.args.StandardSave(host_old)
        if replace:
            self._manager.delete(step_id)
        saved = self._manager.save(step_id, args=ocp.args.Composite(**args), force=True)
        self._manager.wait_until_finished()
        if not saved:
            raise RuntimeError(f"orbax skipped checkpoint {step_id} in {self.directory}")
        folder = os.path.join(self.directory, str(step_id))
        _write_file_list(folder)
        self.last_save_seconds = time.perf_counter() - start
        return folder

    # -- restore --
    def restore_latest(self, state_template: Template,
                       old_template: Template = None) -> Restored | None:
        """Restore the newest good checkpoint; None when there is none.

        ``state_template`` gives the structure, shapes and dtypes of ``state``: a pytree (arrays,
        ``jax.ShapeDtypeStruct`` or Python scalars), a callable ``progress -> pytree`` (for state
        whose shapes depend on the task being resumed), or None for the stored tree as nested
        dicts and lists. ``old_template`` does the same for the old model (None: nested dicts).
        Unreadable or altered checkpoints are moved aside with a warning and the previous one is
        tried. Raises :class:`CheckpointMismatchError` when a good checkpoint does not fit the
        template.
        """
        bad = []
        for step in reversed(self.steps()):
            try:
                raw = self._read(step)
            except CheckpointMismatchError:
                raise
            except Exception as exc:  # anything unreadable: fall back to the previous checkpoint
                moved = self._quarantine(step)
                log.warning("Checkpoint %d in %s is unreadable (%s); moved it to %s and trying "
                            "the previous one.", step, self.directory, _one_line(exc), moved)
                bad.append(step)
                continue
            restored = self._fit(step, raw, state_template, old_template)
            if bad:
                log.warning("Resuming from checkpoint %d in %s instead of unreadable checkpoint(s) "
                            "%s.", step, self.directory, ", ".join(map(str, bad)))
            return restored
        if bad:
            log.warning("No readable checkpoint left in %s (unreadable ones moved to %s.corrupt); "
                        "starting from scratch.", self.directory, self.directory)
        return None

    def _read(self, step: int) -> dict[str, Any]:
        """Every item of checkpoint ``step``, verified against its file list and meta checksums."""
        _check_file_list(os.path.join(self.directory, str(step)))
        names = (*_JSON_ITEMS, "meta")
        items = self._manager.restore(
            step, args=ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in names}))
        meta = items["meta"]
        if not isinstance(meta, dict) or "checksums" not in meta:
            raise ValueError("meta item is missing or incomplete")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"Checkpoint {step} in {self.directory} has format version "
                f"{meta.get('format_version')} but this library reads version {FORMAT_VERSION}; "
                "use another --workdir or pass --restart to start over.")
        sums = meta["checksums"]
        out = {"meta": meta}
        for name in _JSON_ITEMS:
            if _json_digest(items[name]) != sums[name]:
                raise ValueError(f"item {name!r} does not match its checksum")
            out[name] = items[name]
        trees = {"state": ocp.args.StandardRestore()}
        if meta["has_old"]:
            trees["old"] = ocp.args.StandardRestore()
        arrays = self._manager.restore(step, args=ocp.args.Composite(**trees))
        for name in trees:
            if _tree_digest(arrays[name]) != sums[name]:
                raise ValueError(f"item {name!r} does not match its checksum")
            out[name] = arrays[name]
        out["old"] = out.get("old")
        out["memory"] = _memory_from_json(out["memory"])
        return out

    def _fit(self, step: int, raw: dict[str, Any], state_template: Template,
             old_template: Template) -> Restored:
        progress = raw["progress"]
        where = f"Checkpoint {step} in {self.directory}"
        if callable(state_template):
            state_template = state_template(progress)
        state = raw["state"] if state_template is None else _fit_tree(
            raw["state"], state_template, where, "state")
        old = raw["old"]
        if old is not None and old_template is not None:
            if callable(old_template):
                old_template = old_template(progress)
            old = _fit_tree(old, old_template, where, "old")
        return Restored(step_id=step, state=state, old=old, memory=raw["memory"],
                        progress=progress, metrics=raw["metrics"], meta=raw["meta"])

    def _quarantine(self, step: int) -> str:
        """Move checkpoint ``step`` to ``<directory>.corrupt/<step>-<time>``; return where."""
        source = os.path.join(self.directory, str(step))
        target = _free_path(os.path.join(f"{self.directory}.corrupt", f"{step}-{_stamp()}"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)
        self._manager.reload()
        return target

    # -- compatibility --
    def stored_meta(self) -> dict[str, Any] | None:
        """The meta item of the newest checkpoint whose meta can be read (None if none)."""
        for step in reversed(self.steps()):
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception:  # unreadable: restore_latest reports it; look at an older one
                continue
            if isinstance(meta, dict) and "fields" in meta:
                return meta
        return None

    def check_compatible(self, fingerprint_fields: Mapping[str, Any] | None = None) -> None:
        """Raise :class:`CheckpointMismatchError` if the stored checkpoints have other fields."""
        fields = self.fields if fingerprint_fields is None else _canonical(dict(fingerprint_fields))
        meta = self.stored_meta()
        if meta is None:
            return
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"Checkpoints in {self.directory} have format version {meta.get('format_version')} "
                f"but this library reads version {FORMAT_VERSION}; use another --workdir or pass "
                "--restart to start over.")
        diffs = diff_fields(meta["fields"], fields)
        if diffs:
            shown = ", ".join(diffs[:8]) + (f" and {len(diffs) - 8} more" if len(diffs) > 8 else "")
            raise CheckpointMismatchError(
                f"The checkpoints in {self.directory} were made with a different config ({shown}); "
                "use another --workdir or pass --restart to start over.")

    def restart(self) -> str | None:
        """Move the existing checkpoints to ``<directory>.old-<time>`` and start empty.

        Returns the folder they were moved to (None if there was nothing to move). Nothing is
        deleted.
        """
        self._manager.close()
        moved = None
        if os.path.isdir(self.directory) and os.listdir(self.directory):
            moved = _free_path(f"{self.directory}.old-{_stamp()}")
            os.rename(self.directory, moved)
            log.warning("Moved the previous checkpoints of %s to %s (restart).", self.directory,
                        moved)
        self._manager = self._open()
        return moved


def _fit_tree(raw: Any, template: Any, where: str, item: str) -> Any:
    """Put the restored leaves of ``raw`` into ``template``'s structure, checking shapes and dtypes."""
    saved = dict(_flat(raw))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    paths = [tuple(_key_str(k) for k in path) for path, _ in leaves]
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
                f"{_describe(arr.shape, arr.dtype)}, expected {_describe(shape, dtype)}); use "
                "another --workdir or pass --restart to start over.")
        out.append(arr.item() if isinstance(leaf, (bool, int, float, complex)) else arr)
    return jax.tree_util.tree_unflatten(treedef, out)

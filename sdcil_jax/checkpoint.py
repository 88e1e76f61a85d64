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

Fingerprint fields (:func:`sdcil_jax.fingerprint.config_fields`) are every config key except
those in :data:`sdcil_jax.fingerprint.NON_RESULT_KEYS`, which cannot change any metric, plus derived
values (resolved class order, image shape...). Keys that can change results even slightly are kept
in: for example ``train.eval_batch_size`` changes the shapes XLA compiles for inference, so features
(and hence the herding choice of exemplars) may differ in the last bits. The library version is
stored in ``meta`` for information but is not compared.

Helpers for digests, file lists and fitting restored trees live in
:mod:`sdcil_jax.checkpoint_files`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from sdcil_jax import __version__, distributed, fileio
from sdcil_jax import checkpoint_files as files
from sdcil_jax.checkpoint_files import (
    FILE_LIST,
    ITEMS,
    CheckpointError,
    CheckpointMismatchError,
)
from sdcil_jax.fingerprint import canonical, diff_fields, fingerprint_of

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_JSON_ITEMS = ("memory", "progress", "metrics")

__all__ = ["FILE_LIST", "CheckpointError", "CheckpointMismatchError", "Checkpointer", "Restored", "SaveTimer"]


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
                 fingerprint_fields: Mapping[str, Any],
                 soft_fields: Mapping[str, Any] | None = None):
        if int(keep) < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = os.fspath(directory)
        self.directory = os.path.abspath(directory) if fileio.is_local(directory) else directory
        self.keep = int(keep)
        self.fields = canonical(dict(fingerprint_fields))
        self.fingerprint = fingerprint_of(self.fields)
        # Settings that change results only by float rounding (e.g. the device count): a
        # difference is a warning, and the run continues.
        self.soft_fields = canonical(dict(soft_fields or {}))
        self.last_save_seconds: float | None = None
        self._manager = self._open()

    # -- lifecycle --
    def _open(self) -> ocp.CheckpointManager:
        try:
            fileio.path(self.directory).mkdir(parents=True, exist_ok=True)
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
        host_state = files.to_host(state)
        host_old = None if old is None else files.to_host(old)
        json_items = {"memory": files.memory_to_json(memory), "progress": canonical(progress),
                      "metrics": canonical(metrics)}
        checksums = {name: files.json_digest(value) for name, value in json_items.items()}
        checksums["state"] = files.tree_digest(host_state)
        if host_old is not None:
            checksums["old"] = files.tree_digest(host_old)
        meta = {"format_version": FORMAT_VERSION, "library_version": __version__,
                "fingerprint": self.fingerprint, "fields": self.fields,
                "soft_fields": self.soft_fields,
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
        if distributed.is_main():
            files.write_file_list(folder)
        distributed.barrier(f"sdcil-checkpoint-saved-{step_id}")
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
        for step in reversed(self.steps()):  # the same list in every process (shared folder)
            raw, error = None, None
            try:  # every process reads: orbax's restore is collective
                raw = self._read(step)
            except CheckpointMismatchError:
                raise
            except Exception as exc:  # anything unreadable: fall back to the previous one
                error = exc
            (unreadable,) = distributed.agree_max([error is not None])
            if not unreadable:
                restored = self._fit(step, raw, state_template, old_template)
                if bad:
                    log.warning("Resuming from checkpoint %d in %s instead of unreadable "
                                "checkpoint(s) %s.", step, self.directory, ", ".join(map(str, bad)))
                return restored
            if distributed.is_main():  # one process moves it aside, then everybody looks again
                moved = self._quarantine(step)
                reason = files.one_line(error) if error is not None else "unreadable elsewhere"
                log.warning("Checkpoint %d in %s is unreadable (%s); moved it to %s and trying "
                            "the previous one.", step, self.directory, reason, moved)
            distributed.barrier(f"sdcil-checkpoint-quarantined-{step}")
            self._manager.reload()
            bad.append(step)
        if bad:
            log.warning("No readable checkpoint left in %s (unreadable ones moved to %s.corrupt); "
                        "starting from scratch.", self.directory, self.directory)
        return None

    def _read(self, step: int) -> dict[str, Any]:
        """Every item of checkpoint ``step``, verified against its file list and meta checksums."""
        files.check_file_list(os.path.join(self.directory, str(step)))
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
            if files.json_digest(items[name]) != sums[name]:
                raise ValueError(f"item {name!r} does not match its checksum")
            out[name] = items[name]
        trees = {"state": ocp.args.StandardRestore()}
        if meta["has_old"]:
            trees["old"] = ocp.args.StandardRestore()
        arrays = self._manager.restore(step, args=ocp.args.Composite(**trees))
        for name in trees:
            if files.tree_digest(arrays[name]) != sums[name]:
                raise ValueError(f"item {name!r} does not match its checksum")
            out[name] = arrays[name]
        out["old"] = out.get("old")
        out["memory"] = files.memory_from_json(out["memory"])
        return out

    def _fit(self, step: int, raw: dict[str, Any], state_template: Template,
             old_template: Template) -> Restored:
        progress = raw["progress"]
        where = f"Checkpoint {step} in {self.directory}"
        if callable(state_template):
            state_template = state_template(progress)
        state = raw["state"] if state_template is None else files.fit_tree(
            raw["state"], state_template, where, "state")
        old = raw["old"]
        if old is not None and old_template is not None:
            if callable(old_template):
                old_template = old_template(progress)
            old = files.fit_tree(old, old_template, where, "old")
        return Restored(step_id=step, state=state, old=old, memory=raw["memory"],
                        progress=progress, metrics=raw["metrics"], meta=raw["meta"])

    def _quarantine(self, step: int) -> str:
        """Move checkpoint ``step`` to ``<directory>.corrupt/<step>-<time>``; return where."""
        source = fileio.path(self.directory) / str(step)
        target = files.free_path(os.path.join(f"{self.directory}.corrupt", f"{step}-{files.stamp()}"))
        fileio.path(target).parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
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
        fields = self.fields if fingerprint_fields is None else canonical(dict(fingerprint_fields))
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
        soft = diff_fields(meta.get("soft_fields", {}), self.soft_fields)
        if soft:
            log.warning("Resuming the checkpoints in %s on other hardware (%s): results will "
                        "equal an uninterrupted run's only to float rounding.", self.directory,
                        ", ".join(soft))

    def restart(self) -> str | None:
        """Move the existing checkpoints to ``<directory>.old-<time>`` and start empty.

        Returns the folder they were moved to (None if there was nothing to move). Nothing is
        deleted.
        """
        self._manager.close()
        moved = None
        root = fileio.path(self.directory)
        if distributed.is_main() and root.is_dir() and list(root.iterdir()):
            moved = files.free_path(f"{self.directory}.old-{files.stamp()}")
            root.rename(moved)
            log.warning("Moved the previous checkpoints of %s to %s (restart).", self.directory,
                        moved)
        moved = distributed.broadcast_text(moved)
        self._manager = self._open()
        return moved

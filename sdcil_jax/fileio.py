"""Files of a run, local or on a shared filesystem (``gs://...``): paths and atomic writes.

Every read and write of the run's own files goes through :func:`path` (``etils.epath``, already a
dependency of orbax), so ``--workdir`` and ``generation.store_dir`` may be a bucket that every host
of a multi-host run sees. :func:`atomic_write` leaves a file either with its old content or with its
complete new content: it writes a temporary file beside the target (named with the process index
and pid, so concurrent processes never share one) and renames it over the target; on a local disk
it also fsyncs the file and the folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from etils import epath


def path(p: str | os.PathLike) -> epath.Path:
    """An ``epath.Path`` for a local path or a URL such as ``gs://bucket/run``."""
    return epath.Path(p)


def is_local(p: str | os.PathLike) -> bool:
    return "://" not in os.fspath(p)


def _tag() -> str:
    import jax

    return f"p{jax.process_index()}-{os.getpid()}"


def atomic_write(target: str | os.PathLike, write_fn: Callable) -> None:
    """Write via ``write_fn(binary file object)`` to a temp file beside ``target``, then rename."""
    if not is_local(target):
        target = path(target)
        tmp = target.parent / f".tmp-{_tag()}-{target.name}"
        with tmp.open("wb") as f:
            write_fn(f)
        tmp.replace(target)
        return
    target = os.fspath(target)
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{_tag()}-", suffix=os.path.basename(target),
                               dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable (POSIX); harmless where directories cannot be opened
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(target, lambda f: f.write(text.encode("utf-8")))


def append_line(target: str | os.PathLike, line: str) -> None:
    """Append one line (local files: O_APPEND; object stores, which cannot append: rewrite)."""
    if is_local(target):
        with open(target, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        return
    p = path(target)
    old = p.read_text() if p.exists() else ""
    atomic_write_text(p, old + line + "\n")

"""Replay shard files: image codecs, the self-checking shard file, and a lazy random-access reader.

A shard file holds consecutive images ``[first, first + count)`` of one class::

    b"SDCILSHD"                      8 bytes, magic
    header length                    4 bytes, little-endian uint32
    header                           JSON: version, class_id, first, count, codec, shape, sizes
                                     (bytes of each record), payload_sha256, process (the writer)
    payload                          the encoded images, one record after the other

The header carries the payload's sha256, so a shard file checks itself: a file left by a run killed
before the manifest was merged can be adopted without trusting anything else. Records are read on
demand (:class:`StoreReader`): one seek and one read per image.

Codecs (``generation.store_format``): ``raw`` (the uint8 pixels: no decoding cost, for CIFAR-size
images), ``png`` (lossless), ``jpeg`` (quality 95, no chroma subsampling; lossy, so it is part of the
store's fingerprint). ``auto`` picks raw up to 64 px and jpeg above. Measured on crops of natural
photographs, one shared 2-core AMD EPYC CPU (``benchmarks/store_formats.py``, ``benchmarks/RESULTS.md``):
at 256x256, png is 1.65x smaller than raw and costs about 3 ms to decode, jpeg 5.1x smaller, about
0.9 ms to decode, PSNR 40.9 dB against the raw pixels (39.0 dB on the worst image); at 32x32 jpeg
saves only 1.9x (PSNR 38 dB) and png 1.3x, for 15 to 20 times raw's decoding cost, hence raw there.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdcil_jax import fileio
from sdcil_jax.errors import GenerationError

MAGIC = b"SDCILSHD"
SHARD_VERSION = 1
SUFFIX = ".shard"
CODECS = ("raw", "png", "jpeg")
FORMATS = ("auto", *CODECS)
JPEG_QUALITY = 95
AUTO_RAW_MAX_SIDE = 64  # 'auto': raw up to this side (CIFAR-size), jpeg above (ImageNet-size)
_OPEN_FILES = 8  # file handles a reader keeps open


def resolve_format(name: str, image_shape: Sequence[int]) -> str:
    """The codec that ``generation.store_format=name`` stores images of ``image_shape`` with."""
    if name == "auto":
        return "raw" if max(int(v) for v in image_shape[:2]) <= AUTO_RAW_MAX_SIDE else "jpeg"
    if name not in CODECS:
        raise GenerationError(f"generation.store_format={name!r} is not one of "
                              f"{', '.join(FORMATS)}; pick one of those.")
    return name


def format_field(codec: str) -> str:
    """The codec as the store's fingerprint names it (with its quality when lossy)."""
    return f"jpeg-q{JPEG_QUALITY}" if codec == "jpeg" else codec


def encode(image: np.ndarray, codec: str) -> bytes:
    """One uint8 (H, W, C) image as a record of ``codec``."""
    if codec == "raw":
        return np.ascontiguousarray(image, np.uint8).tobytes()
    from PIL import Image

    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = io.BytesIO()
    if codec == "png":
        pil.save(buf, format="PNG", compress_level=1)  # 6 or 9: 9% smaller, 5x / 13x slower
    else:
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def decode(data: bytes, codec: str, shape: Sequence[int]) -> np.ndarray:
    """A record back to a uint8 ``shape`` (H, W, C) image."""
    if codec == "raw":
        return np.frombuffer(data, np.uint8).reshape(shape).copy()
    from PIL import Image

    with Image.open(io.BytesIO(data)) as pil:
        array = np.asarray(pil.convert("L" if shape[-1] == 1 else "RGB"))
    return array.reshape(shape)


def shard_name(class_id: int, first: int) -> str:
    """File name of the shard of dataset class ``class_id`` whose first image index is ``first``."""
    return f"class_{int(class_id):05d}_{int(first):06d}{SUFFIX}"


def encode_shard(class_id: int, first: int, images: np.ndarray, codec: str,
                 process: int = 0) -> bytes:
    """The bytes of a shard file holding ``images`` (uint8 (n, H, W, C)) as indices
    ``first, first + 1, ...`` of ``class_id``."""
    records = [encode(x, codec) for x in images]
    payload = b"".join(records)
    header = {"version": SHARD_VERSION, "class_id": int(class_id), "first": int(first),
              "count": len(records), "codec": codec, "shape": [int(v) for v in images.shape[1:]],
              "sizes": [len(r) for r in records], "process": int(process),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + payload


def parse_header(f) -> tuple[dict[str, Any], int]:
    """``(header, payload offset)`` of an open shard file; raises ValueError when malformed."""
    start = f.read(len(MAGIC) + 4)
    if len(start) != len(MAGIC) + 4 or start[:len(MAGIC)] != MAGIC:
        raise ValueError("not a shard file")
    (length,) = struct.unpack("<I", start[len(MAGIC):])
    if length > 1 << 26:
        raise ValueError("header too long")
    header = json.loads(f.read(length).decode("utf-8"))
    if header.get("version") != SHARD_VERSION or header["count"] != len(header["sizes"]) \
            or header["codec"] not in CODECS:
        raise ValueError("unsupported shard header")
    return header, len(start) + length


def check_shard_file(path) -> tuple[dict[str, Any], str] | None:
    """``(header, sha256 of the whole file)`` when the file is a complete shard whose payload
    matches its own checksum, else None (missing, truncated, corrupt)."""
    whole = hashlib.sha256()
    try:
        with fileio.path(path).open("rb") as f:
            header, offset = parse_header(f)
            f.seek(0)
            whole.update(f.read(offset))
            payload = hashlib.sha256()
            size = 0
            for block in iter(lambda: f.read(1 << 20), b""):
                payload.update(block)
                whole.update(block)
                size += len(block)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, struct.error):
        return None
    if size != sum(header["sizes"]) or payload.hexdigest() != header["payload_sha256"]:
        return None
    return header, whole.hexdigest()


class _OpenShard:
    """An open shard file: its header, record offsets and a handle (reads under a lock)."""

    def __init__(self, path: str):
        self.lock = threading.Lock()
        self.local = fileio.is_local(path)
        self.file = open(path, "rb") if self.local else fileio.path(path).open("rb")  # noqa: SIM115
        try:
            self.header, payload = parse_header(self.file)
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            self.file.close()
            raise GenerationError(f"Replay shard {path} is corrupt ({exc}); rerun --mode generate "
                                  "to regenerate it.") from None
        self.offsets = payload + np.concatenate([[0], np.cumsum(self.header["sizes"])]).astype(int)

    def read(self, j: int) -> bytes:
        start, stop = int(self.offsets[j]), int(self.offsets[j + 1])
        if self.local:  # pread: no shared file position, so threads need no lock
            return os.pread(self.file.fileno(), stop - start, start)
        with self.lock:
            self.file.seek(start)
            return self.file.read(stop - start)

class StoreReader:
    """Random access to images ``[start, start + count)`` of each class in ``class_ids`` of a replay
    store, decoded on demand: ``reader[k]`` is image ``start + k % count`` of class
    ``class_ids[k // count]``, uint8 (H, W, C).

    Holds file names and offsets only (a few KB per thousand shards), keeps at most a few files open
    and no decoded image, so a process's memory does not grow with the pool. Picklable (grain
    worker processes reopen the files).
    """

    def __init__(self, directory: str, class_ids: Sequence[int], start: int, count: int,
                 shards_by_class: dict[int, list[tuple[int, int, str]]]):
        self.directory, self.start, self.count = str(directory), int(start), int(count)
        self.class_ids = [int(c) for c in class_ids]
        # per class: sorted shard firsts, their counts and file names
        self._firsts = {c: np.asarray([s[0] for s in shards_by_class[c]], np.int64)
                        for c in self.class_ids}
        self._files = {c: [(s[1], s[2]) for s in shards_by_class[c]] for c in self.class_ids}
        self._open: collections.OrderedDict[str, _OpenShard] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open, self._lock = collections.OrderedDict(), threading.Lock()

    def __len__(self) -> int:
        return len(self.class_ids) * self.count

    def locate(self, k: int) -> tuple[int, int]:
        """``(class id, image index)`` of element ``k``."""
        if not 0 <= k < len(self):
            raise IndexError(f"replay reader index {k} out of range [0, {len(self)})")
        c = self.class_ids[k // self.count]
        return c, self.start + k % self.count

    def _shard(self, name: str) -> _OpenShard:
        with self._lock:
            shard = self._open.get(name)
            if shard is not None:
                self._open.move_to_end(name)
                return shard
        opened = _OpenShard(os.fspath(fileio.path(self.directory) / name))
        with self._lock:
            self._open[name] = opened
            while len(self._open) > _OPEN_FILES:
                # not closed here: a thread may still be reading it; the file closes when the last
                # reference goes (closing it now could hand its descriptor to another file)
                self._open.popitem(last=False)
        return opened

    def __getitem__(self, k: int) -> np.ndarray:
        c, i = self.locate(int(k))
        pos = int(np.searchsorted(self._firsts[c], i, side="right")) - 1
        count, name = self._files[c][pos]
        shard = self._shard(name)
        j = i - int(self._firsts[c][pos])
        if not 0 <= j < count:
            raise GenerationError(f"Replay store {self.directory} has no image {i} of class {c}; "
                                  "rerun --mode generate to complete it.")
        return decode(shard.read(j), shard.header["codec"], shard.header["shape"])

    def close(self) -> None:
        """Forget the open files (they close once no read uses them)."""
        with self._lock:
            self._open.clear()

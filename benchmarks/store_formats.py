"""Bytes, encode and decode cost per image of the replay store's codecs (raw, png, jpeg).

Everything goes through the project's own store code, as training does: one shard of the test images
is encoded with ``shards.encode_shard`` (what ``ReplayStore.write_shard`` calls before its atomic
write), written with ``ReplayStore.write_shard``, and read back image by image through
``ReplayStore.reader`` (a :class:`~sdcil_jax.generation.shards.StoreReader`: one ``pread`` and one
decode per image, what the host pipeline's ``PoolSource`` does for a synthetic image).

Images: natural photographs, not noise (noise does not compress and would make png and jpeg look
worse than they are on SD's images): the two photographs scikit-learn ships offline
(``sklearn.datasets.load_sample_images()``: china.jpg and flower.jpg, 640x427), each cut into 8
square crops (sides 427, 384, 320 and 288 px, at the left and the right edge), every crop resized to
256x256 with Lanczos (as SD's 512 px images are resized to the stored size) and then to 32x32 (box
filter): 16 images per size. The photographs are JPEGs themselves; resizing moves their 8x8 blocks
off the grid, so the re-encoding does not profit from the original compression.

    python benchmarks/store_formats.py [--repeats 7] [--sizes 32,256]

Per size and codec it prints: bytes per image (the shard file's size / images, header included),
its ratio to raw, encode and decode milliseconds per image (median over ``--repeats`` passes over the
16 images, after one warm-up pass; the file is in the page cache, so decode is the CPU cost), and
the PSNR of the decoded images against the raw pixels (inf: lossless).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from sdcil_jax.generation import shards as shard_lib  # noqa: E402
from sdcil_jax.generation.store import ReplayStore  # noqa: E402

SIDES = (427, 384, 320, 288)


def sample_images(size: int) -> np.ndarray:
    """uint8 (16, size, size, 3): crops of scikit-learn's two sample photographs (module docstring)."""
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        h, w = photo.shape[:2]
        for side in SIDES:
            for left in (0, w - side):
                top = (h - side) // 2
                crop = Image.fromarray(photo[top:top + side, left:left + side])
                big = crop.resize((256, 256), Image.LANCZOS)
                out.append(np.asarray(big if size == 256 else big.resize((size, size), Image.BOX)))
    return np.stack(out)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _median_ms(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / n * 1e3


def measure(images: np.ndarray, codec: str, folder: str, repeats: int) -> dict[str, float]:
    """One shard of ``images`` stored with ``codec`` in a new store under ``folder``."""
    n = len(images)
    store = ReplayStore(os.path.join(folder, codec)).open_or_create(
        {"benchmark": "store_formats", "shape": list(images.shape[1:])}, codec)
    encode_ms = _median_ms(lambda: shard_lib.encode_shard(0, 0, images, codec), n, repeats)
    name, entry = store.write_shard(0, 0, images)
    size = os.path.getsize(store.path(name))
    reader = store.reader([0], 0, n)
    decoded = np.stack([reader[k] for k in range(n)])
    decode_ms = _median_ms(lambda: [reader[k] for k in range(n)], n, repeats)
    return {"bytes": size / n, "encode_ms": encode_ms, "decode_ms": decode_ms,
            "psnr": min(psnr(decoded[k], images[k]) for k in range(n)),
            "psnr_all": psnr(decoded, images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", default="32,256")
    args = parser.parse_args()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; Python {platform.python_version()}, "
          f"numpy {np.__version__}, Pillow {PIL.__version__}; jpeg quality "
          f"{shard_lib.JPEG_QUALITY}, 4:4:4; png compress_level 1")
    print("| size | codec | bytes/image | raw / this | encode ms/image | decode ms/image "
          "| PSNR dB (all / worst image) |")
    print("|---|---|--:|--:|--:|--:|--:|")
    with tempfile.TemporaryDirectory(prefix="sdcil_store_formats_") as folder:
        for size in (int(s) for s in args.sizes.split(",")):
            images = sample_images(size)
            rows = {c: measure(images, c, os.path.join(folder, str(size)), args.repeats)
                    for c in shard_lib.CODECS}
            auto = shard_lib.resolve_format("auto", images.shape[1:])
            for codec, r in rows.items():
                quality = ("lossless" if r["psnr_all"] == float("inf")
                           else f"{r['psnr_all']:.1f} / {r['psnr']:.1f}")
                print(f"| {size}x{size} | {codec}{' (auto)' if codec == auto else ''} "
                      f"| {r['bytes']:.0f} | {rows['raw']['bytes'] / r['bytes']:.2f}x "
                      f"| {r['encode_ms']:.3f} | {r['decode_ms']:.3f} | {quality} |")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

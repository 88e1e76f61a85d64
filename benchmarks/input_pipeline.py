"""Host images/s of the two input pipelines, and how many host cores a TPU v5e-1 would need.

(a) device pipeline (CIFAR-size): uint8 32x32x3 batches gathered from an on-device pool, augmented
    with ``sdcil_jax.augment.augment`` (crop padding 4, flip, brightness 63/255) and normalised, in
    one jitted function, here on the CPU backend (on a TPU this work runs on the chip, not the host).
(b) host pipeline (ImageNet-size): ``sdcil_jax.data.host_pipeline.HostPipeline`` (grain) decoding
    synthetic JPEGs (about 400x350, varying sizes, quality 90) from an in-memory list source, train
    transform (random-resized crop 224, flip, brightness) and test transform (resize 256, centre crop
    224), with ``workers`` = 0 (in the consuming thread), and 1, 2, ... grain worker processes.

    python benchmarks/input_pipeline.py [--num-images 512] [--workers 0,1,2] [--batch-size 64]
                                        [--seconds 8] [--assumed-rate 6800] [--no-device]

"images per CPU-second" divides the images served by the CPU time of this process (all threads) plus
that of its child processes (grain's workers; measured with psutil, which the script needs, while they
run, after a warm-up that lets every worker start): the per-core cost of the host transforms, which
contention from other jobs on a shared machine changes much less than the wall-clock rate.

The script also runs against the thread-pool pipeline that grain replaced (issue 9): put a checkout
of that version first on PYTHONPATH; ``workers`` are then threads and the rows say so.

The "cores needed" figure divides an ASSUMED ResNet-18 training rate on one TPU v5e chip
(``--assumed-rate``, images/s) by the measured images/s per host core. See ``ASSUMPTION`` for where
the default comes from; pass your own measured step rate x batch size to get your own answer.
"""

from __future__ import annotations

import argparse
import inspect
import io
import os
import platform
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/ is the script folder)
from PIL import Image  # noqa: E402

from sdcil_jax import augment as aug_lib  # noqa: E402
from sdcil_jax.data import host_pipeline as hp_lib  # noqa: E402
from sdcil_jax.data.host_pipeline import HostPipeline  # noqa: E402

try:
    from sdcil_jax.data.transforms import train_transform  # noqa: E402
except ImportError:  # the thread-pool version, before issue 9
    from sdcil_jax.data.transforms import train_transform  # noqa: E402

GRAIN = hasattr(hp_lib, "grain")  # False: the thread-pool pipeline grain replaced

DEFAULT_ASSUMED_RATE = 6800.0
ASSUMPTION = """\
Assumed ResNet-18 training rate on one TPU v5e chip: {rate:.0f} images/s ({source}).
  Default derivation (an ESTIMATE, not a measurement on v5e):
  * Flax ImageNet example (github.com/google/flax, examples/imagenet/README.md and configs/tpu.py):
    ResNet-50, TPU v3-8 (4 chips), 125100 steps of batch 1024 in 4.4 h wall time (eval included)
    = 8087 images/s = 2022 images/s per v3 chip.
  * Peak bf16 per chip (Cloud TPU docs, tpu/docs/v3 and tpu/docs/v5e): v3 123 TFLOPS, v5e 197 TFLOPS
    -> x1.60 -> ~3240 ResNet-50 images/s on a v5e chip.
  * Forward FLOPs at 224x224 (He et al. 2016, Table 1): ResNet-18 1.8e9, ResNet-50 3.8e9 -> x2.1
    -> ~6800 ResNet-18 images/s. ResNet-18's 64-channel layers fill the 128x128 MXUs less well and
    PODNet's batch of 64 is small for a TPU, so the real rate is likely lower (fewer cores needed)."""

MEAN = jnp.array([0.5071, 0.4865, 0.4409], jnp.float32)
STD = jnp.array([0.2673, 0.2564, 0.2762], jnp.float32)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its live child processes."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    return total


class Clock:
    """Wall time and CPU time (this process and its children, see :func:`cpu_seconds`)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), cpu_seconds()

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def rates(self, images: int) -> tuple[float, float]:
        """(images per wall second, images per CPU second of this process and its children)."""
        cpu = max(cpu_seconds() - self.cpu0, 1e-9)
        return images / self.wall(), images / cpu


def make_jpegs(num: int, seed: int = 0) -> list[dict]:
    """Smooth random colour fields plus noise, WxH uniform in [300, 500] x [250, 450], quality 90."""
    rng = np.random.default_rng(seed)
    source = []
    for i in range(num):
        w, h = int(rng.integers(300, 501)), int(rng.integers(250, 451))
        coarse = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        noisy = np.asarray(smooth, np.float32) + rng.normal(0.0, 12.0, (h, w, 1))
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        source.append({"image": buf.getvalue(), "label": i % 1000})
    return source


def bench_device(batch: int, seconds: float, pool_size: int = 4096) -> tuple[float, float]:
    """Images/s of the jitted on-device augmentation (CPU backend here)."""
    pool = jax.device_put(np.random.default_rng(0).integers(0, 256, (pool_size, 32, 32, 3), dtype=np.uint8))

    @jax.jit
    def step(pool, key):
        k_idx, k_aug = jax.random.split(key)
        x = pool[jax.random.randint(k_idx, (batch,), 0, pool_size)]
        images = aug_lib.augment(
            x.astype(jnp.float32) / 255.0, k_aug, crop_padding=4, flip=True, brightness=63.0 / 255.0
        )
        return (images - MEAN) / STD

    key = jax.random.key(0)
    for i in range(3):  # compile + warm-up
        step(pool, jax.random.fold_in(key, i)).block_until_ready()
    done, clock = 0, Clock()
    while clock.wall() < seconds or done < 10 * batch:
        step(pool, jax.random.fold_in(key, done)).block_until_ready()
        done += batch
    return clock.rates(done)


def bench_transform_only(source: list[dict], seconds: float) -> tuple[float, float]:
    """Images/s of the train transform called in a plain loop (one thread, no pipeline)."""
    done, clock = 0, Clock()
    while clock.wall() < seconds:
        example = source[done % len(source)]
        train_transform(example["image"], np.random.default_rng(done))
        done += 1
    return clock.rates(done)


def bench_host(
    source: list[dict], *, workers: int, batch: int, seconds: float, train: bool, threads: bool = False
) -> tuple[float, float]:
    """(images per wall second, images per CPU-second) of ``HostPipeline``, after a warm-up of two
    batches per worker (so that every worker process has started and served). ``threads``: grain
    threads in this process (what the grain pipeline uses for short iterations) instead of processes."""
    kwargs = {}
    if "min_images_per_process" in inspect.signature(HostPipeline).parameters:
        # 0: always worker processes when workers > 0; huge: always threads
        kwargs["min_images_per_process"] = 1 << 62 if threads else 0
    pipe = HostPipeline(
        source,
        batch_size=batch,
        train=train,
        image_size=224,
        test_resize=256,
        workers=workers,
        prefetch=2,
        seed=0,
        process_index=0,
        process_count=1,
        **kwargs,
    )
    with pipe:
        iterator = pipe.iterate(num_epochs=10**6)  # finite, so that `threads` applies
        for _ in range(2 * max(1, workers)):
            next(iterator)
        done, clock = 0, Clock()
        while clock.wall() < seconds or done < 4 * batch:
            done += next(iterator).images.shape[0]
        rates = clock.rates(done)
        iterator.close()
    return rates


def worker_label(workers: int) -> str:
    if workers == 0:
        return "workers=0 (consumer thread)"
    if GRAIN:
        return f"workers={workers} (processes)"
    return f"workers={workers} (threads)"


def main() -> None:
    cpus = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument(
        "--workers",
        default=",".join(str(w) for w in sorted({0, 1, 2, cpus})),
        help="comma-separated worker counts (default 0,1,2,os.cpu_count())",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="host pipeline batch")
    parser.add_argument("--device-batch-size", type=int, default=128, help="device pipeline batch")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    parser.add_argument(
        "--assumed-rate",
        type=float,
        default=None,
        help="ResNet-18 training images/s of one TPU v5e chip (ASSUMPTION; default "
        f"{DEFAULT_ASSUMED_RATE:.0f}, an estimate derived in the docstring)",
    )
    parser.add_argument("--no-device", action="store_true", help="skip the device pipeline row")
    args = parser.parse_args()
    workers = sorted({int(w) for w in args.workers.split(",")})
    rate_source = "given on the command line" if args.assumed_rate else "default estimate"
    assumed = args.assumed_rate or DEFAULT_ASSUMED_RATE

    impl = "grain" if GRAIN else "thread pool (before issue 9)"
    print(
        f"Machine: {cpus} cores ({cpu_model()}), python {platform.python_version()}, "
        f"jax {jax.__version__} ({jax.default_backend()}), PIL {Image.__version__}; "
        f"host pipeline: {impl} ({hp_lib.__file__})"
    )
    print("Load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    t0 = time.perf_counter()
    source = make_jpegs(args.num_images)
    sizes = [len(s["image"]) for s in source]
    print(
        f"{args.num_images} synthetic JPEGs in {time.perf_counter() - t0:.1f} s, mean "
        f"{np.mean(sizes) / 1024:.0f} KiB (ImageNet train averages ~110 KiB)\n"
    )

    rows = []
    if not args.no_device:
        rows.append(
            (
                "device: jitted augment+normalise, 32x32 (XLA CPU)",
                args.device_batch_size,
                bench_device(args.device_batch_size, args.seconds),
            )
        )
    rows.append(
        ("host: train transform, plain loop (1 thread)", 1, bench_transform_only(source, args.seconds))
    )
    host = {}
    for w in workers:
        host[w] = bench_host(source, workers=w, batch=args.batch_size, seconds=args.seconds, train=True)
        rows.append((f"host: HostPipeline train 224, {worker_label(w)}", args.batch_size, host[w]))
    w_max = max(workers)
    if GRAIN and w_max > 0:
        rows.append(
            (
                f"host: HostPipeline train 224, workers={w_max} (threads, short iterations)",
                args.batch_size,
                bench_host(source, workers=w_max, batch=args.batch_size, seconds=args.seconds,
                           train=True, threads=True),
            )
        )
    rows.append(
        (
            f"host: HostPipeline test 256->224, {worker_label(w_max)}",
            args.batch_size,
            bench_host(source, workers=w_max, batch=args.batch_size, seconds=args.seconds, train=False),
        )
    )

    print(f"| {'pipeline':<60} | batch | images/s (wall) | images per CPU-second |")
    print(f"|{'-' * 62}|------:|----------------:|----------------------:|")
    for name, batch, (wall, cpu) in rows:
        print(f"| {name:<60} | {batch:>5} | {wall:>15.0f} | {cpu:>21.0f} |")

    best_w = max(host, key=lambda w: host[w][0])
    per_cpu_second = max(cpu for _, cpu in host.values())
    print()
    print(ASSUMPTION.format(rate=assumed, source=rate_source))
    print()
    print("Host cores a TPU v5e-1 needs to feed ResNet-18 with the host pipeline (train transform):")
    print(
        f"  per CPU-second (contention-free cost): {assumed:.0f} / {per_cpu_second:.0f} "
        f"= {assumed / per_cpu_second:.1f} cores"
    )
    one = host.get(1, host[min(host)])[0]
    print(f"  at the 1-worker wall rate            : {assumed:.0f} / {one:.0f} = {assumed / one:.1f} cores")
    print(f"  best wall rate here: {host[best_w][0]:.0f} images/s with workers={best_w} on {cpus} cores")
    print("  (a single-chip v5e VM, ct5lp-hightpu-1t, has 24 vCPUs per the Cloud TPU v5e docs)")
    print(
        "Load average after: {:.2f} {:.2f} {:.2f} (other processes may share these cores)".format(
            *os.getloadavg()
        )
    )
    if not args.no_device:
        print(
            f"Device pipeline (CIFAR-size) on this CPU: {rows[0][2][0]:.0f} images/s; on a TPU it "
            "runs on the chip inside the training step and costs the host nothing."
        )


if __name__ == "__main__":
    main()

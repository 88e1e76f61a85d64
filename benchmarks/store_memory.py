"""Peak resident memory of a host-pipeline training run vs the size of its replay pool.

Each training run is a fresh process (so ``ru_maxrss`` is that run's own peak): the digits quickstart
through the host (grain) pipeline (``dataset.pipeline=host``, ``dataset.workers=0``: every image is
decoded in the measured process, ``dataset.prefetch=2``), synthetic images stored at 256x256
(``dataset.test_resize=256``, the ImageNet configs' size; crops of 32x32 feed the network), method
``replay`` with the synthetic images in the classification loss, 2 tasks of 2 classes, 1 epoch each
(96 images per class held out, so 6 and 7 steps of 16 real + 16 synthetic images). The replay pool of
task 1 is 2 old classes x ``synthetic.per_class`` images.

The store is written directly with the store API (``ReplayStore.write_shard``, the codec that
``generation.store_format=auto`` picks at 256 px: jpeg), not by running diffusion: its images are
crops of scikit-learn's sample photographs (``store_formats.sample_images``), repeated. Its
fingerprint is the one the training config expects, so ``--mode train`` reads it as a generated one.

``lazy`` is what the project does for the host pipeline (``StoreReader``: images decoded on demand);
``in-memory`` replaces ``data.pool.task_synthetic`` in the child with the old behaviour (the whole
pool loaded into one uint8 array held by the ``PoolSource``), to show what the lazy reads save.

    python benchmarks/store_memory.py [--per-class 256,512,1024,2048] [--modes lazy,in-memory]

Prints one line per run: pool images, the pool's size as raw uint8, and the peak RSS in MB
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). ``tests/test_store_memory.py`` runs the same
children through :func:`make_store` and :func:`run_child`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIDE = 256
OLD_CLASSES = 2  # classes 0 and 1 are old in task 1


def training_config(store_dir: str, per_class: int, stored_per_class: int):
    """The measured run's config: ``per_class`` synthetic images per old class used out of the
    ``stored_per_class`` images per class in ``store_dir``."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    from quickstart import get_config

    c = get_config()
    c.dataset.pipeline = "host"
    c.dataset.image_size = 32
    c.dataset.test_resize = SIDE
    c.dataset.workers = 0
    c.dataset.prefetch = 2
    c.dataset.holdout_per_class = 96  # ~47 training images per class left: few steps
    c.scenario.max_tasks = 2
    c.method.name = "replay"
    c.synthetic.use_in = "classification"
    c.synthetic.per_class = int(per_class)
    c.synthetic.batch_size = 16
    c.train.batch_size = 16
    c.train.eval_batch_size = 64
    c.train.epochs = 1
    c.train.crop_padding = 0
    c.generation.per_class = int(stored_per_class)
    c.generation.store_dir = store_dir
    c.generation.store_format = "auto"
    c.generation.preview_per_class = 0
    return c


def make_store(store_dir: str, stored_per_class: int) -> dict:
    """Write ``stored_per_class`` images of every class the run needs into a new store (in this
    process); returns a summary."""
    sys.path.insert(0, HERE)
    import numpy as np
    from store_formats import sample_images

    from sdcil_jax.generation import ReplayStore, fingerprint_fields
    from sdcil_jax.generation.shards import resolve_format
    from sdcil_jax.runner import prepare_experiment

    config = training_config(store_dir, stored_per_class, stored_per_class)
    with tempfile.TemporaryDirectory(prefix="sdcil_store_memory_") as workdir:
        exp = prepare_experiment(config, workdir)
    shape = exp.dataset.image_shape
    fields = fingerprint_fields(config.generation, seed=config.seed,
                                class_names=exp.dataset.class_names, image_shape=shape)
    codec = resolve_format(config.generation.store_format, shape)
    store = ReplayStore(store_dir).open_or_create(fields, codec)
    photos = sample_images(shape[0])
    per_shard = int(config.generation.images_per_shard)
    for c in exp.generated_classes():
        for first in range(0, stored_per_class, per_shard):
            count = min(per_shard, stored_per_class - first)
            images = photos[np.arange(first, first + count) % len(photos)]
            store.write_shard(c, first, images, commit=False)
    store.merge()
    size = sum(e["bytes"] for _, e in store.shards())
    return {"classes": exp.generated_classes(), "codec": codec, "bytes": size}


def child(store_dir: str, per_class: int, stored_per_class: int, in_memory: bool) -> dict:
    """One training run in this process; returns its peak RSS."""
    import resource

    from sdcil_jax import runner
    from sdcil_jax.data import pool as pool_lib

    if in_memory:  # the old behaviour: the whole pool in one host array
        def task_synthetic(dataset, store, class_ids, start, count, relabel):
            return pool_lib.synthetic_images(store, class_ids, start, count, relabel,
                                             dataset.image_shape, lazy=False)
        pool_lib.task_synthetic = task_synthetic
    config = training_config(store_dir, per_class, stored_per_class)
    with tempfile.TemporaryDirectory(prefix="sdcil_store_memory_") as workdir:
        results = runner.run(config, workdir, mode="train", progress=False)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"per_class": per_class, "pool_images": OLD_CLASSES * per_class,
            "pool_raw_mb": OLD_CLASSES * per_class * SIDE * SIDE * 3 / 1e6,
            "in_memory": in_memory, "peak_rss_mb": peak_kb / 1024,
            "tasks": len(results["per_task"])}


def _python(args: list[str], env: dict | None, timeout: float) -> dict:
    """This script with ``args`` in a fresh Python process (this checkout first on the path);
    returns the JSON of its last output line."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_store_process(store_dir: str, stored_per_class: int, env: dict | None = None,
                       timeout: float = 600) -> dict:
    """:func:`make_store` in a fresh Python process; returns its summary."""
    return _python(["--make-store", "--store", store_dir, "--stored", str(stored_per_class)], env,
                   timeout)


def run_child(store_dir: str, per_class: int, stored_per_class: int, in_memory: bool = False,
              env: dict | None = None, timeout: float = 600) -> dict:
    """:func:`child` in a fresh Python process; returns its result."""
    return _python(["--child", "--store", store_dir, "--per-class", str(per_class), "--stored",
                    str(stored_per_class), *(["--in-memory"] if in_memory else [])], env, timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", default="256,512,1024,2048")
    parser.add_argument("--modes", default="lazy,in-memory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--make-store", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--stored", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.child:
        out = child(args.store, int(args.per_class), args.stored, args.in_memory)
        print(json.dumps(out), flush=True)
        return
    if args.make_store:
        print(json.dumps(make_store(args.store, args.stored)), flush=True)
        return
    sizes = [int(s) for s in args.per_class.split(",")]
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory(prefix="sdcil_store_memory_") as folder:
        store_dir = os.path.join(folder, "store")
        env = dict(os.environ, TFDS_DATA_DIR=os.path.join(folder, "tfds"))
        info = make_store_process(store_dir, max(sizes), env)
        print(f"store: classes {info['classes']}, {max(sizes)} images each at {SIDE}x{SIDE}, codec "
              f"{info['codec']}, {info['bytes'] / 1e6:.1f} MB on disk")
        print("| pool images | pool as raw uint8 (MB) | mode | peak RSS (MB) |")
        print("|--:|--:|---|--:|")
        for mode in modes:
            for n in sizes:
                r = run_child(store_dir, n, max(sizes), mode == "in-memory", env)
                print(f"| {r['pool_images']} | {r['pool_raw_mb']:.0f} | {mode} "
                      f"| {r['peak_rss_mb']:.0f} |", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""Time the herding stage (features of every training image of the new classes + exemplar choice).

    python benchmarks/herding.py                       # 50 classes x 500 images, ResNet-32, 32x32
    python benchmarks/herding.py --classes 10 --per-class 100 --rounds 5

Two ways, on the same network, images and selections, interleaved over ``--rounds``:

  per class   what the task loop did before issue 12: for each class, one predict pass over that
              class's images (its own padded last batch), then ``herding_select`` in numpy
  batched     what it does now (``TaskRunner._update_memory``): one predict pass over every image
              of the new classes, then ``herding_select_classes``: all classes in one jitted program

The script checks that both give the same exemplars and prints the median seconds of each, split
into feature extraction and selection.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--memory", type=int, default=20, help="exemplars per class")
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from sdcil_jax import parallel
    from sdcil_jax import train as train_lib
    from sdcil_jax.config import base_config
    from sdcil_jax.data import memory as memory_lib
    from sdcil_jax.data.pool import TaskPool
    from sdcil_jax.data.sources import ArraySource
    from sdcil_jax.data.stream import eval_batches
    from sdcil_jax.loop import predict
    from sdcil_jax.methods import TaskInfo, get_method
    from sdcil_jax.models import build_backbone

    cfg = base_config()
    cfg.model.name = args.model
    cfg.method.name = "podnet"
    cfg.train.eval_batch_size = args.eval_batch_size
    backbone = build_backbone(cfg.model)
    method = get_method(cfg, TaskInfo(task=0, num_old=0, num_new=args.classes))
    variables = jax.jit(lambda k: backbone.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
        jax.random.PRNGKey(0))
    feat_dim = 64 if args.model == "resnet32" else 512
    params = {"backbone": variables["params"],
              "head": method.init_head(jax.random.PRNGKey(1), feat_dim, args.classes)}
    stats = variables["batch_stats"]
    mesh = parallel.make_mesh()
    eval_fn = jax.jit(train_lib.make_eval_fn(backbone, method.head_apply,
                                             jnp.full(3, 0.5), jnp.full(3, 0.25)))
    rng = np.random.default_rng(0)
    n = args.classes * args.per_class
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(args.classes), args.per_class).astype(np.int32)
    rng.shuffle(labels)
    pool = TaskPool(labels, n, n, ArraySource(images, labels), images)
    rows = [np.flatnonzero(labels == c) for c in range(args.classes)]

    def features(indices):
        batches = eval_batches(cfg, pool, indices, mesh)
        return predict(eval_fn, params, stats, batches, feat_dim)[1]

    def per_class():
        t0 = time.perf_counter()
        feats = [features(r) for r in rows]
        t1 = time.perf_counter()
        picks = [memory_lib.herding_select(f, args.memory) for f in feats]
        return picks, t1 - t0, time.perf_counter() - t1

    def batched():
        t0 = time.perf_counter()
        feats = np.split(features(np.concatenate(rows)), np.cumsum([len(r) for r in rows])[:-1])
        t1 = time.perf_counter()
        padded = np.zeros((len(rows), max(len(f) for f in feats), feat_dim), np.float32)
        for i, f in enumerate(feats):
            padded[i, :len(f)] = f
        picks = memory_lib.herding_select_classes(padded, [len(f) for f in feats], args.memory)
        return [p[p >= 0] for p in picks], t1 - t0, time.perf_counter() - t1

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} on "
          f"{jax.devices()[0].platform} x{jax.device_count()}; {args.classes} classes x "
          f"{args.per_class} images, {args.model}, {args.memory} exemplars per class")
    a, b = per_class()[0], batched()[0]  # warm-up (compilation) and the equivalence check
    same = all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    print(f"identical selections: {same}")
    times = {"per class": [], "batched": []}
    for _ in range(args.rounds):
        times["per class"].append(per_class()[1:])
        times["batched"].append(batched()[1:])
    print("| way | features s | selection s | total s |")
    print("|---|--:|--:|--:|")
    for name, runs in times.items():
        f = statistics.median(r[0] for r in runs)
        s = statistics.median(r[1] for r in runs)
        tot = statistics.median(r[0] + r[1] for r in runs)
        print(f"| {name} | {f:.2f} | {s:.3f} | {tot:.2f} |")
    print(f"(load average after: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()

"""Where a task's time goes on the CIFAR100 protocol shape (real ResNet-32, batch 128, 32x32).

    python benchmarks/task_time.py                       # 2 tasks, ~300 training steps in task 1
    python benchmarks/task_time.py --examples 20000 --epochs 4 --tasks 2

Runs ``configs/cifar100.py`` (B50, the real network, loss and batch size) on
``tfds.testing.mock_data`` (random 32x32 images, offline), with the epochs shortened, and prints each
task's time breakdown from ``results.json`` (imprinting, training, finetuning, herding, evaluation,
checkpoints) with the share of the training stage the host spent outside the compiled step (the
issue-12 goal: under 5%). Set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N CPU
devices; by default one device uses every core.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000, help="mock training examples")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()

    import tensorflow_datasets as tfds

    import sdcil_jax
    from sdcil_jax.config import load_config_file

    here = os.path.dirname(os.path.abspath(__file__))
    config = load_config_file(os.path.join(here, "..", "configs", "cifar100.py") + ":synthetic=none")
    config.train.epochs = args.epochs
    config.method.finetune_epochs = 1
    config.scenario.max_tasks = args.tasks
    workdir = args.workdir or tempfile.mkdtemp(prefix="task_time_")
    config.dataset.data_dir = os.path.join(workdir, "tfds")
    with tfds.testing.mock_data(num_examples=args.examples):
        results = sdcil_jax.run(config, os.path.join(workdir, "run"), progress=False)
    print(json.dumps([r["time_s"] for r in results["per_task"]], indent=1))
    for t, r in enumerate(results["per_task"]):
        times = r["time_s"]
        print(f"task {t}: training {times.get('train', float('nan')):.1f} s, outside the compiled "
              f"step {100 * times.get('train_outside_share', float('nan')):.2f}%")


if __name__ == "__main__":
    main()

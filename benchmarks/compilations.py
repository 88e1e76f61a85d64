"""XLA compilations and compile seconds of whole runs: the quickstart and CIFAR100-shaped runs.

    python benchmarks/compilations.py --run quickstart            # configs/quickstart.py, 5 tasks
    python benchmarks/compilations.py --run cifar100 --steps 10   # B50 + 10 steps on mock data
    python benchmarks/compilations.py --run cifar100 --steps 50   # B50 + 50 steps on mock data

Every XLA compilation of the run is counted through JAX's monitoring events
(``/jax/core/compile/backend_compile_duration``: jitted programs and op-by-op dispatches alike) and
named from JAX's compile log (``jax.log_compiles``); the script prints the count, the summed compile
seconds, the run's wall time and each task's ``*_compile`` fields from ``results.json``, then the
programs compiled more than once. The CIFAR100 runs use ``configs/cifar100.py`` (ResNet-32, LSC,
batch 128, PODNet) on ``tfds.testing.mock_data`` with one epoch per stage and the ``real_holdout``
generator (held-out real images as the replay pool, so no diffusion model runs), which changes
nothing in what the training programs compile. Set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` for N CPU devices.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class _Names(logging.Handler):
    """Collects the program name of each ``Compiling <name> ...`` log record."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


def _config(args):
    from sdcil_jax.config import load_config_file

    if args.run == "quickstart":
        config = load_config_file(os.path.join(HERE, "..", "configs", "quickstart.py"))
        if args.tasks:
            config.scenario.max_tasks = args.tasks
        return config
    config = load_config_file(os.path.join(HERE, "..", "configs", "cifar100.py")
                              + f":steps={args.steps},synthetic=both,generator=real_holdout")
    config.train.epochs = 1
    config.method.finetune_epochs = 1
    config.dataset.holdout_per_class = args.per_class
    config.generation.per_class = args.per_class
    config.synthetic.per_class = args.per_class
    config.memory.per_class = args.memory
    config.generation.preview_per_class = 0
    if args.tasks:
        config.scenario.max_tasks = args.tasks
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", choices=("quickstart", "cifar100"), default="quickstart")
    parser.add_argument("--steps", type=int, default=10, choices=(5, 10, 25, 50),
                        help="cifar100: incremental steps after the 50 base classes")
    parser.add_argument("--tasks", type=int, default=0, help="stop after this many tasks (0: all)")
    parser.add_argument("--examples", type=int, default=5000,
                        help="cifar100: mock examples per split (random labels over 100 classes)")
    parser.add_argument("--per-class", type=int, default=2,
                        help="cifar100: held-out real images per class used as the replay pool")
    parser.add_argument("--memory", type=int, default=20,
                        help="cifar100: exemplars per class (fewer: shorter tasks, same programs)")
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()

    import jax
    import jax.monitoring

    import sdcil_jax

    sys.path.insert(0, HERE)
    from machine import cpu_model

    durations: list[float] = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            durations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    names = _Names()
    logging.getLogger("jax").addHandler(names)
    config = _config(args)
    workdir = args.workdir or tempfile.mkdtemp(prefix="compilations_")
    run_dir = os.path.join(workdir, "run")
    clock = time.perf_counter()
    with jax.log_compiles(True):
        if args.run == "quickstart":
            results = sdcil_jax.run(config, run_dir, progress=False)
        else:
            import tensorflow_datasets as tfds

            config.dataset.data_dir = os.path.join(workdir, "tfds")
            with tfds.testing.mock_data(num_examples=args.examples):
                results = sdcil_jax.run(config, run_dir, progress=False)
    wall = time.perf_counter() - clock
    per_task = [{k: v for k, v in r["time_s"].items() if k.endswith("_compile")}
                for r in results["per_task"]]
    repeated = {k: v for k, v in collections.Counter(names.names).items() if v > 1}
    out = {
        "run": args.run if args.run == "quickstart" else f"cifar100 B50 {args.steps} steps",
        "tasks": len(results["per_task"]), "devices": jax.device_count(),
        "compilations": len(durations), "compile_s": round(sum(durations), 2),
        "wall_s": round(wall, 1), "per_task_compile_fields": per_task,
        "programs_compiled_more_than_once": dict(sorted(repeated.items(), key=lambda kv: -kv[1])),
        "programs": dict(collections.Counter(names.names)),
        "last_accuracy": results["per_task"][-1]["cnn_accuracy"],
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {jax.default_backend()}",
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""Command line: ``python -m sdcil_jax.main --config configs/quickstart.py --workdir DIR``.

Overrides: ``--config.section.key=value`` (e.g. ``--config.train.epochs=2``). A user error prints one
line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE_EPILOG = """\
examples:
  python -m sdcil_jax.main --config configs/quickstart.py --workdir /tmp/qs
  python -m sdcil_jax.main --config configs/quickstart.py --workdir /tmp/qs \\
      --config.method.name=finetune --config.synthetic.use_in=none
  python -m sdcil_jax.main --config configs/quickstart.py --workdir /tmp/qs --mode generate
  python -m sdcil_jax.main --config configs/cifar100.py:steps=10 --mode prepare

modes:
  prepare   prepare the datasets the config needs in dataset.data_dir (tfds; needs the
            `prepare` extra, except for digits; ImageNet needs its archives in
            <data_dir>/downloads/manual/); --workdir is optional
  generate  fill the replay store (resumable; finished shards are kept)
  train     train and evaluate (the replay store must be complete)
  all       generate, then train (default)

Any config key can be overridden with --config.<section>.<key>=<value>; run with
--list-keys to see them all with their defaults.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sdcil_jax.main",
        description="Class-incremental learning with Stable Diffusion replay (JAX/Flax).",
        epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="config file, optionally with an argument: "
                        "configs/cifar100.py:steps=5")
    parser.add_argument("--workdir", help="output folder (results, replay store, checkpoints)")
    parser.add_argument("--mode", default="all", choices=["prepare", "generate", "train", "all"])
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--restart", action="store_true",
                        help="start training over in a workdir whose checkpoints were made with "
                        "another config (they are moved aside, not deleted)")
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    multi = parser.add_argument_group(
        "many hosts", "one run over several processes (TPU pod slice, GPU nodes): every process "
        "runs the same command; see the README section 'Many hosts'")
    multi.add_argument("--distributed", action="store_true",
                       help="start jax.distributed and let JAX find the cluster (Cloud TPU, SLURM)")
    multi.add_argument("--coordinator_address", default=None,
                       help="HOST:PORT of process 0 (or $SDCIL_COORDINATOR_ADDRESS)")
    multi.add_argument("--num_processes", type=int, default=None,
                       help="number of processes (or $SDCIL_NUM_PROCESSES)")
    multi.add_argument("--process_id", type=int, default=None,
                       help="this process's index, 0..num_processes-1 (or $SDCIL_PROCESS_ID)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = build_parser().parse_args(rest)

    from sdcil_jax import config as config_lib
    from sdcil_jax import distributed
    from sdcil_jax.errors import UserError

    try:  # before any computation: JAX's multi-controller runtime
        distributed.initialize(distributed=args.distributed,
                               coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
    except (RuntimeError, ValueError) as exc:
        print(f"error: jax.distributed could not start ({str(exc).splitlines()[0]}); check "
              "--coordinator_address / --num_processes / --process_id (or the cluster's "
              "environment) and that every process runs the same command.", file=sys.stderr)
        return 2

    if args.list_keys:
        for key, value in sorted(config_lib._leaves(config_lib.base_config()).items()):
            print(f"{key} = {value!r}")
        return 0
    if not args.config or not (args.workdir or args.mode == "prepare"):
        print("error: --config and --workdir are required (see --help).", file=sys.stderr)
        return 2
    try:
        config = config_lib.load_config_file(args.config)
        config_lib.apply_overrides(config, overrides)
        config_lib.validate(config)
        if args.mode == "prepare":
            from sdcil_jax.data.prepare import prepare

            for line in prepare(config):
                print(line)
            return 0
        from sdcil_jax.preemption import Preempted
        from sdcil_jax.runner import run

        try:
            workdir = args.workdir if "://" in args.workdir else os.path.abspath(args.workdir)
            run(config, workdir, mode=args.mode,
                progress=not args.no_progress, restart=args.restart)
        except Preempted as exc:
            print(f"stopped: {exc}", file=sys.stderr)
            return exc.exit_code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        return 130
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()

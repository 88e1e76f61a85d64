"""Images/s and peak device memory of the engine per micro-batch and attention kind.

For each ``--cases`` entry ``B:kind`` (images per device per step, ``generation.attention`` kind),
in the order given, builds an :class:`sdcil_jax.generation.Engine` on the first device over SD
v1.4's architecture with random weights (``generation.py --backend sd14_random``; ``--model
tiny_sd14``: the same block structure at small width, for CPU smoke runs), runs one step (compiles),
then two timed steps (their median), and prints img/s, XLA's memory analysis of the compiled program
(arguments + outputs + temporaries, per device) and, where the backend reports it, the device's
``peak_bytes_in_use``. The peak is a running maximum over the process, so list the cases from the
smallest to the largest expected memory. The CPU backend reports no ``memory_stats`` (peak n/a):

    JAX_PLATFORMS=cuda python benchmarks/generation_memory.py --cases 1:standard,4:fused,8:fused
    python benchmarks/generation_memory.py --model tiny_sd14 --resolution 64 --num-inference-steps 2 \\
        --cases 1:standard,1:fused      # CPU smoke run
"""

from __future__ import annotations

import argparse
import time

import jax
from generation import gen_config, project_run, sd14_random_model, timed  # the script folder
from mfu import with_attention

from sdcil_jax.generation.memory import GIB, program_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="8:memory_efficient,8:fused,8:standard",
                        help="B:kind pairs, e.g. 1:standard,2:standard,4:fused")
    parser.add_argument("--model", default="sd14_random", choices=["sd14_random", "tiny_sd14"])
    parser.add_argument("--scheduler", default="pndm")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    if args.model == "tiny_sd14":
        from sdcil_jax.generation.tiny import tiny_sd14_model

        model = tiny_sd14_model("bfloat16")
    else:
        model = sd14_random_model("bfloat16")
    device = jax.devices()[0]
    print(f"{device.device_kind}, jax {jax.__version__}; {args.model}, bfloat16, "
          f"{args.resolution} px, {args.scheduler} {args.num_inference_steps} steps", flush=True)
    for case in args.cases.split(","):
        per, kind = case.split(":")
        per = int(per)
        run_args = argparse.Namespace(
            backend="tiny_sd", dtype="bfloat16", resolution=args.resolution, batch_per_device=per,
            guidance=2.0, model="", out_shape=(32, 32, 3))
        variant = with_attention(model, kind)
        cfg = gen_config(run_args, args.scheduler, args.num_inference_steps)
        start = time.perf_counter()
        engine, run = project_run(variant, cfg, run_args, per, [device])
        run()
        first = time.perf_counter() - start
        (wall, _), = timed({"run": run}, repeats=2, warm_up=False).values()
        compiled = program_bytes(engine, run_args.out_shape, per)
        stats = device.memory_stats() or {}
        peak = (f"{stats['peak_bytes_in_use'] / GIB:.2f} GiB" if "peak_bytes_in_use" in stats
                else "n/a")
        xla = f"{compiled / GIB:.3f} GiB" if compiled is not None else "n/a"
        print(f"batch_per_device={per} attention={kind} -> {variant.attention}: {per / wall:.2f} "
              f"img/s, XLA program {xla}, device peak {peak} (first step, compile included: "
              f"{first:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

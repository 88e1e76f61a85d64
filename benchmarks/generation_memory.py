"""Images/s and peak device memory of the engine with SD v1.4's architecture, per micro-batch.

For each ``--cases`` entry ``B:mea`` (images per device per step, memory-efficient attention 0/1),
in the order given, builds an :class:`sdcil_jax.generation.Engine` on the first device over SD
v1.4's architecture with random weights (``generation.py --backend sd14_random``), runs one step
(compiles), then two timed steps (their median), and prints img/s and the device's
``peak_bytes_in_use``. The peak is a running maximum over the process, so list the cases from the
smallest to the largest expected memory. Needs a GPU/TPU (the CPU backend reports no ``memory_stats``):

    JAX_PLATFORMS=cuda python benchmarks/generation_memory.py --cases 1:0,2:0,4:0,8:0
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
from generation import gen_config, project_run, sd14_random_model, timed  # the script folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="8:1,8:0", help="B:mea pairs, e.g. 1:0,2:0,4:0")
    parser.add_argument("--scheduler", default="pndm")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    model = sd14_random_model("bfloat16")
    device = jax.devices()[0]
    print(f"{device.device_kind}, jax {jax.__version__}; SD v1.4 architecture, bfloat16, "
          f"{args.resolution} px, {args.scheduler} {args.num_inference_steps} steps", flush=True)
    for case in args.cases.split(","):
        per, mea = (int(v) for v in case.split(":"))
        run_args = argparse.Namespace(
            backend="tiny_sd", dtype="bfloat16", resolution=args.resolution, batch_per_device=per,
            guidance=2.0, memory_efficient_attention=bool(mea), model="", out_shape=(32, 32, 3))
        variant = dataclasses.replace(
            model, unet=model.unet.clone(use_memory_efficient_attention=bool(mea)))
        cfg = gen_config(run_args, args.scheduler, args.num_inference_steps)
        start = time.perf_counter()
        _, run = project_run(variant, cfg, run_args, per, [device])
        run()
        first = time.perf_counter() - start
        (wall, _), = timed({"run": run}, repeats=2, warm_up=False).values()
        stats = device.memory_stats() or {}
        gib = 2**30
        print(f"batch_per_device={per} memory_efficient_attention={bool(mea)}: "
              f"{per / wall:.2f} img/s, peak {stats.get('peak_bytes_in_use', 0) / gib:.2f} GiB, "
              f"in use after {stats.get('bytes_in_use', 0) / gib:.2f} GiB (first step, compile "
              f"included: {first:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

"""Where the training step's time goes: its parts timed as separate jitted programs.

    python benchmarks/step_profile.py                    # the CIFAR setting, 5 rounds
    python benchmarks/step_profile.py --settings cifar imagenet --rounds 3

The step of ``benchmarks/train_step.py`` (the one the task loop builds) is cut into the pieces it
runs in order, each compiled on its own from the same inputs:

  materialise   gather of the batch from the device pool + augmentation (crop, flip, brightness)
  old forward   the frozen old model, inference mode (PODNet's distillation targets)
  new forward   the current model in train mode (batch statistics), no gradient
  loss + grad   forward + PODNet loss + backward of the current model (old outputs given)
  full step     everything, with the clamp and the SGD update (the real jitted step)

Rows are medians over rounds of ``--steps`` calls each, interleaved so that load from other jobs
hits every row alike. XLA fuses across the pieces inside the full step, so the parts need not add up
to it; "optimizer + rest" is the full step minus materialise, old forward and loss + grad.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import SETTINGS, jax_step  # noqa: E402


def parts(setting: dict):
    """{name: callable() -> blocked result} for the step's pieces, and the images per step."""
    import jax

    from sdcil_jax import train as train_lib

    run, images, _ = jax_step(setting)
    p = run.parts
    backbone, method, stream = p["backbone"], p["method"], p["stream"]
    batch, key, old, args = p["batches"][0], p["key"], p["old"], p["args"]
    mean, std = p["mean"], p["std"]
    # the step donates its state: the pieces run on the old model's copy of the same values
    params, stats = old["params"], old["batch_stats"]

    @jax.jit
    def materialise(pool, batch, key, stream_args):
        b = stream.materialise(pool, batch, key, key, stream_args)
        return (b["image"] - mean) / std, b["label"], b["cls_mask"], b["dist_mask"]

    @jax.jit
    def old_forward(old, images):
        out, _ = train_lib.forward(backbone, method.head_apply, old["params"],
                                   old["batch_stats"], images, train=False)
        return out

    @jax.jit
    def new_forward(params, stats, images):
        return train_lib.forward(backbone, method.head_apply, params, stats, images, train=True)

    @jax.jit
    def loss_grad(params, stats, images, y, cls_mask, dist_mask, old_out):
        def loss_fn(params):
            out, new_stats = train_lib.forward(backbone, method.head_apply, params, stats, images,
                                               train=True)
            loss, _ = method.loss(params, out, old_out, y, cls_mask, dist_mask, args["method"])
            return loss, new_stats

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    images, y, cls_mask, dist_mask = materialise(stream.pool, batch, key, args["stream"])
    old_out = old_forward(old, images)
    pieces = {
        "materialise": lambda: materialise(stream.pool, batch, key, args["stream"]),
        "old forward": lambda: old_forward(old, images),
        "new forward": lambda: new_forward(params, stats, images),
        "loss + grad": lambda: loss_grad(params, stats, images, y, cls_mask, dist_mask, old_out),
    }
    return pieces, run, images.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["cifar"], choices=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=0, help="calls per round (0 = auto)")
    args = parser.parse_args()
    import jax

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; jax {jax.__version__} "
          f"on {jax.devices()[0].platform} x{jax.device_count()}")
    for name in args.settings:
        steps = args.steps or (10 if SETTINGS[name]["size"] == 32 else 2)
        pieces, run, n_images = parts(SETTINGS[name])
        for fn in pieces.values():
            jax.block_until_ready(fn())
        run(2)
        times = {k: [] for k in [*pieces, "full step"]}
        for _ in range(args.rounds):
            for k, fn in pieces.items():
                start = time.perf_counter()
                for _ in range(steps):
                    out = fn()
                jax.block_until_ready(out)
                times[k].append((time.perf_counter() - start) / steps)
            times["full step"].append(run(steps) / steps)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rest = ms["full step"] - ms["materialise"] - ms["old forward"] - ms["loss + grad"]
        print(f"\n{name} ({n_images} images per step; load average {os.getloadavg()[0]:.1f})")
        print("| part | ms per step | share of the full step |")
        print("|---|--:|--:|")
        for k, v in [*ms.items(), ("optimizer + rest", rest)]:
            print(f"| {k} | {v:.1f} | {100 * v / ms['full step']:.0f}% |")


if __name__ == "__main__":
    main()

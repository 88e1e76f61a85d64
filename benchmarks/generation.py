"""Images/s of the replay generator: the project's engine vs diffusers' own Flax pipeline call.

On the same model, scheduler, resolution, steps and global batch (``--batch-per-device`` x devices):

(a) ``diffusers``: ``FlaxStableDiffusionPipeline.__call__(prompt_ids, params, rngs, jit=True)``
    (pmap over the local devices, replicated params, sharded prompt ids), float32 images on the host;
(b) ``diffusers + uint8``: (a) plus the conversion a replay store needs (luminance/antialiased
    resize to ``--out-shape``, uint8; :func:`sdcil_jax.generation.to_uint8`, one jitted call per
    batch), i.e. what the project did before its own sampler;
(c) ``project``: :class:`sdcil_jax.generation.Engine.run` (text states once per class, jit +
    shard_map over a mesh, uint8 at ``--out-shape`` made on the devices, asynchronous dispatch,
    images handed to a writer thread; the sink here only keeps them).

Each row is the median of ``--repeats`` timed runs of ``--steps-per-run`` global steps after one
warm-up run (which compiles). Also printed: how many times the engine's program was compiled, the
share of wall time the devices are busy (device time per step measured by dispatching the same step
back to back with no host work in between, times steps, over the run's wall time; for diffusers the
whole synchronous call counts as device time, an upper bound), the images/s of each scheduler at its
step count, and the projected time of the replay pools of the CIFAR100 and ImageNet-1k protocols at
the measured rate.

``--breakdown`` (on by default) times the parts of one device's step separately on one device: the
guided UNet call (on 2B latents) times the number of model calls, the VAE decode of B latents, the
text encoding of 2B prompts (which diffusers' call repeats every step) and the uint8 conversion. The
model calls (UNet and VAE) are work that any sampler producing the same images must do, so
the share of diffusers' step outside them, ``1 - model calls' seconds / diffusers' seconds``, bounds
what a sampler can save over diffusers (text encoding, transfers, conversion, host gaps): its ratio
cannot exceed ``1 / (1 - share)``.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/generation.py
    python benchmarks/generation.py --backend sd --model CompVis/stable-diffusion-v1-4 \\
        --resolution 512 --num-inference-steps 50 --out-shape 32,32,3      # on a GPU/TPU
    python benchmarks/generation.py --memory-sd14 1,2,4   # XLA's buffer sizes of SD v1.4, 512 px
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from machine import cpu_model  # noqa: E402  (benchmarks/ is the script folder)
from mfu import image_flops, mfu_text, with_attention  # noqa: E402

from sdcil_jax.config import base_config, load_config_file  # noqa: E402
from sdcil_jax.generation import Engine, load_model, to_uint8  # noqa: E402
from sdcil_jax.generation.engine import ClassJob  # noqa: E402
from sdcil_jax.generation.pipeline import diffusers_pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a bear"
REFERENCE_TPU_V28 = 1.1  # SD v1.x images/s of diffusers' Flax pipeline on a TPU v2-8 (issue 11)


def gen_config(args, scheduler: str, steps: int):
    g = base_config().generation
    g.backend, g.dtype, g.scheduler = args.backend, args.dtype, scheduler
    g.resolution, g.num_inference_steps = args.resolution, steps
    g.batch_per_device, g.guidance_scale = args.batch_per_device, args.guidance
    if args.model:
        g.model = args.model
    return g


def timed(fns: dict, repeats: int, warm_up: bool = True) -> dict[str, tuple[float, float]]:
    """Median (wall s, process CPU s) per run of each function, runs interleaved round-robin after
    one warm-up run each (so load from other jobs on a shared machine hits all rows alike)."""
    for fn in fns.values() if warm_up else ():
        fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
            for name, s in samples.items()}


def diffusers_runs(model, args, scheduler: str, steps: int, n_images: int, devices) -> dict:
    """diffusers' pipeline call over ``n_images``, alone and followed by the uint8 conversion.

    The call pmaps over as many local devices as ``prompt_ids`` has rows (here ``len(devices)``).
    """
    pipe, params = diffusers_pipeline(model, scheduler)
    n, per = len(devices), args.batch_per_device
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    stacked = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))

    def replicate(x):  # pmap layout: a leading device axis
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (n,) + x.shape), stacked)

    p_params = jax.tree_util.tree_map(replicate, params)
    ids = model.tokenize([PROMPT] * (n * per)).reshape(n, per, -1)
    rngs = jax.random.split(jax.random.PRNGKey(0), n)
    calls = n_images // (n * per)

    def call():
        images = pipe(ids, p_params, rngs, steps, height=args.resolution, width=args.resolution,
                      guidance_scale=args.guidance, jit=True).images
        return images.reshape((n * per,) + images.shape[2:])

    def run_calls():
        for _ in range(calls):
            call()

    def run_calls_uint8():
        for _ in range(calls):
            to_uint8(call(), args.out_shape)

    return {"diffusers": run_calls, "diffusers+uint8": run_calls_uint8}


def project_run(model, gen_cfg, args, n_images: int, devices):
    """(engine, a function generating ``n_images`` uint8 images of one class with Engine.run)."""
    engine = Engine(model, gen_cfg, seed=0, devices=devices)
    jobs = [ClassJob(0, (PROMPT,), tuple(range(n_images)))]
    kept = []

    def run():
        kept.clear()
        engine.run(jobs, args.out_shape, lambda c, images, idx: kept.append(images), progress=False)
        assert sum(len(k) for k in kept) == n_images

    return engine, run


class CompileCounter:
    """Counts XLA compilations (of anything) while active."""

    def __init__(self):
        self.count = 0

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def busy_share(engine, out_shape, seconds: float, n_images: int) -> tuple[float, float]:
    """(share of the run's wall time the devices are busy, device seconds per step)."""
    n_steps = n_images // engine.batch_size
    step_s = engine.device_seconds_per_step(out_shape, repeats=max(3, n_steps))
    return min(1.0, n_steps * step_s / seconds), step_s


def _call_blocking(fn, fn_args):
    return jax.block_until_ready(fn(*fn_args))


def breakdown(model, args, diffusers_step_s: float, repeats: int) -> None:
    """Print the parts of one device's step (module docstring) and the ratio's ceiling."""
    from sdcil_jax.generation.model import unet_predict, vae_decode
    from sdcil_jax.generation.sampler import postprocess
    from sdcil_jax.generation.schedulers import solver_table

    device = jax.local_devices()[0]
    b, calls = args.batch_per_device, solver_table(args.scheduler, model.scheduler_config,
                                                   args.num_inference_steps).num_evaluations
    put = functools.partial(jax.device_put, device=device)
    params = {k: put(v) for k, v in model.params.items()}
    latent = model.latent_shape(args.resolution)
    ids = put(model.tokenize([PROMPT] * b + [""] * b))
    context = jax.block_until_ready(model.encode_text(params["text_encoder"], ids))
    z2 = put(np.random.default_rng(0).standard_normal((2 * b,) + latent).astype(np.float32))
    t = put(np.int32(model.scheduler_config["num_train_timesteps"] // 2))
    images = put(np.random.default_rng(1).uniform(size=(b, args.resolution, args.resolution, 3))
                 .astype(np.float32))
    unet = functools.partial(unet_predict, model.unet)
    vae = functools.partial(vae_decode, model.vae)
    parts = {  # name: (function, its arguments (passed, so that XLA folds none), times per step)
        f"UNet, 2x{b} latents": (unet, (params["unet"], z2, t, context), calls),
        f"VAE decode, {b} latents": (vae, (params["vae"], z2[:b]), 1),
        f"text encoder, 2x{b} prompts": (model.encode_text, (params["text_encoder"], ids), 1),
        f"uint8 {args.out_shape}": (functools.partial(postprocess, out_hw_c=args.out_shape),
                                    (images,), 1),
    }
    seconds = {}
    for name, (fn, fn_args, times) in parts.items():
        call = functools.partial(_call_blocking, jax.jit(fn), fn_args)
        runs = timed({name: call}, repeats)
        seconds[name] = runs[name][0] * times
    model_s = sum(s for name, s in seconds.items() if name.startswith(("UNet", "VAE")))
    print(f"\nOne device's step ({b} images, {calls} model calls), parts timed alone on 1 device "
          "(ms per step | share of diffusers' step):")
    for name, s in seconds.items():
        print(f"  {name:36s} {1000 * s:8.2f} | {100 * s / diffusers_step_s:5.1f}%")
    print(f"  diffusers' whole call on 1 device     {1000 * diffusers_step_s:8.2f} | 100.0%")
    outside = max(0.0, 1.0 - model_s / diffusers_step_s)
    print(f"  share of diffusers' step outside the model calls: {100 * outside:.1f}% -> ceiling of "
          f"the project/diffusers ratio with the same model calls: {1 / (1 - outside):.2f}x "
          f"(approximate: the parts timed alone pay their own dispatch; the model calls alone "
          f"took {model_s / diffusers_step_s:.2f} of diffusers' whole call)")


def engine_calls(args) -> int:
    """UNet calls per image of the head-to-head's scheduler and steps."""
    from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE, solver_table

    return solver_table(args.scheduler, SD_V1_SCHEDULE, args.num_inference_steps).num_evaluations


def projections(rate: float, label: str) -> list[str]:
    lines = []
    for spec, total in (("configs/cifar100.py", 100), ("configs/cifar100.py:steps=10", 100),
                        ("configs/imagenet1k.py", 1000)):
        c = load_config_file(os.path.join(ROOT, spec))
        old = total - c.scenario.increment  # every class but the last task's becomes old
        for per_class in sorted({c.generation.per_class, 500}):
            images = old * per_class
            lines.append(f"  {spec:32s} {old:4d} old classes x {per_class:3d} = {images:7d} images: "
                         f"{images / rate / 3600:8.1f} h at {rate:.2f} img/s ({label})")
    return lines


def sd14_modules(dtype, mea: bool = False):
    """SD v1.4's UNet (diffusers' defaults with 768-d cross-attention, 64x64 latents) and VAE."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(cross_attention_dim=768, sample_size=64, dtype=dtype,
                                    use_memory_efficient_attention=mea)
    vae = FlaxAutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512, dtype=dtype)
    return unet, vae


def sd14_random_model(dtype_name: str, mea: bool = False):
    """SD v1.4's architecture with random weights: its UNet and VAE, a 12-layer 768-d CLIP text
    encoder (ViT-L/14's text tower) over the tiny model's character tokenizer. The compute of SD
    v1.4 per image without its download, for speed measurements only (its images are noise)."""
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    from sdcil_jax.generation.model import DTYPES, SDModel, _cast, _silence_flax_deprecation
    from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE
    from sdcil_jax.generation.tiny import _random_params, _tiny_tokenizer

    dtype = DTYPES[dtype_name]
    tokenizer = _tiny_tokenizer()
    unet, vae = sd14_modules(dtype, mea)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=768, intermediate_size=3072,
        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    text_encoder = FlaxCLIPTextModel(text_config, dtype=dtype, _do_init=False)
    key = jax.random.PRNGKey(0)
    shapes = {"unet": jax.eval_shape(unet.init_weights, key),
              "vae": jax.eval_shape(vae.init_weights, key),
              "text_encoder": jax.eval_shape(lambda k: text_encoder.init_weights(k, (1, 77)), key)}
    params = {name: _random_params(tree, i) for i, (name, tree) in enumerate(shapes.items())}
    _silence_flax_deprecation()
    return SDModel(tokenizer, text_encoder, unet, vae, dict(SD_V1_SCHEDULE), _cast(params, dtype),
                   dtype)


def memory_sd14(batches: list[int], dtype_name: str, kinds: list[str]) -> None:
    """Compile the per-device program of SD v1.4's architecture at 512 px (abstract weights) and
    print XLA's buffer sizes (CPU backend: a compiler estimate, not a TPU/GPU measurement)."""
    from sdcil_jax.generation.pipeline import DTYPES
    from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE

    dtype = DTYPES[dtype_name]
    unet, vae = sd14_modules(dtype)
    key = jax.random.PRNGKey(0)

    def cast(tree):
        return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)

    params = {"unet": cast(jax.eval_shape(unet.init_weights, key)),
              "vae": cast(jax.eval_shape(vae.init_weights, key))}
    count = {k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v))
             for k, v in params.items()}
    decoder = sum(int(np.prod(x.shape)) for path, x in
                  jax.tree_util.tree_flatten_with_path(params["vae"])[0]
                  if "decoder" in jax.tree_util.keystr(path) or "post_quant" in
                  jax.tree_util.keystr(path))
    print(f"SD v1.4 parameters: UNet {count['unet'] / 1e6:.1f} M, VAE {count['vae'] / 1e6:.1f} M "
          f"(decoder {decoder / 1e6:.1f} M); CLIP ViT-L/14 text encoder 123.1 M (not in the program)")

    from sdcil_jax.generation import pipeline as sd
    from sdcil_jax.generation.attention import resolve
    from sdcil_jax.generation.sampler import sample_images
    from sdcil_jax.generation.schedulers import solver_table

    table = solver_table("pndm", SD_V1_SCHEDULE, 50)
    for kind, b in ((kind, b) for kind in kinds for b in batches):
        att = resolve(kind)
        u = unet.clone(use_memory_efficient_attention=att == "memory_efficient")
        fn = jax.jit(lambda p, k, cond, unc, c, i, u=u, att=att: sample_images(
            lambda up, x, t, ctx: sd.unet_predict(u, up, x, t, ctx, att),
            lambda vp, z: sd.vae_decode(vae, vp, z, att), table, 2.0, (32, 32, 3), (4, 64, 64),
            p, k, cond, unc, c, i))
        args = (params, jax.ShapeDtypeStruct((2,), np.uint32),
                jax.ShapeDtypeStruct((b, 77, 768), dtype), jax.ShapeDtypeStruct((77, 768), dtype),
                jax.ShapeDtypeStruct((b,), np.uint32), jax.ShapeDtypeStruct((b,), np.uint32))
        start = time.perf_counter()
        stats = fn.lower(*args).compile().memory_analysis()
        gib = 1 << 30
        print(f"  batch_per_device={b} ({dtype_name}, attention={kind} -> {att}): "
              f"arguments {stats.argument_size_in_bytes / gib:.2f} GiB, temporaries "
              f"{stats.temp_size_in_bytes / gib:.2f} GiB, output "
              f"{stats.output_size_in_bytes / 2**20:.2f} MiB (compiled in "
              f"{time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tiny_sd",
                        choices=["tiny_sd", "sd", "sd14_random", "tiny_sd14"],
                        help="sd14_random: SD v1.4's architecture, random weights (speed only); "
                             "tiny_sd14: its block structure at small width (CPU smoke runs)")
    parser.add_argument("--model", default="", help="hub id or local folder (backend sd)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument("--scheduler", default="ddim",
                        help="scheduler of the head-to-head (ddim: same model calls in both)")
    parser.add_argument("--batch-per-device", type=int, default=base_config().generation.batch_per_device)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--out-shape", default="32,32,3", help="stored image H,W,C")
    parser.add_argument("--steps-per-run", type=int, default=2, help="global steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scheduler-steps", default="pndm=50,ddim=50,dpm_solver=20",
                        help="'' skips the scheduler rows (projections then use the engine's rate)")
    parser.add_argument("--scheduler-steps-per-run", type=int, default=1)
    parser.add_argument("--attention", default="auto",
                        help="comma list of generation.attention kinds to time, e.g. standard,fused")
    parser.add_argument("--memory-sd14", default="", help="e.g. 1,2,4: XLA buffer sizes, then exit")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip the per-part timing of one device's step")
    args = parser.parse_args()
    args.out_shape = tuple(int(v) for v in args.out_shape.split(","))
    kinds = args.attention.split(",")
    if args.memory_sd14:
        memory_sd14([int(b) for b in args.memory_sd14.split(",")], args.dtype, kinds)
        return

    devices = jax.local_devices()
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores (shared), load average "
          f"{os.getloadavg()[0]:.1f}; jax {jax.__version__}, {len(devices)} x "
          f"{devices[0].device_kind} ({jax.default_backend()})")
    print(f"Model: {args.backend} {args.model}, {args.dtype}, {args.resolution} px, "
          f"guidance {args.guidance}, {args.batch_per_device} images per device per step, "
          f"stored as {args.out_shape}, median of {args.repeats} timed runs")
    cfg = gen_config(args, args.scheduler, args.num_inference_steps)
    if args.backend == "sd14_random":
        start = time.perf_counter()
        model = sd14_random_model(args.dtype)
        print(f"SD v1.4 architecture, random weights, built in {time.perf_counter() - start:.0f} s")
    elif args.backend == "tiny_sd14":
        from sdcil_jax.generation.tiny import tiny_sd14_model

        model = tiny_sd14_model(args.dtype)
    else:
        model = load_model(cfg)
    calls = engine_calls(args)
    flops = image_flops(model, args.resolution, calls)
    print(f"XLA's count: {flops / 1e12:.4g} TFLOP per image ({calls} UNet calls on 2 latents + VAE "
          "decode)")
    variants = {kind: with_attention(model, kind) for kind in kinds}
    model = variants[kinds[0]]  # diffusers' rows and the scheduler rows

    counts = [1, len(devices)] if len(devices) > 1 else [1]
    for n in counts:
        subset = devices[:n]
        n_img = args.steps_per_run * n * args.batch_per_device
        fns = diffusers_runs(model, args, args.scheduler, args.num_inference_steps, n_img, subset)
        engines = {}
        for kind, variant in variants.items():
            engines[kind], fns[f"project:{kind}"] = project_run(variant, cfg, args, n_img, subset)
        fns["project"] = fns[f"project:{kinds[0]}"]
        engine = engines[kinds[0]]
        for fn in fns.values():  # warm-up: compiles, outside the counted section
            fn()
        with CompileCounter() as compiles:
            t = timed(fns, args.repeats, warm_up=False)
        busy, step_s = busy_share(engine, args.out_shape, t["project"][0], n_img)
        d_busy = t["diffusers"][0] / t["diffusers+uint8"][0]  # the call counted busy throughout
        print(f"\nHead-to-head on {n} device(s), {args.scheduler}, {args.num_inference_steps} steps, "
              f"{n_img} images per run (img/s wall | img per CPU-second):")
        rows = (("diffusers __call__(jit=True)", "diffusers", ""),
                (f"diffusers + uint8 {args.out_shape}", "diffusers+uint8",
                 f"device busy <= {100 * d_busy:.0f}%"),
                ("project Engine.run -> uint8", "project",
                 f"device busy  = {100 * busy:.0f}% ({step_s * 1000:.0f} ms/step back to back)"))
        for label, key, note in rows:
            wall, cpu = t[key]
            print(f"  {label:36s} {n_img / wall:8.2f} | {n_img / cpu:8.2f}   {note}")
        print(f"Attention kinds, project Engine.run (img/s wall, achieved model FLOP/s, MFU of "
              f"{n} x {subset[0].device_kind}):")
        for kind in kinds:
            rate = n_img / t[f"project:{kind}"][0]
            print(f"  {kind:16s} -> {variants[kind].attention:16s} {rate:8.2f} img/s  "
                  f"{mfu_text(rate, flops, subset)}")
        for key in ("diffusers", "diffusers+uint8"):
            print(f"  ratio project / {key:16s} {t[key][0] / t['project'][0]:.2f}x wall, "
                  f"{t[key][1] / t['project'][1]:.2f}x CPU")
        print(f"  engine program compilations: {engine.traces} (during the timed runs: "
              f"{compiles.count} XLA compilations of anything)", flush=True)
        if n == 1 and args.breakdown:
            breakdown(model, args, t["diffusers"][0] / args.steps_per_run, args.repeats)

    best, best_name = n_img / t["project"][0], f"{args.scheduler} {args.num_inference_steps} steps"
    n_sched = args.scheduler_steps_per_run * len(devices) * args.batch_per_device
    if args.scheduler_steps:
        best, best_name = scheduler_rows(model, args, devices, n_sched)
    label = f"{args.backend} {best_name} on this machine"
    print(f"\nProjected replay-pool time at the measured {best_name} rate:")
    print("\n".join(projections(best, label)))
    print("and at the issue's reference rate for SD v1.x (diffusers' Flax pipeline, TPU v2-8):")
    print("\n".join(projections(REFERENCE_TPU_V28, "reference, not measured here")))


def scheduler_rows(model, args, devices, n_sched: int) -> tuple[float, str]:
    """Images/s of the engine with each scheduler of ``--scheduler-steps``; returns the rate of
    pndm (the paper's sampler) or else of the first, and its label."""
    print(f"\nSchedulers (project engine, {len(devices)} device(s), {n_sched} images per run):")
    best, best_name = None, ""
    for item in args.scheduler_steps.split(","):
        name, steps = item.split("=")
        engine, run = project_run(model, gen_config(args, name, int(steps)), args, n_sched, devices)
        (wall, cpu), = timed({name: run}, args.repeats).values()
        busy, _ = busy_share(engine, args.out_shape, wall, n_sched)
        print(f"  {name:10s} {int(steps):3d} steps, {engine.table.num_evaluations:3d} UNet calls: "
              f"{n_sched / wall:8.2f} img/s | {n_sched / cpu:8.2f} img per CPU-s (device busy "
              f"{100 * busy:.0f}%, {engine.traces} compilation)", flush=True)
        if name == "pndm" or best is None:
            best, best_name = n_sched / wall, f"{name} {steps} steps"
    return best, best_name


if __name__ == "__main__":
    main()

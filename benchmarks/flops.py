"""XLA's FLOP counts of the two long stages, for the planning table (README, "Planning a run").

Compiles, for the CPU backend and from abstract weights (nothing is downloaded), and prints
``compiled.cost_analysis()["flops"]`` of:

* one UNet call of SD v1.4's architecture (860 M parameters) on a batch of 2 latents of 4x64x64
  (one image with classifier-free guidance: conditional and unconditional rows) with 77 text tokens;
* one VAE decode of a 4x64x64 latent to a 512x512 image (decoder only, as in the sampler);
* one ResNet-32 forward (train mode) and one forward + backward on a batch of 128 CIFAR images;
* the same for ResNet-18 on 224x224 ImageNet images.

XLA counts a multiply-add as 2 FLOPs. These are compiler counts for the CPU backend: another
backend fuses differently but does the same arithmetic. Per generated image (with guidance):
``UNet calls x UNet(batch 2) + VAE decode`` (PLMS makes 51 calls in 50 steps). Divide by a chip's
peak FLOP/s times an assumed utilisation to project a time; that is a projection, not a measurement.

    python benchmarks/flops.py            # about 1-3 minutes on 2 CPU cores
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def flops_of(fn, *args) -> tuple[float, float]:
    """(FLOPs by XLA's cost analysis, seconds to compile) of ``jax.jit(fn)(*args)``."""
    start = time.perf_counter()
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"]), time.perf_counter() - start


def abstract(tree, dtype):
    """The shapes of ``tree`` with floating leaves in ``dtype``."""
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), tree)


def sd14_counts(dtype=jnp.bfloat16) -> dict[str, float]:
    """FLOPs of one guided UNet call (batch 2) and one VAE decode of SD v1.4 at 512x512."""
    from sdcil_jax.generation import pipeline
    from sdcil_jax.generation.pipeline import unet_predict, vae_decode

    # The project's import silences diffusers' per-construction Flax deprecation notice.
    _, FlaxUNet2DConditionModel, FlaxAutoencoderKL, _ = pipeline._diffusers()
    unet = FlaxUNet2DConditionModel(cross_attention_dim=768, sample_size=64, dtype=dtype)
    vae = FlaxAutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512, dtype=dtype)
    key = jax.random.PRNGKey(0)
    unet_params = abstract(jax.eval_shape(unet.init_weights, key), dtype)
    vae_params = abstract(jax.eval_shape(vae.init_weights, key), dtype)
    latents = jax.ShapeDtypeStruct((2, 4, 64, 64), dtype)
    context = jax.ShapeDtypeStruct((2, 77, 768), dtype)
    unet_flops, unet_s = flops_of(lambda p, x, c: unet_predict(unet, p, x, 500, c),
                                  unet_params, latents, context)
    vae_flops, vae_s = flops_of(lambda p, z: vae_decode(vae, p, z), vae_params,
                                jax.ShapeDtypeStruct((1, 4, 64, 64), dtype))
    print(f"SD v1.4 UNet, batch 2 (one guided step of one image): {unet_flops / 1e12:.3f} TFLOP "
          f"(compiled in {unet_s:.0f} s)")
    print(f"SD v1.4 VAE decode, one 512x512 image:               {vae_flops / 1e12:.3f} TFLOP "
          f"(compiled in {vae_s:.0f} s)")
    return {"unet_guided_step": unet_flops, "vae_decode": vae_flops}


def resnet_counts(name: str, batch: int, size: int) -> dict[str, float]:
    """FLOPs of a train-mode forward and of forward + backward of backbone ``name``."""
    from sdcil_jax.models.registry import build_backbone

    model = build_backbone({"name": name})
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros(x.shape), False),
                               jax.random.PRNGKey(0))

    def forward(v, images):
        out, _ = model.apply(v, images, True, mutable=["batch_stats"])
        return out["features"]

    def loss(params, v, images):
        return jnp.sum(forward({**v, "params": params}, images) ** 2)

    fwd, _ = flops_of(forward, variables, x)
    both, _ = flops_of(jax.grad(loss), variables["params"], variables, x)
    print(f"{name}, batch {batch} at {size}x{size}: forward {fwd / batch / 1e9:.3f} GFLOP/image, "
          f"forward+backward {both / batch / 1e9:.3f} GFLOP/image")
    return {"forward": fwd / batch, "forward_backward": both / batch}


def main() -> None:
    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE, solver_table

    sd = sd14_counts()
    for scheduler, steps in (("pndm", 50), ("ddim", 50), ("dpm_solver", 20)):
        calls = solver_table(scheduler, SD_V1_SCHEDULE, steps).num_evaluations
        per_image = calls * sd["unet_guided_step"] + sd["vae_decode"]
        print(f"  per image, {scheduler} {steps} steps ({calls} guided UNet calls) + decode: "
              f"{per_image / 1e12:.1f} TFLOP")
    resnet_counts("resnet32", 128, 32)
    resnet_counts("resnet18", 64, 224)


if __name__ == "__main__":
    main()

"""Model FLOP utilisation (MFU) of the generator: FLOPs per image, public chip peaks, attention kinds.

``achieved FLOP/s = images/s x FLOPs per image`` and ``MFU = achieved / (peak x devices)``, with FLOPs
per image ``= UNet calls x F_unet(2 latents) + F_vae(1 latent)`` counted by XLA's cost analysis of the
standard-attention UNet call (conditional and unconditional rows) and VAE decode (a multiply-add is 2
FLOPs). Every attention kind does that arithmetic (a fused kernel does not skip any), so the same
count serves all: MFU compares kinds on the work the model needs, not on what a kernel executes.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

# Dense bfloat16 peak TFLOP/s per JAX device, from the vendors' public data sheets (no sparsity),
# matched by substring of ``device.device_kind`` (lower case), first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.0),  # H200 SXM
    ("h100", 989.0),  # H100 SXM (the PCIe card: 756)
    ("a100", 312.0),
    ("l4", 121.0),
    ("tpu v6 lite", 918.0),  # v6e (Trillium)
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5", 459.0),  # v5p
    ("tpu v4", 275.0),  # one chip (megacore) per device
)


def peak_tflops(device_kind: str) -> float | None:
    """The device kind's dense bf16 peak (TFLOP/s), or None when not in :data:`PEAK_BF16_TFLOPS`."""
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in kind), None)


def with_attention(model, kind: str):
    """``model`` computing attention as ``generation.attention=kind`` on the default backend."""
    from sdcil_jax.generation.attention import resolve

    resolved = resolve(kind)
    unet = model.unet.clone(use_memory_efficient_attention=resolved == "memory_efficient")
    return dataclasses.replace(model, unet=unet, attention=resolved)


def image_flops(model, resolution: int, model_calls: int) -> float:
    """XLA's FLOPs of one guided image: ``model_calls`` UNet calls on 2 latents + one VAE decode."""
    from sdcil_jax.generation.model import unet_predict, vae_decode

    latent = model.latent_shape(resolution)
    width = model.text_encoder.config.hidden_size
    spec = jax.ShapeDtypeStruct

    def params(tree):
        return jax.tree_util.tree_map(lambda x: spec(np.shape(x), x.dtype), tree)

    def count(fn, *args):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])

    unet = count(lambda p, x, c: unet_predict(model.unet, p, x, 1, c), params(model.params["unet"]),
                 spec((2, *latent), model.dtype), spec((2, 77, width), model.dtype))
    vae = count(lambda p, z: vae_decode(model.vae, p, z), params(model.params["vae"]),
                spec((1, *latent), model.dtype))
    return model_calls * unet + vae


def mfu_text(images_per_s: float, flops_per_image: float, devices) -> str:
    """``X TFLOP/s, MFU Y%`` (``n/a`` when the chip's peak is unknown)."""
    achieved = images_per_s * flops_per_image / 1e12
    peak = peak_tflops(devices[0].device_kind)
    share = f"{100 * achieved / (peak * len(devices)):.1f}%" if peak else "n/a"
    return f"{achieved:8.3f} TFLOP/s, MFU {share}"

"""generation.attention: fused attention (jax.nn.dot_product_attention through flax's method
interception) against diffusers' standard attention, on the tiny model and on a small UNet/VAE with
SD v1.4's block structure (CPU)."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdcil_jax.config import apply_overrides, base_config, validate
from sdcil_jax.errors import ConfigError
from sdcil_jax.generation import Engine, load_model
from sdcil_jax.generation import attention as attn
from sdcil_jax.generation.model import unet_predict, vae_decode
from sdcil_jax.generation.pool import fingerprint_fields
from sdcil_jax.generation.tiny import tiny_model, tiny_sd14_model

# attention layers per trace: tiny UNet 2 down + 3 up transformer layers and 1 mid, 2 attentions each;
# SD v1.4's UNet 3 x 2 down + 3 x 3 up + 1 mid = 16 layers; each VAE decoder 1 mid-block attention
LAYERS = {"tiny": (12, 1), "sd14_shaped": (32, 1)}
MODELS = {"tiny": (tiny_model, 32), "sd14_shaped": (tiny_sd14_model, 64)}  # (builder, resolution)


def gen_cfg(**overrides):
    g = base_config().generation
    g.backend, g.dtype, g.num_inference_steps, g.batch_per_device = "tiny_sd", "float32", 2, 2
    g.resolution = 32
    for key, value in overrides.items():
        g[key] = value
    return g


def _model_outputs(model, kind, resolution):
    """(UNet output, VAE images) float32 of fixed random inputs, computed with attention ``kind``."""
    rng = np.random.default_rng(0)
    latent = model.latent_shape(resolution)
    x = jnp.asarray(rng.standard_normal((2, *latent)), model.dtype)
    context = jnp.asarray(rng.standard_normal((2, 77, 32)), model.dtype)
    unet = jax.jit(lambda p, x, c: unet_predict(model.unet, p, x, 500, c, kind))
    vae = jax.jit(lambda p, z: vae_decode(model.vae, p, z, kind))
    return (np.asarray(unet(model.params["unet"], x, context), np.float32),
            np.asarray(vae(model.params["vae"], x), np.float32))


@pytest.mark.parametrize("name", ["tiny", "sd14_shaped"])
def test_fused_equals_standard_in_float32(name):
    build, resolution = MODELS[name]
    model = build("float32")
    before = collections.Counter(attn.FUSED_TRACES)
    standard = _model_outputs(model, "standard", resolution)
    assert attn.FUSED_TRACES == before  # standard never takes the fused path
    fused = _model_outputs(model, "fused", resolution)
    assert attn.FUSED_TRACES["unet"] - before["unet"] == LAYERS[name][0]
    assert attn.FUSED_TRACES["vae"] - before["vae"] == LAYERS[name][1]
    for part, a, b in zip(("UNet", "VAE"), standard, fused, strict=True):
        diff, scale = float(np.abs(a - b).max()), float(np.abs(a).max())
        print(f"{name} {part} float32: max |fused - standard| = {diff:.3g} (max |out| {scale:.3g})")
        # float32 rounding, amplified through the random-weight network (measured: up to 1.2e-5)
        assert diff <= 5e-5 * max(1.0, scale), (part, diff)


def _stored_images(model, kind, resolution):
    """uint8 images (4, 32, 32, 3) of class 0 made by the engine with attention ``kind`` (one device);
    also checks that the engine's program ran the fused path for ``fused`` and only then."""
    dtype = "float32" if model.dtype == jnp.float32 else "bfloat16"
    before = collections.Counter(attn.FUSED_TRACES)
    engine = Engine(dataclasses.replace(model, attention=kind),
                    gen_cfg(dtype=dtype, resolution=resolution), seed=0, devices=jax.devices()[:1])
    images = engine.generate(0, ["a photo of a apple"], [0, 1, 2, 3], (32, 32, 3)).astype(int)
    fused_layers = attn.FUSED_TRACES["unet"] - before["unet"]
    assert (fused_layers > 0) == (kind == "fused")
    return images


@pytest.mark.parametrize("name", ["tiny", "sd14_shaped"])
def test_fused_stored_images(name):
    """float32: within one level. bfloat16: NOT within one level of diffusers' standard attention
    (its logits are rounded to bfloat16 before the softmax; fused keeps them in float32), but no
    farther from the float32 images than standard is."""
    build, resolution = MODELS[name]
    f32 = {k: _stored_images(build("float32"), k, resolution) for k in ("standard", "fused")}
    bf16 = {k: _stored_images(build("bfloat16"), k, resolution) for k in ("standard", "fused")}
    f32_diff = np.abs(f32["fused"] - f32["standard"]).max()
    bf16_diff = np.abs(bf16["fused"] - bf16["standard"])
    err = {k: np.abs(bf16[k] - f32["standard"]) for k in bf16}
    print(f"{name} stored uint8: float32 fused vs standard max {f32_diff} level(s); bfloat16 fused vs "
          f"standard max {bf16_diff.max()} ({(bf16_diff > 0).mean():.0%} of values differ); bfloat16 "
          f"vs float32: standard max {err['standard'].max()} mean {err['standard'].mean():.3f}, "
          f"fused max {err['fused'].max()} mean {err['fused'].mean():.3f}")
    assert f32_diff <= 1
    assert err["fused"].max() <= err["standard"].max()
    assert err["fused"].mean() <= err["standard"].mean() * 1.02


def test_option_selects_the_attention_of_the_loaded_model():
    assert load_model(gen_cfg(attention="fused")).attention == "fused"
    assert load_model(gen_cfg()).attention == "standard"  # auto on CPU
    model = load_model(gen_cfg(attention="memory_efficient"))
    assert model.attention == "memory_efficient" and model.unet.use_memory_efficient_attention
    assert [attn.resolve("auto", p) for p in ("cpu", "gpu", "tpu")] == ["standard", "fused", "standard"]
    before = collections.Counter(attn.FUSED_TRACES)
    model = load_model(gen_cfg(attention="fused"))
    x = jax.ShapeDtypeStruct((1, 4, 16, 16), jnp.float32)
    jax.eval_shape(model.predict, model.params["unet"], x, 1,
                   jax.ShapeDtypeStruct((1, 77, 32), jnp.float32))
    jax.eval_shape(model.decode, model.params["vae"], x)
    assert (attn.FUSED_TRACES["unet"] - before["unet"], attn.FUSED_TRACES["vae"] - before["vae"]) \
        == LAYERS["tiny"]


def test_cudnn_refusal_falls_back_to_xla(monkeypatch):
    """On a GPU, a shape cuDNN refuses (here: no cuDNN at all) still computes, with XLA's kernel."""
    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((2, 16, 2, 8)), jnp.bfloat16)
               for i in range(3))
    want = attn.fused_attention(q, k, v, 8 ** -0.5)
    monkeypatch.setattr(attn, "_implementation", lambda dtype: "cudnn")
    np.testing.assert_array_equal(np.asarray(attn.fused_attention(q, k, v, 8 ** -0.5), np.float32),
                                  np.asarray(want, np.float32))


def test_config_validates_the_option_and_refuses_the_old_key():
    config = base_config()
    assert config.generation.attention == "auto"
    config.generation.attention = "flash"
    with pytest.raises(ConfigError, match="generation.attention.*auto, standard, memory_efficient, fused"):
        validate(config)
    with pytest.raises(ConfigError, match="memory_efficient_attention was replaced.*"
                                          "generation.attention='memory_efficient'"):
        apply_overrides(base_config(), ["generation.memory_efficient_attention=True"])
    config = base_config()
    config.generation.memory_efficient_attention = True
    with pytest.raises(ConfigError, match="was replaced"):
        validate(config)


def test_fingerprint_records_fused_and_memory_efficient():
    def fields(kind):
        return fingerprint_fields(gen_cfg(attention=kind), seed=0, class_names=["a"],
                                  image_shape=(32, 32, 3))

    assert fields("standard") == fields("auto") and "attention" not in fields("auto")  # auto: CPU
    assert fields("fused") == {**fields("standard"), "attention": "fused"}
    assert fields("memory_efficient")["memory_efficient_attention"] is True
    assert fields("fused")["memory_efficient_attention"] is False


def test_memory_plan_line_from_the_compiled_program():
    """The plan's memory line: bytes at batch_per_device and the largest micro-batch that fits a
    device of the given capacity; nothing on CPU, which reports no capacity."""
    from sdcil_jax.generation.memory import GIB, memory_plan

    for kind in ("standard", "fused"):
        engine = Engine(load_model(gen_cfg(attention=kind, resolution=16)), gen_cfg(resolution=16),
                        seed=0, devices=jax.devices()[:2])
        assert memory_plan(engine, (8, 8, 3)) == ""  # CPU: no bytes_limit, nothing compiled
        assert engine.traces == 0
        line = memory_plan(engine, (8, 8, 3), capacity=GIB)
        print(line)
        assert line.startswith("plan: device memory ") and "batch_per_device=2" in line
        assert f"{kind} attention" in line
        largest = int(line.rsplit(": ", 1)[1])
        assert largest > 2

"""Generation with the tiny offline Stable Diffusion on 4 fake CPU devices."""

import logging
import os
import time

import jax
import numpy as np
import pytest

from sdcil_jax.config import base_config
from sdcil_jax.errors import GenerationError
from sdcil_jax.generation import (
    ReplayStore,
    Sampler,
    class_prompts,
    generate_replay_pool,
    initial_latents,
    load_pipeline,
    prompts_for_indices,
    save_tiny_pipeline,
)
from sdcil_jax.generation import pool as pool_module

NAMES = ["apple", "aquarium_fish", "baby", "bear"]
SHAPE = (8, 8, 3)


def tiny_cfg(**overrides):
    g = base_config().generation
    g.backend = "tiny_sd"
    g.dtype = "float32"
    g.resolution = 32
    g.num_inference_steps = 2
    g.per_class = 3
    g.batch_per_device = 1
    g.preview_per_class = 2
    for key, value in overrides.items():
        g[key] = value
    return g


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline(tiny_cfg())


def test_prompts_cycle_templates():
    templates = ["a photo of a {}", "a drawing of a {}"]
    assert class_prompts("aquarium_fish", templates) == [
        "a photo of a aquarium fish", "a drawing of a aquarium fish"]
    assert prompts_for_indices("bear", templates, [0, 1, 2, 5]) == [
        "a photo of a bear", "a drawing of a bear", "a photo of a bear", "a drawing of a bear"]


def test_initial_latents_follow_the_key_recipe():
    shape = (4, 16, 16)
    got = initial_latents(7, 3, [0, 5], shape)
    for row, index in zip(got, [0, 5], strict=True):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), 3), index)
        np.testing.assert_array_equal(row, np.asarray(jax.random.normal(key, shape)))


def test_images_independent_of_devices_and_batch_size(tiny):
    pipe, params = tiny
    assert jax.local_device_count() == 4
    idx = [0, 1, 2, 3, 4]
    prompts = prompts_for_indices("bear", ["a photo of a {}"], idx)
    one = jax.local_devices()[:1]
    runs = {
        "4dev_b1": Sampler(pipe, params, tiny_cfg(batch_per_device=1), seed=0),
        "1dev_b1": Sampler(pipe, params, tiny_cfg(batch_per_device=1), seed=0, devices=one),
        "1dev_b2": Sampler(pipe, params, tiny_cfg(batch_per_device=2), seed=0, devices=one),
    }
    floats = {k: s.generate_float(3, prompts, idx) for k, s in runs.items()}
    ref = floats["4dev_b1"]
    assert ref.shape == (5, 32, 32, 3) and ref.dtype == np.float32
    assert np.isfinite(ref).all() and 0.0 <= ref.min() and ref.max() <= 1.0
    assert np.abs(ref[0] - ref[1]).max() > 1e-3  # different indices, different images
    for key, value in floats.items():
        np.testing.assert_allclose(value, ref, atol=1e-5, rtol=0, err_msg=key)
    ref_u8 = runs["4dev_b1"].generate(3, prompts, idx, SHAPE)
    assert ref_u8.shape == (5, *SHAPE) and ref_u8.dtype == np.uint8
    for key in ("1dev_b1", "1dev_b2"):
        other = runs[key].generate(3, prompts, idx, SHAPE).astype(int)
        assert np.abs(other - ref_u8.astype(int)).max() <= 1, key
    # a single image regenerated alone equals its copy in the batch; another class differs
    alone = runs["1dev_b1"].generate_float(3, prompts[4:], [4])
    np.testing.assert_allclose(alone[0], ref[4], atol=1e-5, rtol=0)
    assert np.abs(runs["4dev_b1"].generate_float(2, prompts[:1], [0])[0] - ref[0]).max() > 1e-3


class _CountingSampler(Sampler):
    calls: list = []
    fail_on_class = None

    def generate(self, class_id, prompts_per_image, indices, out_hw_c):
        if class_id == _CountingSampler.fail_on_class:
            raise KeyboardInterrupt("killed")
        _CountingSampler.calls.append(int(class_id))
        return super().generate(class_id, prompts_per_image, indices, out_hw_c)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setattr(pool_module, "Sampler", _CountingSampler)
    _CountingSampler.calls = []
    _CountingSampler.fail_on_class = None
    return _CountingSampler


def _pool(cfg, store_dir, class_ids=(0, 1, 2)):
    return generate_replay_pool(cfg, seed=0, class_ids=list(class_ids), class_names=NAMES,
                                image_shape=SHAPE, store_dir=str(store_dir), progress=False)


def test_killed_run_resumes_only_unfinished_shards(tmp_path, counting, tiny):
    cfg = tiny_cfg()
    counting.fail_on_class = 1
    with pytest.raises(KeyboardInterrupt):
        _pool(cfg, tmp_path)
    assert counting.calls == [0]
    store = ReplayStore(str(tmp_path)).open()
    assert store.class_ids() == [0]
    mtime0 = os.stat(store.shard_path(0)).st_mtime_ns
    # a shard written but never listed in the manifest (killed in between) is unfinished
    np.savez(store.shard_path(2), images=np.zeros((3, *SHAPE), np.uint8), indices=np.arange(3))

    counting.fail_on_class = None
    counting.calls = []
    store = _pool(cfg, tmp_path)
    assert counting.calls == [1, 2]
    assert os.stat(store.shard_path(0)).st_mtime_ns == mtime0
    assert store.class_ids() == [0, 1, 2]
    for c in (0, 1, 2):
        images = store.load(c)
        assert images.shape == (3, *SHAPE) and images.dtype == np.uint8
    assert store.load(2).any()  # regenerated, not the zeros left behind
    assert os.path.isfile(os.path.join(str(tmp_path), "preview.png"))

    counting.calls = []
    _pool(cfg, tmp_path)
    assert counting.calls == []  # nothing left to do

    # growing per_class generates only the new indices and keeps the old images
    old = store.load(0)
    counting.calls = []
    grown = _pool(tiny_cfg(per_class=5), tmp_path, class_ids=[0])
    assert counting.calls == [0]  # images 3 and 4 only: one batch of the 4 devices
    images, indices = grown.load_with_indices(0)
    assert list(indices) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(images[:3], old)


def test_corrupt_shard_is_warned_and_regenerated(tmp_path, counting, tiny, caplog):
    cfg = tiny_cfg()
    store = _pool(cfg, tmp_path, class_ids=[0, 1])
    good = store.load(1)
    path = store.shard_path(1)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 40)
        f.write(b"\xff" * 16)
    with pytest.raises(GenerationError, match="rerun --mode generate"):
        ReplayStore(str(tmp_path)).open().load(1)

    counting.calls = []
    with caplog.at_level(logging.WARNING):
        store = _pool(cfg, tmp_path, class_ids=[0, 1])
    assert counting.calls == [1]
    assert any("checksum" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(store.load(1), good)  # same keys, same pixels


def test_changed_config_is_refused(tmp_path):
    cfg = tiny_cfg(per_class=1)
    ReplayStore(str(tmp_path)).open_or_create(
        pool_module.fingerprint_fields(cfg, seed=0, class_names=NAMES, image_shape=SHAPE))
    with pytest.raises(GenerationError, match="guidance_scale.*store_dir"):
        _pool(tiny_cfg(per_class=1, guidance_scale=3.0), tmp_path)


def test_sd_backend_loads_a_saved_pipeline(tmp_path, tiny):
    folder = save_tiny_pipeline(str(tmp_path / "tiny_sd_pipeline"))
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    cfg = tiny_cfg(backend="sd", model=folder, revision="flax")
    pipe, params = load_pipeline(cfg)
    one = jax.local_devices()[:1]
    loaded = Sampler(pipe, params, cfg, seed=0, devices=one)
    image = loaded.generate_float(1, ["a photo of a bear"], [0])
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    built = Sampler(*tiny, tiny_cfg(), seed=0, devices=one).generate_float(
        1, ["a photo of a bear"], [0])
    np.testing.assert_allclose(image, built, atol=1e-5, rtol=0)


def test_sd_backend_offline_hub_id_fails_fast_and_clearly():
    cfg = tiny_cfg(backend="sd", model="CompVis/stable-diffusion-v1-4", revision="flax")
    start = time.monotonic()
    with pytest.raises(GenerationError) as info:
        load_pipeline(cfg)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "CompVis/stable-diffusion-v1-4" in msg and "huggingface-cli download" in msg
    assert "local" in msg and "model_index.json" not in msg


def test_sd_backend_missing_local_folder(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(GenerationError, match="Local model folder .* does not exist"):
        load_pipeline(tiny_cfg(backend="sd", model=missing))
    with pytest.raises(GenerationError, match="no model_index.json"):
        load_pipeline(tiny_cfg(backend="sd", model=str(tmp_path)))

"""The replay store, the real_holdout backend and small helpers (no diffusion model compiled)."""

import json
import logging
import os
import pickle

import numpy as np
import pytest

from sdcil_jax.config import base_config, choices, validate
from sdcil_jax.errors import ConfigError, GenerationError, UserError
from sdcil_jax.fingerprint import fingerprint_of
from sdcil_jax.generation import (
    BACKENDS,
    SCHEDULERS,
    ReplayStore,
    fingerprint_fields,
    generate_replay_pool,
    solver_table,
    to_uint8,
)
from sdcil_jax.generation import pipeline as sd_pipeline
from sdcil_jax.generation import shards as shard_lib
from sdcil_jax.generation.engine import ClassJob, plan_steps
from sdcil_jax.generation.pool import assign_shards, plan_shards
from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE


def holdout_cfg(**overrides):
    g = base_config().generation
    g.backend = "real_holdout"
    g.per_class = 4
    g.preview_per_class = 3
    for key, value in overrides.items():
        g[key] = value
    return g


def fake_real_images(class_id, n=6, shape=(8, 8, 1)):
    rng = np.random.default_rng(class_id)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_real_holdout_writes_the_real_images(tmp_path):
    extra = {"dataset": "digits", "holdout_per_class": 6}
    store = generate_replay_pool(
        holdout_cfg(images_per_shard=3), seed=0, class_ids=[3, 7],
        class_names=[str(i) for i in range(10)], image_shape=(8, 8, 1), store_dir=str(tmp_path),
        real_images_fn=fake_real_images, progress=False, fingerprint_extra=extra,
    )
    for c in (3, 7):
        np.testing.assert_array_equal(store.load(c), fake_real_images(c)[:4])
        assert [n for n, _ in store.shards(c)] == [f"class_{c:05d}_000000.shard",
                                                   f"class_{c:05d}_000003.shard"]
    np.testing.assert_array_equal(store.load(7, count=2), fake_real_images(7)[:2])
    with open(os.path.join(str(tmp_path), "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["fields"]["dataset"] == "digits" and manifest["codec"] == "raw"
    assert manifest["fields"]["store_format"] == "raw" and manifest["format_version"] == 2
    assert manifest["fingerprint"] == fingerprint_of(manifest["fields"])
    entry = manifest["shards"]["class_00003_000000.shard"]
    assert entry["count"] == 3 and len(entry["sha256"]) == 64 and entry["process"] == 0
    assert os.path.isfile(os.path.join(str(tmp_path), "preview.png"))
    assert not [n for n in os.listdir(str(tmp_path)) if n.startswith(".tmp")]

    with pytest.raises(GenerationError, match="holdout_per_class"):  # other holdout settings
        generate_replay_pool(
            holdout_cfg(), seed=0, class_ids=[3], class_names=[str(i) for i in range(10)],
            image_shape=(8, 8, 1), store_dir=str(tmp_path), real_images_fn=fake_real_images,
            progress=False, fingerprint_extra={"dataset": "digits", "holdout_per_class": 8},
        )


def test_real_holdout_too_few_images(tmp_path):
    with pytest.raises(GenerationError, match="holdout_per_class"):
        generate_replay_pool(
            holdout_cfg(per_class=10), seed=0, class_ids=[0], class_names=["zero"],
            image_shape=(8, 8, 1), store_dir=str(tmp_path), real_images_fn=fake_real_images,
            progress=False,
        )


def test_store_open_or_create_refuses_other_settings(tmp_path):
    fields = {"backend": "sd", "guidance_scale": 2.0, "seed": 0}
    store = ReplayStore(str(tmp_path)).open_or_create(fields)
    store.write_shard(1, 0, np.ones((2, 4, 4, 3), np.uint8))
    assert ReplayStore(str(tmp_path)).open_or_create(dict(fields)).is_complete(1, 2)
    with pytest.raises(GenerationError) as info:
        ReplayStore(str(tmp_path)).open_or_create({**fields, "guidance_scale": 3.0, "seed": 1})
    msg = str(info.value)
    assert "guidance_scale, seed" in msg and "generation.store_dir" in msg
    assert isinstance(info.value, UserError)


def test_store_shard_states(tmp_path, caplog):
    store = ReplayStore(str(tmp_path)).open_or_create({"backend": "x"})
    assert not store.is_complete(0, 1)
    store.write_shard(0, 2, np.full((2, 4, 4, 1), 9, np.uint8))
    store.write_shard(0, 0, np.full((2, 4, 4, 1), 7, np.uint8))
    assert store.is_complete(0, 4) and not store.is_complete(0, 5)
    images, indices = store.load_with_indices(0)
    assert list(indices) == [0, 1, 2, 3] and images.shape == (4, 4, 4, 1)
    assert (images[:2] == 7).all() and (images[2:] == 9).all()
    with pytest.raises(GenerationError, match="were requested"):
        store.load(0, count=5)
    with pytest.raises(GenerationError, match="no finished shard"):
        store.load(9)
    # a shard file written but not listed (a run killed before its merge) is listed by merge()
    other = ReplayStore(str(tmp_path)).open()
    other.write_shard(5, 0, np.zeros((3, 4, 4, 1), np.uint8), process=1, commit=False)
    assert not ReplayStore(str(tmp_path)).open().is_complete(5, 1)
    reopened = ReplayStore(str(tmp_path)).open()
    assert reopened.merge() == ["class_00005_000000.shard"] and reopened.is_complete(5, 3)
    # a modified shard fails its checksum: warned, incomplete, refused at load time
    with open(store.path("class_00000_000000.shard"), "ab") as f:
        f.write(b"garbage")
    reopened = ReplayStore(str(tmp_path)).open()
    with caplog.at_level(logging.WARNING):
        assert not reopened.is_complete(0, 1)
    assert sum("checksum" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(GenerationError, match="rerun --mode generate"):
        reopened.load(0)


def test_merge_adopts_only_complete_shards_that_hold_new_images(tmp_path, caplog):
    store = ReplayStore(str(tmp_path)).open_or_create({"backend": "x"})
    store.write_shard(0, 0, np.zeros((4, 2, 2, 3), np.uint8))
    data = shard_lib.encode_shard(0, 2, np.ones((2, 2, 2, 3), np.uint8), "raw")  # overlaps 0..3
    (tmp_path / shard_lib.shard_name(0, 2)).write_bytes(data)
    good = shard_lib.encode_shard(1, 0, np.ones((2, 2, 2, 3), np.uint8), "raw", process=3)
    (tmp_path / shard_lib.shard_name(1, 0)).write_bytes(good[:-1])  # cut short
    (tmp_path / shard_lib.shard_name(2, 0)).write_bytes(good)  # named for another class
    with caplog.at_level(logging.WARNING):
        assert store.merge() == []
    assert any("incomplete or corrupt" in r.getMessage() for r in caplog.records)
    (tmp_path / shard_lib.shard_name(1, 0)).write_bytes(good)
    assert store.merge() == [shard_lib.shard_name(1, 0)]
    assert ReplayStore(str(tmp_path)).open().shards(1)[0][1]["process"] == 3


def test_old_format_store_is_refused_with_the_fix(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format_version": 1, "fingerprint": "x", "fields": {}, "shards": {"3": {"count": 4}}}))
    with pytest.raises(GenerationError) as info:
        ReplayStore(str(tmp_path)).open()
    msg = str(info.value)
    assert "old format" in msg and ".npz" in msg and "generation.store_dir" in msg
    assert msg.count(". ") == 0 and msg.endswith("rerun --mode generate.")


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3), (40, 24, 3)])
def test_codecs_round_trip(shape):
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, shape[0] * shape[1] * shape[2]).reshape(shape)
    image = np.clip(smooth + rng.normal(0, 2, shape), 0, 255).astype(np.uint8)
    for codec in ("raw", "png"):
        assert shard_lib.decode(shard_lib.encode(image, codec), codec, shape).tobytes() == \
            image.tobytes()
    back = shard_lib.decode(shard_lib.encode(image, "jpeg"), "jpeg", shape)
    assert back.shape == shape and np.abs(back.astype(int) - image).mean() < 3
    assert shard_lib.resolve_format("auto", (64, 64, 3)) == "raw"
    assert shard_lib.resolve_format("auto", (128, 128, 3)) == "jpeg"
    assert shard_lib.format_field("jpeg") == "jpeg-q95"


def test_reader_decodes_on_demand_and_pickles_small(tmp_path):
    store = ReplayStore(str(tmp_path)).open_or_create({"backend": "x"}, codec="png")
    images = {c: np.random.default_rng(c).integers(0, 256, (6, 16, 16, 3), np.uint8)
              for c in (4, 9)}
    for c, x in images.items():
        store.write_shard(c, 0, x[:4])
        store.write_shard(c, 4, x[4:])
    reader = store.reader([9, 4], 2, 3)
    assert len(reader) == 6 and reader.locate(4) == (4, 3)
    copy = pickle.loads(pickle.dumps(reader))
    assert len(pickle.dumps(reader)) < 2000 and not copy._open
    for k in range(6):
        c, i = reader.locate(k)
        assert copy[k].tobytes() == images[c][i].tobytes()
    assert len(copy._open) <= 8
    with pytest.raises(IndexError):
        reader[6]
    with pytest.raises(GenerationError, match="were requested"):
        store.reader([4], 4, 3)


def test_shards_are_runs_of_missing_indices_within_blocks():
    have = {0: [0, 1, 2, 3], 1: [0, 1, 5]}
    plan = plan_shards(have, [0, 1, 2], per_class=7, per_shard=4)
    assert plan == [(0, 4, 3), (1, 2, 2), (1, 4, 1), (1, 6, 1), (2, 0, 4), (2, 4, 3)]
    assert assign_shards(plan, 2) == [0, 1, 1, 0, 1, 0]  # 3 + 4 + 1 = 8, 2 + 1 + 4 + ... = 7
    assert assign_shards(plan, 1) == [0] * 6


def test_open_missing_store(tmp_path):
    with pytest.raises(GenerationError, match="run --mode generate first"):
        ReplayStore(str(tmp_path / "nothing")).open()


def test_to_uint8_resizes_and_converts_channels():
    images = np.zeros((2, 32, 32, 3), np.float32)
    images[0, ..., 0] = 1.0  # pure red
    images[1] = 1.0  # white
    rgb = to_uint8(images, (8, 8, 3))
    assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.uint8
    assert (rgb[0, ..., 0] == 255).all() and (rgb[0, ..., 1:] == 0).all()
    gray = to_uint8(images, (16, 16, 1))
    assert gray.shape == (2, 16, 16, 1)
    assert abs(int(gray[0, 5, 5, 0]) - round(0.299 * 255)) <= 1 and (gray[1] == 255).all()
    # antialiased: a one-pixel checkerboard averages to mid grey instead of aliasing
    board = (np.indices((32, 32)).sum(0) % 2).astype(np.float32)
    small = to_uint8(np.repeat(board[None, ..., None], 3, -1), (8, 8, 3))
    assert np.abs(small.astype(int) - 128).max() <= 3
    with pytest.raises(GenerationError):
        to_uint8(images, (8, 8, 2))


def test_only_the_flax_deprecation_message_is_silenced():
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        _, _, _, scheduler_cls = sd_pipeline._diffusers()
        scheduler_cls()
        logging.getLogger("diffusers.schedulers.scheduling_ddim_flax").warning("another warning")
    finally:
        root.removeHandler(handler)
    assert not any("Flax classes are deprecated" in m for m in records)
    assert "another warning" in records


def test_unknown_dtype_and_backend():
    cfg = holdout_cfg()
    with pytest.raises(GenerationError, match="no diffusion model"):
        sd_pipeline.load_model(cfg)
    cfg.dtype = "int8"
    with pytest.raises(GenerationError, match="generation.dtype"):
        sd_pipeline.load_model(cfg)


def test_config_choices_come_from_the_registries():
    assert choices()["generation.backend"] == tuple(BACKENDS) == ("sd", "tiny_sd", "real_holdout")
    assert choices()["generation.scheduler"] == SCHEDULERS
    config = base_config()
    assert config.generation.scheduler == "pndm" and config.generation.attention == "auto"
    config.generation.scheduler = "euler"
    with pytest.raises(ConfigError, match="generation.scheduler.*pndm, ddim, dpm_solver"):
        validate(config)


def test_groups_are_aligned_micro_batches_and_steps_are_padded():
    jobs = [ClassJob(5, ("p",), (0, 1, 2)), ClassJob(7, ("p",), (3, 8)), ClassJob(9, ("p",), ())]
    steps = plan_steps(jobs, per_device=2, n_devices=3)
    # class 5: groups {0,1}, {2,3}; class 7: {2,3}, {8,9}; a step mixes classes, the last is padded
    assert [[(jobs[g.job].class_id, g.start) for g in step] for step in steps] == [
        [(5, 0), (5, 2), (7, 2)], [(7, 8), (7, 8), (7, 8)]]
    assert plan_steps(jobs[2:], 2, 3) == []


def test_fingerprint_names_everything_that_changes_pixels():
    g = base_config().generation
    fields = fingerprint_fields(g, seed=0, class_names=["a"], image_shape=(32, 32, 3))
    for key in ("scheduler", "num_inference_steps", "batch_per_device", "dtype", "revision",
                "memory_efficient_attention", "guidance_scale", "resolution", "model", "seed"):
        assert key in fields, key
    assert fields["recipe_version"] == 3 and fields["revision"] == "bf16"  # bf16 weights for bf16
    assert fields["store_format"] == "raw" and "images_per_shard" not in fields  # layout only
    g.store_format = "auto"
    assert fingerprint_fields(g, seed=0, class_names=["a"], image_shape=(256, 256, 3))[
        "store_format"] == "jpeg-q95"
    g.dtype = "float32"
    assert fingerprint_fields(g, seed=0, class_names=["a"], image_shape=(32, 32, 3))[
        "revision"] == "flax"
    holdout = fingerprint_fields(holdout_cfg(), seed=0, class_names=["a"], image_shape=(8, 8, 1))
    assert "scheduler" not in holdout and "batch_per_device" not in holdout


def test_revision_loaded_for_each_dtype_and_source(tmp_path):
    g = base_config().generation  # hub id, revision 'flax', dtype bfloat16
    assert sd_pipeline.effective_revision(g) == "bf16"
    g.bf16_revision = ""
    assert sd_pipeline.effective_revision(g) == "flax"  # load float32 and cast
    g.bf16_revision, g.revision = "bf16", "main"
    assert sd_pipeline.effective_revision(g) == "main"  # an explicit revision is kept
    g.revision, g.model = "flax", str(tmp_path)
    assert sd_pipeline.effective_revision(g) == "flax"  # local folders have no revisions


def test_solver_tables_shapes_and_errors():
    for name in SCHEDULERS:
        table = solver_table(name, SD_V1_SCHEDULE, 50)
        assert table.num_evaluations == 50 + (name == "pndm")
        assert table.timesteps.max() < 1000 and table.timesteps.min() >= 0
    with pytest.raises(GenerationError, match="generation.scheduler"):
        solver_table("euler", SD_V1_SCHEDULE, 10)
    with pytest.raises(GenerationError, match="prediction_type"):
        solver_table("ddim", dict(SD_V1_SCHEDULE, prediction_type="sample"), 10)

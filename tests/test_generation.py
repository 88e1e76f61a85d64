"""Generation with the tiny offline Stable Diffusion on 1, 2 and 4 fake CPU devices."""

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from processes import end_group

from sdcil_jax.config import base_config
from sdcil_jax.errors import GenerationError
from sdcil_jax.generation import (
    SCHEDULERS,
    Engine,
    ReplayStore,
    class_prompts,
    generate_replay_pool,
    initial_latents,
    load_model,
    prompts_for_indices,
    save_tiny_pipeline,
    solver_table,
)
from sdcil_jax.generation import pool as pool_module
from sdcil_jax.generation.sampler import denoise
from sdcil_jax.generation.schedulers import SD_V1_SCHEDULE

NAMES = ["apple", "aquarium_fish", "baby", "bear"]
SHAPE = (8, 8, 3)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(**overrides):
    g = base_config().generation
    g.backend = "tiny_sd"
    g.dtype = "float32"
    g.resolution = 32
    g.num_inference_steps = 2
    g.per_class = 3
    g.batch_per_device = 2
    g.preview_per_class = 2
    for key, value in overrides.items():
        g[key] = value
    return g


def _pool(cfg, store_dir, class_ids=(0, 1, 2), devices=None):
    return generate_replay_pool(cfg, seed=0, class_ids=list(class_ids), class_names=NAMES,
                                image_shape=SHAPE, store_dir=str(store_dir), progress=False,
                                devices=devices)


def _images(store, class_ids=(0, 1, 2)):
    return {c: store.load_with_indices(c) for c in class_ids}


class _Recorder:
    """Wraps pool_module.Engine: records the engines a pool run builds and the classes they ran."""

    def __init__(self, monkeypatch=None):
        self.engines, self.classes, self.shards = [], [], []
        recorder = self

        class Recording(Engine):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                recorder.engines.append(self)

            def run(self, jobs, out_hw_c, sink, **kwargs):
                recorder.classes.extend(j.class_id for j in jobs)
                recorder.shards.extend((j.class_id, j.indices[0]) for j in jobs)
                return super().run(jobs, out_hw_c, sink, **kwargs)

        self.cls = Recording
        if monkeypatch is not None:
            monkeypatch.setattr(pool_module, "Engine", Recording)


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory):
    """Pools of 3 classes x 3 images (B = 2: partial groups, a padded last step), cached by
    (dtype, number of devices); each entry is (store, images, engine traces, writer threads)."""
    cache = {}

    def get(dtype, n_devices):
        if (dtype, n_devices) not in cache:
            recorder = _Recorder()
            original = pool_module.Engine
            pool_module.Engine = recorder.cls
            threads = []
            write = ReplayStore.write_shard

            def spy(self, *args, **kwargs):
                threads.append(threading.current_thread().name)
                return write(self, *args, **kwargs)

            ReplayStore.write_shard = spy
            try:
                folder = tmp_path_factory.mktemp(f"pool_{dtype}_{n_devices}")
                store = _pool(tiny_cfg(dtype=dtype), folder, devices=jax.devices()[:n_devices])
            finally:
                pool_module.Engine = original
                ReplayStore.write_shard = write
            traces = [e.traces for e in recorder.engines]
            cache[dtype, n_devices] = (store, _images(store), traces, threads)
        return cache[dtype, n_devices]

    return get


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


def _toy_model(x, t):
    return 0.5 * jnp.sin(x * 1.3 + t / 300.0) + 0.2 * x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_tables_follow_diffusers_flax_schedulers(name, prediction):
    """The jitted denoising loop over our tables == diffusers' Flax scheduler .step() loop."""
    import diffusers

    config = dict(SD_V1_SCHEDULE, prediction_type=prediction)
    cls = {"pndm": diffusers.FlaxPNDMScheduler, "ddim": diffusers.FlaxDDIMScheduler,
           "dpm_solver": diffusers.FlaxDPMSolverMultistepScheduler}[name]
    x0 = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
    for steps in (3, 7, 16):  # PLMS orders 1..4 and DPM++'s lower-order final step (< 15 steps)
        table = solver_table(name, config, steps)
        ours = jax.jit(lambda x, table=table: denoise(_toy_model, table, x))(x0)
        scheduler = cls.from_config(config)
        state = scheduler.set_timesteps(scheduler.create_state(), steps, x0.shape)
        x = jnp.asarray(x0)
        for t in np.asarray(state.timesteps):
            x, state = scheduler.step(state, _toy_model(x, int(t)), int(t), x, return_dict=False)
        assert table.num_evaluations == len(state.timesteps) == steps + (name == "pndm")
        np.testing.assert_allclose(np.asarray(ours), np.asarray(x), rtol=2e-5, atol=2e-5,
                                   err_msg=f"{name} {prediction} {steps}")


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_stores_are_byte_identical_on_1_2_and_4_devices(device_runs, dtype):
    _, ref, _, _ = device_runs(dtype, 1)
    for images, indices in ref.values():
        assert images.shape == (3, *SHAPE) and images.dtype == np.uint8
        assert list(indices) == [0, 1, 2]
    assert np.abs(ref[0][0][0].astype(int) - ref[0][0][1]).max() > 0  # indices differ
    assert np.abs(ref[0][0][0].astype(int) - ref[1][0][0]).max() > 0  # classes differ
    for n in (2, 4):
        _, got, _, _ = device_runs(dtype, n)
        for c in ref:
            assert got[c][0].tobytes() == ref[c][0].tobytes(), (dtype, n, c)


def test_one_compilation_per_run_and_shards_written_by_the_writer_thread(device_runs):
    # 3 classes x 3 images, 2 per device on 4 devices: 6 groups, 2 steps, the last one padded
    _, _, traces, threads = device_runs("float32", 4)
    assert traces == [1]
    assert threads and all(name.startswith("replay-writer") for name in threads)
    # another run with other classes, counts and a partial group compiles nothing
    engine = Engine(load_model(tiny_cfg()), tiny_cfg(), seed=0, devices=jax.devices()[:4])
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        images = engine.generate(3, ["a photo of a bear"], [4, 0, 9], SHAPE)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert compiles == [] and engine.traces == 1
    _, ref, _, _ = device_runs("float32", 1)
    assert images.shape == (3, *SHAPE)
    np.testing.assert_array_equal(
        engine.generate(1, ["a photo of a aquarium fish"], [2, 0], SHAPE), ref[1][0][[2, 0]])


def test_killed_run_resumes_only_unfinished_shards(tmp_path, monkeypatch, device_runs):
    """Killed while writing the second shard of class 1 (shards of 2 images): the shards written
    before stay, the rerun generates only the others, and the store equals an uninterrupted one."""
    cfg = tiny_cfg(images_per_shard=2)  # 3 classes x 3 images: shards (c, 0..1) and (c, 2)
    recorder = _Recorder(monkeypatch)
    write = ReplayStore.write_shard

    def dies_on_class_1_second_shard(self, class_id, first, *args, **kwargs):
        if (class_id, first) == (1, 2):
            raise KeyboardInterrupt("killed")
        return write(self, class_id, first, *args, **kwargs)

    monkeypatch.setattr(ReplayStore, "write_shard", dies_on_class_1_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _pool(cfg, tmp_path, devices=jax.devices()[:1])  # one shard per step, in plan order
    monkeypatch.setattr(ReplayStore, "write_shard", write)
    written = sorted(p.name for p in tmp_path.glob("class_*.shard"))
    assert written == ["class_00000_000000.shard", "class_00000_000002.shard",
                       "class_00001_000000.shard"]
    assert ReplayStore(str(tmp_path)).open().class_ids() == []  # merged only at the end
    mtimes = {n: os.stat(tmp_path / n).st_mtime_ns for n in written}
    # a shard file cut short (a copy, a full disk) is not adopted but regenerated
    (tmp_path / "class_00002_000002.shard").write_bytes((tmp_path / written[0]).read_bytes()[:50])

    recorder.shards = []
    store = _pool(cfg, tmp_path)
    assert recorder.shards == [(1, 2), (2, 0), (2, 2)]  # only what was not on disk
    assert {n: os.stat(tmp_path / n).st_mtime_ns for n in written} == mtimes
    assert store.class_ids() == [0, 1, 2]
    assert store.class_note(1)["name"] == "aquarium_fish" and store.class_note(1)["prompts"]
    assert ReplayStore(str(tmp_path)).open().class_note(2)["name"] == "baby"  # kept in the manifest
    _, ref, _, _ = device_runs("float32", 4)
    for c in (0, 1, 2):  # same pixels as an uninterrupted run
        np.testing.assert_array_equal(store.load(c), ref[c][0])
    assert os.path.isfile(os.path.join(str(tmp_path), "preview.png"))

    recorder.shards = []
    _pool(cfg, tmp_path)
    assert recorder.shards == []  # nothing left to do

    # growing per_class generates only the new indices and keeps the old images
    old = store.load(0)
    grown = _pool(tiny_cfg(per_class=5, images_per_shard=2), tmp_path, class_ids=[0])
    assert recorder.shards == [(0, 3), (0, 4)]
    images, indices = grown.load_with_indices(0)
    assert list(indices) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(images[:3], old)
    assert all(e.traces == 1 for e in recorder.engines)


def test_corrupt_shard_is_warned_and_regenerated(tmp_path, monkeypatch, caplog):
    cfg = tiny_cfg()
    recorder = _Recorder(monkeypatch)
    store = _pool(cfg, tmp_path, class_ids=[0, 1])
    good = store.load(1)
    path = store.path(store.shards(1)[0][0])
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 40)
        f.write(b"\xff" * 16)
    with pytest.raises(GenerationError, match="rerun --mode generate"):
        ReplayStore(str(tmp_path)).open().load(1)

    recorder.classes = []
    with caplog.at_level(logging.WARNING):
        store = _pool(cfg, tmp_path, class_ids=[0, 1])
    assert recorder.classes == [1]
    assert any("checksum" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(store.load(1), good)  # same keys, same pixels


def test_plan_and_projection_are_printed(tmp_path, capsys):
    _pool(tiny_cfg(images_per_shard=2), tmp_path, class_ids=[0, 1], devices=jax.devices()[:1])
    out = capsys.readouterr().out
    assert "plan: generate 6 images (2 classes x 3) in 4 shards of up to 2; per process: 6" in out
    assert "projected: " in out and "images/s" in out


def test_changed_config_is_refused(tmp_path):
    cfg = tiny_cfg(per_class=1)
    ReplayStore(str(tmp_path)).open_or_create(
        pool_module.fingerprint_fields(cfg, seed=0, class_names=NAMES, image_shape=SHAPE))
    with pytest.raises(GenerationError, match="guidance_scale.*store_dir"):
        _pool(tiny_cfg(per_class=1, guidance_scale=3.0), tmp_path)
    for key, value in (("scheduler", "ddim"), ("batch_per_device", 3)):
        with pytest.raises(GenerationError, match=f"{key}.*store_dir"):
            _pool(tiny_cfg(per_class=1, **{key: value}), tmp_path)


def test_sd_backend_loads_a_saved_pipeline(tmp_path, device_runs):
    folder = save_tiny_pipeline(str(tmp_path / "tiny_sd_pipeline"))
    assert os.path.isfile(os.path.join(folder, "model_index.json"))
    assert not os.path.exists(os.path.join(folder, "safety_checker"))
    cfg = tiny_cfg(backend="sd", model=folder, revision="flax")
    model = load_model(cfg)
    assert model.scheduler_config["skip_prk_steps"] and model.scheduler_config["steps_offset"] == 1
    engine = Engine(model, cfg, seed=0, devices=jax.devices()[:1])
    images = engine.generate(1, ["a photo of a aquarium fish"], [0, 1, 2], SHAPE)
    _, ref, _, _ = device_runs("float32", 1)  # the same model built in code
    assert images.tobytes() == ref[1][0].tobytes()
    # bfloat16 casts the float32 weights after loading (half the memory)
    bf16 = load_model(tiny_cfg(backend="sd", model=folder, dtype="bfloat16"))
    leaves = jax.tree_util.tree_leaves(bf16.params)
    assert {x.dtype for x in leaves if np.issubdtype(x.dtype, np.floating) or
            x.dtype == jnp.bfloat16} == {jnp.dtype(jnp.bfloat16)}


def test_memory_efficient_attention_is_an_option_of_the_unet(device_runs):
    cfg = tiny_cfg(attention="memory_efficient")
    model = load_model(cfg)
    assert model.unet.use_memory_efficient_attention and model.attention == "memory_efficient"
    assert not load_model(tiny_cfg()).unet.use_memory_efficient_attention
    images = Engine(model, cfg, seed=0, devices=jax.devices()[:1]).generate(
        0, ["a photo of a apple"], [0, 1, 2], SHAPE)
    _, ref, _, _ = device_runs("float32", 1)
    assert np.abs(images.astype(int) - ref[0][0]).max() <= 1  # same maths, other summation order


def test_sd_backend_offline_hub_id_fails_fast_and_clearly():
    cfg = tiny_cfg(backend="sd", model="CompVis/stable-diffusion-v1-4", revision="flax")
    start = time.monotonic()
    with pytest.raises(GenerationError) as info:
        load_model(cfg)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert "CompVis/stable-diffusion-v1-4" in msg and "huggingface-cli download" in msg
    assert "local" in msg and "model_index.json" not in msg
    assert "--revision flax" in msg  # float32: the revision as configured
    cfg.dtype = "bfloat16"
    with pytest.raises(GenerationError, match="--revision bf16"):  # bfloat16: half the download
        load_model(cfg)


def test_sd_backend_missing_local_folder(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(GenerationError, match="Local model folder .* does not exist"):
        load_model(tiny_cfg(backend="sd", model=missing))
    with pytest.raises(GenerationError, match="no model_index.json"):
        load_model(tiny_cfg(backend="sd", model=str(tmp_path)))


_TWO_PROCESS_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
from sdcil_jax.config import base_config
from sdcil_jax.generation import generate_replay_pool

g = base_config().generation
g.backend, g.dtype, g.resolution, g.num_inference_steps = "tiny_sd", "bfloat16", 32, 2
g.per_class, g.batch_per_device, g.preview_per_class, g.images_per_shard = 3, 2, 2, 2
store = generate_replay_pool(g, seed=0, class_ids=[0, 1, 2], class_names=sys.argv[4].split(","),
                             image_shape=(8, 8, 3), store_dir=sys.argv[3], progress=False)
print("RESULT", jax.process_count(), jax.device_count(), store.class_ids())
"""


@pytest.mark.slow
def test_two_processes_each_generate_half_of_the_single_process_store(tmp_path, device_runs):
    """2 JAX processes x 4 CPU devices (gloo): each generates and writes its share of the shards on
    its own devices; process 0 merges; the store equals, byte for byte, the one of a single process.
    4 devices per process like the reference's process: XLA:CPU's intra-op parallelism is
    max(cores, devices of the process), and bytes are exact between equal ones (engine docstring)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = tmp_path / "two_process_generation.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    store_dir = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port, str(store_dir),
                               ",".join(NAMES)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for p in procs:
            end_group(p)
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
        assert "RESULT 2 8 [0, 1, 2]" in output, output[-3000:]
    assert "plan: generate 9 images (3 classes x 3) in 6 shards of up to 2; per process: 5 / 4" \
        in outputs[0]
    store = ReplayStore(str(store_dir)).open()
    by_process = {}
    for _, entry in store.shards():
        by_process[entry["process"]] = by_process.get(entry["process"], 0) + entry["count"]
    assert by_process == {0: 5, 1: 4}  # each process about half of the 9 images
    got = _images(store)
    _, ref, _, _ = device_runs("bfloat16", 1)
    for c in ref:
        assert got[c][0].tobytes() == ref[c][0].tobytes(), c

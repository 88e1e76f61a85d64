"""The host input pipeline on grain: determinism, sharding over processes, resume, device arrays,
worker processes (the transforms themselves: test_transforms.py)."""

import itertools
import json
import multiprocessing
import pickle
import threading

import grain
import jax
import numpy as np
import pytest
from image_samples import jpeg, random_image

from sdcil_jax.data import host_pipeline as hp
from sdcil_jax.data import tfds_io
from sdcil_jax.data import transforms as tf
from sdcil_jax.data.sources import ArraySource, PoolSource

SIZE = 24  # output side used in the tests (small for speed)


def _source(n: int, *, encoded: bool = True, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = random_image(rng)
        out.append({"image": jpeg(image) if encoded else image, "label": np.int64(i % 7)})
    return out


def _collect(iterator) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [tuple(np.asarray(x).copy() for x in batch) for batch in iterator]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)


def _pipe(source, **kwargs) -> hp.HostPipeline:
    defaults = dict(
        batch_size=8,
        train=True,
        image_size=SIZE,
        test_resize=28,
        workers=0,  # in-process: worker processes take seconds to start (one test below uses them)
        prefetch=2,
        seed=3,
        process_index=0,
        process_count=1,
    )
    defaults.update(kwargs)
    return hp.HostPipeline(source, **defaults)


SOURCE = _source(21)


# --- determinism, processes, resume -------------------------------------------------------------


def _direct_batches(source, *, train, seed, process_index, process_count, batch_size, epochs,
                    indices=None):
    """The batches the pipeline promises, computed with the pure transforms, image by image."""
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    n, local = len(indices), batch_size // process_count
    steps = n // batch_size if train else -(-n // batch_size)
    out = []
    for epoch in range(epochs):
        order = indices[np.random.default_rng([seed, epoch]).permutation(n)] if train else indices
        for step in range(steps):
            images = np.zeros((local, SIZE, SIZE, 3), np.uint8)
            labels, mask = np.zeros((local,), np.int32), np.zeros((local,), bool)
            for i in range(local):
                pos = step * batch_size + process_index * local + i
                if pos >= n:
                    continue
                example = source[order[pos]]
                if train:
                    rng = np.random.default_rng([seed, epoch, pos])
                    images[i] = tf.train_transform(example["image"], rng, image_size=SIZE)
                else:
                    images[i] = tf.eval_transform(example["image"], image_size=SIZE, resize=28)
                labels[i], mask[i] = example["label"], True
            out.append((images, labels, mask))
    return out


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("process_count", [1, 2])
def test_batches_are_the_pure_transforms_byte_for_byte(train, process_count):
    for seed, process_index in [(3, 0), (11, process_count - 1)]:
        pipe = _pipe(SOURCE, train=train, seed=seed, process_index=process_index,
                     process_count=process_count)
        got = _collect(pipe.iterate(num_epochs=2))
        expected = _direct_batches(SOURCE, train=train, seed=seed, process_index=process_index,
                                   process_count=process_count, batch_size=8, epochs=2)
        for (images, labels, mask), (ref_images, ref_labels, ref_mask) in zip(got, expected, strict=True):
            assert images.dtype == np.uint8 and labels.dtype == np.int32 and mask.dtype == np.bool_
            assert images.tobytes() == ref_images.tobytes()
            np.testing.assert_array_equal(labels, ref_labels)
            np.testing.assert_array_equal(mask, ref_mask)
        assert len(got) == 2 * (21 // 8 if train else 3)
    if train:
        assert not np.array_equal(got[0][0], got[2][0])  # epochs differ (order and augmentation)


def test_worker_processes_give_the_same_batches(monkeypatch):
    """Two grain worker processes (spawned: the source is pickled into them) serve exactly the
    in-process batches, with a PoolSource whose synthetic images reach the workers memory-mapped;
    so do two threads (what a short iteration uses)."""
    from sdcil_jax.data import sources as lazy

    monkeypatch.setattr(lazy, "SHARE_BYTES", 1000)  # share the synthetic images through a file
    rng = np.random.default_rng(4)
    synth = rng.integers(0, 256, (6, 30, 30, 3), dtype=np.uint8)
    pool = PoolSource(SOURCE, np.arange(1, 19), synth, np.arange(24) % 5)
    # Training augmentation, and a padded last batch: 22 examples, 3 batches of 8 per epoch.
    kw = dict(indices=np.arange(2, 24), labels_map=lambda k: k + 10, drop_remainder=False)
    inline = _collect(_pipe(pool, **kw).iterate(num_epochs=2))
    iterator = _pipe(pool, workers=2, **kw).iterate(num_epochs=2)  # 44 images: too few for processes
    threads = _collect(itertools.islice(iterator, 1))
    assert not multiprocessing.active_children()
    _assert_same(threads + _collect(iterator), inline)
    pipe = _pipe(pool, workers=2, min_images_per_process=0, **kw)
    with pipe:
        iterator = pipe.iterate(num_epochs=2)
        workers = _collect(itertools.islice(iterator, 1))
        assert len(multiprocessing.active_children()) == 2
        workers += _collect(iterator)
    _assert_same(workers, inline)
    assert not multiprocessing.active_children()  # stopped at the end of the iteration
    assert len(workers) == 6 and workers[2][2].sum() == 6
    assert pipe.state()["epoch"] == 2 and pipe.state()["step"] == 0
    files = pool.__dict__["_array_files"]
    assert set(files) == {"", "synth_images"}  # labels and rows are small: pickled as they are
    copy = pickle.loads(pickle.dumps(pool))
    assert isinstance(copy.synth_images, np.memmap) and copy[20]["label"] == pool[20]["label"]
    np.testing.assert_array_equal(copy[20]["image"], pool[20]["image"])
    small = pickle.loads(pickle.dumps(ArraySource(synth[:1, :10, :10], np.zeros(1))))  # 300 bytes
    assert not isinstance(small.images, np.memmap)


@pytest.mark.parametrize("train", [True, False])
def test_two_processes_make_the_global_batch(train):
    whole = _collect(_pipe(SOURCE, train=train).iterate(num_epochs=2))
    parts = [
        _collect(
            _pipe(SOURCE, train=train, process_index=p, process_count=2).iterate(num_epochs=2)
        )
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for step, batch in enumerate(whole):
        assert parts[0][step][0].shape[0] == 4
        for field in range(3):
            joined = np.concatenate([parts[0][step][field], parts[1][step][field]])
            np.testing.assert_array_equal(joined, batch[field])


def test_epoch_order_is_a_seeded_permutation_of_the_indices():
    indices = np.arange(3, 19)
    pipe = _pipe(SOURCE, indices=indices)
    order = pipe.epoch_order(5)
    np.testing.assert_array_equal(np.sort(order), indices)
    np.testing.assert_array_equal(order, indices[np.random.default_rng([3, 5]).permutation(16)])
    assert not np.array_equal(order, pipe.epoch_order(6))
    labels = np.concatenate([b.labels for b in pipe.iterate(epoch=5)])
    np.testing.assert_array_equal(labels, order[: labels.size] % 7)


def test_resume_equals_the_uninterrupted_run():
    reference = _collect(_pipe(SOURCE).iterate(epoch=0, num_epochs=3))  # 2 steps per epoch
    for cut in range(1, len(reference)):
        first = _pipe(SOURCE)
        got = []
        for _ in range(3):
            for batch in first:  # the rest of the current epoch
                got.append(tuple(np.asarray(x).copy() for x in batch))
                if len(got) == cut:
                    break
            if len(got) == cut:
                break
        state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
        assert state == {"epoch": cut // 2, "step": cut % 2, "grain": {"next_index": cut}}
        if cut % 2:
            del state["grain"]  # the format before grain is still accepted
        second = _pipe(SOURCE)
        second.restore(state)
        while len(got) < len(reference):
            got += _collect(second)  # one (remaining) epoch at a time
        _assert_same(got, reference)
    started = _pipe(SOURCE, start_epoch=1, start_step=1)
    _assert_same(_collect(started.iterate(num_epochs=2)), reference[3:])
    assert started.state() == {"epoch": 3, "step": 0, "grain": {"next_index": 6}}


@pytest.mark.parametrize("train", [True, False])
def test_state_saved_mid_epoch_resumes_in_a_new_pipeline(train):
    """A state saved mid-epoch (device iterator, batches still in flight) restores into a new
    pipeline that serves exactly the remaining batches; it is grain's iterator state."""
    source = _source(37, seed=2)
    reference = _collect(_pipe(source, train=train).iterate(num_epochs=2))  # 4 (train) or 5 steps
    pipe = _pipe(source, train=train, prefetch=3)
    iterator = pipe.device_iterator(num_epochs=2)
    got = [tuple(np.asarray(x) for x in next(iterator)) for _ in range(6)]
    saved = json.dumps(pipe.state())
    iterator.close()
    resumed = _pipe(source, train=train)
    resumed.restore(json.loads(saved))
    assert resumed.state() == json.loads(saved) and resumed.state()["epoch"] == 1
    got += _collect(resumed.iterate(num_epochs=1))  # the rest of epoch 1
    _assert_same(got, reference)
    # The state is what grain's own iterator over `dataset` accepts and reports.
    inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    grain_iterator = pipe.dataset.to_iter_dataset(inline).__iter__()
    grain_iterator.set_state(json.loads(saved)["grain"])
    np.testing.assert_array_equal(next(grain_iterator)["images"], reference[6][0])
    assert grain_iterator.get_state() == {"next_index": 7}
    bad = dict(json.loads(saved), step=0)
    with pytest.raises(ValueError, match="Invalid pipeline state"):
        resumed.restore(bad)  # grain and epoch/step disagree (e.g. another batch size)
    with pytest.raises(ValueError, match="Invalid pipeline state"):
        resumed.restore({"epoch": 0, "step": 99})


def test_eval_pads_the_last_batch_and_train_drops_it():
    source = _source(10)
    evaluation = _pipe(source, train=False, batch_size=4)
    assert evaluation.steps_per_epoch == len(evaluation) == 3
    batches = _collect(evaluation)
    assert [b[2].tolist() for b in batches][-1] == [True, True, False, False]
    assert all(b[2].all() for b in batches[:-1])
    last_images, last_labels = batches[-1][0], batches[-1][1]
    assert not last_images[2:].any() and last_labels[2:].tolist() == [0, 0]
    np.testing.assert_array_equal(
        np.concatenate([b[1] for b in batches])[:10], np.arange(10) % 7
    )  # evaluation keeps the source order
    assert _pipe(source, batch_size=4).steps_per_epoch == 2
    with pytest.raises(ValueError, match="no full batch"):
        _pipe(source, batch_size=16)
    with pytest.raises(ValueError, match="multiple of the process count"):
        _pipe(source, batch_size=5, process_count=2)


def test_labels_map():
    table = {k: 10 + k for k in range(7)}
    for labels_map in (table, np.arange(10, 17), lambda k: 10 + k):
        labels = _pipe(SOURCE, labels_map=labels_map, train=False).batch(0, 0).labels
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, 10 + np.arange(8) % 7)


# --- devices, tfds ------------------------------------------------------------------------------


def test_device_iterator_gives_sharded_global_arrays(monkeypatch):
    assert jax.device_count() == 4
    pipe = _pipe(SOURCE, train=False, batch_size=8)
    host = _collect(_pipe(SOURCE, train=False, batch_size=8))
    got = list(pipe.device_iterator())
    assert len(got) == len(host) == 3 and pipe.state()["epoch"] == 1 and pipe.state()["step"] == 0
    for batch, ref in zip(got, host, strict=True):
        assert batch.images.shape == (8, SIZE, SIZE, 3) and batch.images.dtype == np.uint8
        assert batch.labels.dtype == np.int32 and batch.mask.dtype == np.bool_
        for array, expected in zip(batch, ref, strict=True):
            assert isinstance(array, jax.Array)
            assert len(array.sharding.device_set) == 4
            assert {s.data.shape[0] for s in array.addressable_shards} == {2}
            np.testing.assert_array_equal(np.asarray(array), expected)
    # Arrays are made in the consuming thread only, `prefetch` batches ahead of the one yielded;
    # stopping early leaves a resumable state (the batches put ahead do not count).
    threads = []
    make_array = jax.make_array_from_process_local_data

    def recording(sharding, x):
        threads.append(threading.current_thread())
        return make_array(sharding, x)

    monkeypatch.setattr(jax, "make_array_from_process_local_data", recording)
    train = _pipe(SOURCE, prefetch=2)
    iterator = train.device_iterator(num_epochs=None)
    first = np.asarray(next(iterator).images)
    assert len(threads) == 3 * 3 and set(threads) == {threading.current_thread()}
    iterator.close()
    assert train.state() == {"epoch": 0, "step": 1, "grain": {"next_index": 1}}
    np.testing.assert_array_equal(first, _pipe(SOURCE).batch(0, 0).images)
    with pytest.raises(ValueError, match="process layout"):
        _pipe(SOURCE, process_count=2).device_iterator()


def test_tfds_mock_imagenet2012_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        # Without TensorFlow the mock can only serve decoded images (numpy arrays of random sizes).
        source = tfds_io.tfds_source("imagenet2012", "train", decode=True)
        pipe = _pipe(source, batch_size=4)
        batches = _collect(pipe.iterate(num_epochs=1))
        reference = [tuple(pipe.batch(0, step)) for step in range(3)]  # random access
    assert len(batches) == 3
    _assert_same(batches, reference)
    for images, labels, mask in batches:
        assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
        assert ((labels >= 0) & (labels < 1000)).all() and mask.all()


def test_prepared_tfds_source_pickles_for_worker_processes(tmp_path):
    """A real ArrayRecord ``tfds.data_source`` (the embedded digits, prepared offline) pickles in a few
    KB and reads the same examples after unpickling, as a grain worker process does."""
    pytest.importorskip("tensorflow_datasets")
    from sdcil_jax.data.digits import SdcilDigits

    SdcilDigits(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    source = tfds_io.tfds_source("sdcil_digits", "train", str(tmp_path))
    blob = pickle.dumps(source)
    assert len(blob) < 64 * 1024
    copy = pickle.loads(blob)
    assert len(copy) == len(source) == 1433
    kw = dict(indices=np.arange(0, 1433, 50), batch_size=4, train=True)
    _assert_same(_collect(_pipe(copy, **kw).iterate()), _collect(_pipe(source, **kw).iterate()))


class _SerializedImagenetSource:
    """Records serialized with the real ``imagenet2012`` features and read back the way a prepared
    ``tfds.data_source`` reads its ArrayRecord files (``features.deserialize_example_np``)."""

    def __init__(self, tfds, images, decoders):
        self.features = tfds.builder("imagenet2012").info.features
        self.decoders = decoders
        self.records = [
            self.features.serialize_example({"image": jpeg(im), "label": i, "file_name": f"{i}.JPEG"})
            for i, im in enumerate(images)
        ]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.features.deserialize_example_np(self.records[i], decoders=self.decoders)


def test_prepared_imagenet2012_records_decode_without_tensorflow():
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(1)
    images = [random_image(rng) for _ in range(6)] + [rng.integers(0, 256, (30, 20), np.uint8)]
    raw = _SerializedImagenetSource(tfds, images, {"image": tfds.decode.SkipDecoding()})
    assert isinstance(raw[0]["image"], bytes)  # what tfds_source(decode=False) hands over
    decoded = _SerializedImagenetSource(tfds, images, None)
    assert decoded[6]["image"].shape == (30, 20, 3)  # tfds decodes grayscale JPEGs to 3 channels
    for train in (True, False):
        a = _collect(_pipe(raw, batch_size=7, train=train).iterate())
        b = _collect(_pipe(decoded, batch_size=7, train=train).iterate())
        _assert_same(a, b)
        if not train:
            np.testing.assert_array_equal(a[0][1], np.arange(7))


_TWO_PROCESS_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
from sdcil_jax.data.host_pipeline import HostPipeline

rng = np.random.default_rng(0)
source = [{"image": rng.integers(0, 256, (int(rng.integers(12, 60)), 40, 3), dtype=np.uint8),
           "label": i} for i in range(21)]
kw = dict(batch_size=8, train=False, image_size=16, test_resize=20, workers=0)
pipe = HostPipeline(source, **kw)
ref = HostPipeline(source, process_index=0, process_count=1, **kw)
ok = pipe.local_batch_size == 4
for step, batch in enumerate(pipe.device_iterator()):
    got = [multihost_utils.process_allgather(x, tiled=True) for x in batch]
    ok &= all(np.array_equal(g, r) for g, r in zip(got, ref.batch(0, step)))
ok &= pipe.state()["epoch"] == 1 and pipe.state()["step"] == 0 and step == 2
print("RESULT", jax.process_count(), jax.device_count(), ok)
"""


def test_device_iterator_in_two_real_processes(tmp_path):
    """Two JAX processes (gloo, 2 CPU devices each) assemble exactly the single-process batches."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script = tmp_path / "two_process.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-2000:]
        assert "RESULT 2 4 True" in output, output[-2000:]

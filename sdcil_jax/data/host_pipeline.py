"""Host-side input pipeline for ImageNet-size data: decode and augment on CPU threads, prefetch to devices.

CIFAR-size datasets live on the devices as uint8 arrays and are augmented inside the jitted step
(:mod:`sdcil_jax.augment`). ImageNet-size data is JPEG-encoded, varies in size and does not fit in
memory, so it is decoded and augmented here, on the host, by a thread pool (PIL releases the GIL while
it decodes and resizes), and handed to the devices as global ``jax.Array`` batches.

Determinism and sharding
  * The order of an epoch is a permutation of ``indices`` drawn from ``np.random.default_rng([seed,
    epoch])`` (identity order when not shuffling); every process computes the same one.
  * Global batch ``s`` is positions ``[s * B, (s + 1) * B)`` of that order. Process ``p`` of ``P`` reads
    and decodes only rows ``[p * B / P, (p + 1) * B / P)`` of it.
  * The random draws of the image at global position ``i`` come from ``np.random.default_rng([seed,
    epoch, i])``, so a batch does not depend on the number of workers or processes.
  * Training drops the last partial batch; evaluation pads it with zero images and exposes a validity
    mask (``Batch.mask``; all ``True`` for full batches).
  * :meth:`HostPipeline.state` is the position ``{'epoch', 'step'}`` of the next batch the consumer
    has not received yet; starting there (:meth:`HostPipeline.restore`, or the ``epoch``/``start_step``
    arguments) yields exactly the batches an uninterrupted run would have yielded.

The module depends only on numpy, PIL and jax, and takes any random-access source: an object with
``__len__`` and ``__getitem__(i) -> {'image': ..., 'label': ...}`` where the image is a uint8 array
(H, W), (H, W, 1), (H, W, 3) or (H, W, 4), encoded bytes (JPEG, PNG, ...), a file path or a PIL image.
``tfds.data_source`` is such a source; :func:`sdcil_jax.data.transforms.tfds_source` opens one whose
images come back as the raw encoded bytes (no TensorFlow needed), which this module decodes itself.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdcil_jax.data.transforms import BRIGHTNESS, CROP_RATIO, CROP_SCALE, eval_transform, train_transform


class Batch(NamedTuple):
    """One batch: numpy arrays from :meth:`HostPipeline.iterate`, global jax Arrays from
    :meth:`HostPipeline.device_iterator`."""

    images: Any  # (B, S, S, 3) uint8
    labels: Any  # (B,) int32; 0 where ``mask`` is False
    mask: Any  # (B,) bool; False for the padding of the last evaluation batch


# ----------------------------------------------------------------------------------------------
# The pipeline.
# ----------------------------------------------------------------------------------------------


def _label_mapper(labels_map: Any) -> Callable[[int], int]:
    if labels_map is None:
        return lambda label: label
    if isinstance(labels_map, Mapping):
        table = {int(k): int(v) for k, v in labels_map.items()}
        return lambda label: table[label]
    if callable(labels_map):
        return lambda label: int(labels_map(label))
    lut = np.asarray(labels_map)
    return lambda label: int(lut[label])


class HostPipeline:
    """Sharded, deterministic, resumable host input pipeline (see the module docstring).

    Args:
      source: random-access source, ``source[i] -> {'image': ..., 'label': ...}``.
      indices: rows of ``source`` to use (e.g. the examples of a task's classes); default all.
      labels_map: maps a dataset label to the training label (dict, lookup array or callable).
      batch_size: the GLOBAL batch size; must be divisible by ``process_count``.
      train: random-resized crop + flip + jitter, shuffled order, last partial batch dropped; else
        resize + centre crop, source order, last batch padded (see ``Batch.mask``).
      image_size: output side length. test_resize: shorter side before the evaluation centre crop.
      workers: decoding threads (0: decode in the consuming thread).
      prefetch: batches decoded ahead on the host, and device batches put ahead by
        :meth:`device_iterator`.
      seed: seeds the epoch order and the per-image augmentation.
      process_index, process_count: this process's shard (default: jax's).
      mesh, sharding: where :meth:`device_iterator` puts batches; default ``NamedSharding(mesh,
        PartitionSpec('data'))`` over a 1-D mesh of all devices.
      shuffle: default ``train``. drop_remainder: default ``train``.
      scale, ratio, flip, brightness: training augmentation parameters.
      image_key, label_key: field names in the source's examples.
      start_epoch, start_step: initial :meth:`state` (resume).
    """

    def __init__(
        self,
        source: Any,
        indices: Sequence[int] | np.ndarray | None = None,
        labels_map: Any = None,
        *,
        batch_size: int,
        train: bool,
        image_size: int = 224,
        test_resize: int = 256,
        workers: int = 8,
        prefetch: int = 2,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        mesh: Mesh | None = None,
        sharding: jax.sharding.Sharding | None = None,
        shuffle: bool | None = None,
        drop_remainder: bool | None = None,
        scale: tuple[float, float] = CROP_SCALE,
        ratio: tuple[float, float] = CROP_RATIO,
        flip: bool = True,
        brightness: float = BRIGHTNESS,
        image_key: str = "image",
        label_key: str = "label",
        start_epoch: int = 0,
        start_step: int = 0,
    ):
        self.source = source
        if indices is None:
            indices = np.arange(len(source), dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.num_examples = int(self.indices.size)
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if batch_size <= 0 or batch_size % self.process_count:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of the process count "
                f"{self.process_count}."
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count}).")
        if not train and test_resize < image_size:
            raise ValueError(f"test_resize {test_resize} is smaller than image_size {image_size}.")
        self.batch_size = int(batch_size)
        self.local_batch_size = self.batch_size // self.process_count
        self.train = bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.drop_remainder = self.train if drop_remainder is None else bool(drop_remainder)
        self.image_size = int(image_size)
        self.test_resize = int(test_resize)
        self.workers = int(workers)
        self.prefetch = max(1, int(prefetch))
        self.seed = int(seed)
        self.mesh = mesh
        self.sharding = sharding
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip, self.brightness = bool(flip), float(brightness)
        self.image_key, self.label_key = image_key, label_key
        self._map_label = _label_mapper(labels_map)
        if self.drop_remainder:
            self.steps_per_epoch = self.num_examples // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_examples // self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} examples make no full batch of {self.batch_size}; lower the "
                "batch size or keep the last partial batch (drop_remainder=False)."
            )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._epoch, self._step = 0, 0
        self.restore({"epoch": start_epoch, "step": start_step})

    # -- state ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.steps_per_epoch

    def state(self) -> dict[str, int]:
        """``{'epoch', 'step'}`` of the next batch not yet handed to the consumer."""
        return {"epoch": self._epoch, "step": self._step}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue from a :meth:`state` (e.g. read from a checkpoint)."""
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"Invalid pipeline state {dict(state)} ({self.steps_per_epoch} steps).")
        if step == self.steps_per_epoch:  # a finished epoch is the start of the next one
            epoch, step = epoch + 1, 0
        self._epoch, self._step = epoch, step

    def _advance(self, epoch: int, step: int) -> None:
        if step + 1 >= self.steps_per_epoch:
            self._epoch, self._step = epoch + 1, 0
        else:
            self._epoch, self._step = epoch, step + 1

    # -- order ----------------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Source rows in the order of ``epoch`` (the same in every process)."""
        with self._lock:
            cached = self._order_cache
            if cached is not None and cached[0] == epoch:
                return cached[1]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                order = self.indices[perm]
            else:
                order = self.indices
            self._order_cache = (epoch, order)
            return order

    # -- decoding -------------------------------------------------------------------------------

    def _executor_or_none(self) -> concurrent.futures.ThreadPoolExecutor | None:
        if self.workers <= 0:
            return None
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix="host_pipeline"
                )
            return self._executor

    def load_example(self, epoch: int, position: int, row: int) -> tuple[np.ndarray, int]:
        """Decode and transform source row ``row`` at global ``position`` of ``epoch``."""
        example = self.source[int(row)]
        image = example[self.image_key]
        label = self._map_label(int(np.asarray(example[self.label_key])))
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, position])
            out = train_transform(
                image,
                rng,
                image_size=self.image_size,
                scale=self.scale,
                ratio=self.ratio,
                flip=self.flip,
                brightness=self.brightness,
            )
        else:
            out = eval_transform(image, image_size=self.image_size, resize=self.test_resize)
        return out, label

    def _fill(
        self, images: np.ndarray, labels: np.ndarray, i: int, epoch: int, position: int, row: int
    ) -> None:
        images[i], labels[i] = self.load_example(epoch, position, row)

    def _start_batch(self, epoch: int, step: int):
        size = self.image_size
        images = np.zeros((self.local_batch_size, size, size, 3), np.uint8)
        labels = np.zeros((self.local_batch_size,), np.int32)
        mask = np.zeros((self.local_batch_size,), bool)
        order = self.epoch_order(epoch)
        first = step * self.batch_size + self.process_index * self.local_batch_size
        executor = self._executor_or_none()
        futures = []
        for i in range(self.local_batch_size):
            position = first + i
            if position >= self.num_examples:
                continue  # padding of the last evaluation batch
            mask[i] = True
            args = (images, labels, i, epoch, position, order[position])
            if executor is None:
                self._fill(*args)
            else:
                futures.append(executor.submit(self._fill, *args))
        return epoch, step, Batch(images, labels, mask), futures

    def _plan(self, epoch: int, start_step: int, num_epochs: int | None) -> Iterator[tuple[int, int]]:
        e, s = epoch, start_step
        while num_epochs is None or e < epoch + num_epochs:
            while s < self.steps_per_epoch:
                yield e, s
                s += 1
            e, s = e + 1, 0

    def _host_batches(self, epoch: int, start_step: int, num_epochs: int | None):
        plan = self._plan(epoch, start_step, num_epochs)
        pending: collections.deque = collections.deque()

        def top_up() -> None:
            while len(pending) < self.prefetch:
                nxt = next(plan, None)
                if nxt is None:
                    return
                pending.append(self._start_batch(*nxt))

        try:
            top_up()
            while pending:
                e, s, batch, futures = pending.popleft()
                for future in futures:
                    future.result()
                top_up()  # keep the workers busy while the consumer uses this batch
                yield e, s, batch
        finally:
            for _, _, _, futures in pending:
                for future in futures:
                    future.cancel()

    def _resolve_start(self, epoch: int | None, start_step: int | None) -> tuple[int, int]:
        if epoch is None:
            epoch = self._epoch
            start_step = self._step if start_step is None else start_step
        start_step = 0 if start_step is None else int(start_step)
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} not in [0, {self.steps_per_epoch}].")
        return int(epoch), start_step

    # -- public iterators -----------------------------------------------------------------------

    def iterate(
        self,
        epoch: int | None = None,
        start_step: int | None = None,
        num_epochs: int | None = 1,
    ) -> Iterator[Batch]:
        """Local numpy batches from ``(epoch, start_step)`` (default: :meth:`state`) to the end of
        that epoch, or of ``num_epochs`` epochs (``None``: forever). Updates :meth:`state` as each
        batch is handed over."""
        epoch, start_step = self._resolve_start(epoch, start_step)

        def generate() -> Iterator[Batch]:
            for e, s, batch in self._host_batches(epoch, start_step, num_epochs):
                self._advance(e, s)
                yield batch

        return generate()

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch (so ``for epoch ...: for batch in pipeline:`` works)."""
        return self.iterate()

    def batch(self, epoch: int, step: int) -> Batch:
        """One local batch, without touching :meth:`state` (for inspection and tests)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} not in [0, {self.steps_per_epoch}).")
        _, _, batch, futures = self._start_batch(epoch, step)
        for future in futures:
            future.result()
        return batch

    def default_sharding(self) -> jax.sharding.Sharding:
        """``self.sharding``, else ``NamedSharding(mesh, PartitionSpec('data'))``."""
        if self.sharding is not None:
            return self.sharding
        mesh = self.mesh if self.mesh is not None else Mesh(np.array(jax.devices()), ("data",))
        return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))

    def device_iterator(
        self,
        epoch: int | None = None,
        start_step: int | None = None,
        num_epochs: int | None = 1,
        sharding: jax.sharding.Sharding | None = None,
    ) -> Iterator[Batch]:
        """Like :meth:`iterate`, but yields global jax Arrays (batch axis sharded), built with
        ``jax.make_array_from_process_local_data`` in a background thread, ``prefetch`` ahead.

        Needs ``process_count == jax.process_count()``.
        """
        if self.process_count != jax.process_count():
            raise ValueError(
                f"device_iterator needs the real process layout: pipeline process_count "
                f"{self.process_count}, jax.process_count() {jax.process_count()}."
            )
        sharding = self.default_sharding() if sharding is None else sharding
        local_devices = len(sharding.addressable_devices)
        if self.local_batch_size % local_devices:
            raise ValueError(
                f"local batch {self.local_batch_size} is not divisible by this process's "
                f"{local_devices} devices."
            )
        epoch, start_step = self._resolve_start(epoch, start_step)
        host = self._host_batches(epoch, start_step, num_epochs)
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for e, s, batch in host:
                    arrays = Batch(*(jax.make_array_from_process_local_data(sharding, x) for x in batch))
                    if not put((e, s, arrays)):
                        return
                put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)
            finally:
                host.close()

        thread = threading.Thread(target=produce, name="host_pipeline_device_put", daemon=True)

        def generate() -> Iterator[Batch]:
            thread.start()
            try:
                while True:
                    item = out.get()
                    if item is done:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    e, s, arrays = item
                    self._advance(e, s)
                    yield arrays
            finally:
                stop.set()
                thread.join(timeout=60)

        return generate()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the decoding threads (a later iteration starts new ones)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> HostPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

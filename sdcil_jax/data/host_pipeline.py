"""Host-side input pipeline for ImageNet-size data: decode and augment in grain worker processes, put
batches on the devices from the consuming thread.

CIFAR-size datasets live on the devices as uint8 arrays and are augmented inside the jitted step
(:mod:`sdcil_jax.augment`). ImageNet-size data is JPEG-encoded, varies in size and does not fit in
memory, so it is decoded and augmented here, on the host, with the pure transforms of
:mod:`sdcil_jax.data.transforms`, and handed to the devices as global ``jax.Array`` batches.

Why grain: it is the data loader the JAX ecosystem maintains (MaxText uses it); its worker processes
sidestep the GIL (the thread pool used before held it for an estimated tenth of each image's time, so
it could not scale past about ten cores); and its iterators are checkpointable. The pipeline is a
grain ``MapDataset`` whose element ``g`` is this process's part of global batch ``g``, built as
``range -> map(BatchReader: read and transform one image) -> batch``
(:mod:`sdcil_jax.data.batch_reader`), iterated in this process (``workers=0``) or by ``workers``
spawned worker processes (``mp_prefetch``), each decoding whole batches; iterations too short to pay
for starting processes (the images of one class) use as many threads of this process instead.

Guarantees
  * Determinism: the order of an epoch is a permutation of ``indices`` drawn from
    ``np.random.default_rng([seed, epoch])`` (identity order when not shuffling); global batch ``s``
    is positions ``[s * B, (s + 1) * B)`` of that order; the random draws of the image at global
    position ``i`` come from ``np.random.default_rng([seed, epoch, i])``. So a batch depends neither
    on the number of worker processes nor on the number of JAX processes.
  * Sharding: process ``p`` of ``P`` reads and decodes only rows ``[p * B / P, (p + 1) * B / P)`` of
    every global batch.
  * Training drops the last partial batch; evaluation pads it with zero images and exposes a validity
    mask (``Batch.mask``; all ``True`` for full batches).
  * Resume: :meth:`HostPipeline.state` is the position of the next batch the consumer has not
    received yet, as ``{'epoch', 'step', 'grain': {'next_index'}}`` where ``grain`` is the state of
    grain's iterator over :attr:`HostPipeline.dataset` (JSON-able). Restoring it
    (:meth:`HostPipeline.restore`, or the ``epoch``/``start_step`` arguments) yields exactly the
    batches an uninterrupted run would have yielded, whatever the worker count.
  * No JAX call leaves the consuming thread: :meth:`HostPipeline.device_iterator` puts the next
    batches on the devices (asynchronously) before it yields the current one.

Sources: any random-access object with ``__len__`` and ``__getitem__(i) -> {'image': ..., 'label':
...}`` (see :mod:`sdcil_jax.data.transforms` for the image formats). With ``workers > 0`` it is
pickled (cloudpickle) into every worker process when an iteration starts: ``tfds.data_source``
pickles in a few KB, :class:`sdcil_jax.data.sources.PoolSource` and ``ArraySource`` hand their large
arrays over as memory-mapped files. Worker processes are spawned, so a script that iterates with
``workers > 0`` needs the ``if __name__ == '__main__':`` guard.
"""

from __future__ import annotations

import collections
import itertools
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdcil_jax.data.batch_reader import BatchReader, LabelMap
from sdcil_jax.data.transforms import BRIGHTNESS, CROP_RATIO, CROP_SCALE

# Global batches a pipeline can serve (about 1e12): iterations without an end stop there.
MAX_BATCHES = 1 << 40
# Each image is read in the thread that asks grain for it: the consumer's thread (workers=0) or a
# worker process's main thread (parallelism comes from the processes, one batch each).
_READ_INLINE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class Batch(NamedTuple):
    """One batch: numpy arrays from :meth:`HostPipeline.iterate`, global jax Arrays from
    :meth:`HostPipeline.device_iterator`."""

    images: Any  # (B, S, S, 3) uint8
    labels: Any  # (B,) int32; 0 where ``mask`` is False
    mask: Any  # (B,) bool; False for the padding of the last evaluation batch


def _allow_unparsed_absl_flags() -> None:
    """grain 0.2.18 reads the absl flag ``--grain_enable_multiprocess_worker_profiling`` when a worker
    starts, which fails in programs that do not parse absl flags (google/grain#1355, fixed upstream
    by falling back to the default). Do the same: mark that one flag as set, to its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS["grain_enable_multiprocess_worker_profiling"].present = True


class HostPipeline:
    """Sharded, deterministic, resumable host input pipeline on grain (see the module docstring).

    Args:
      source: random-access source, ``source[i] -> {'image': ..., 'label': ...}``.
      indices: rows of ``source`` to use (e.g. the examples of a task's classes); default all.
      labels_map: maps a dataset label to the training label (dict, lookup array or callable).
      batch_size: the GLOBAL batch size; must be divisible by ``process_count``.
      train: random-resized crop + flip + jitter, shuffled order, last partial batch dropped; else
        resize + centre crop, source order, last batch padded (see ``Batch.mask``).
      image_size: output side length. test_resize: shorter side before the evaluation centre crop.
      workers: grain worker processes decoding whole batches (0: decode in the consuming thread).
        Each iteration starts its own (at most one per batch it serves), which costs a few seconds
        (a fresh interpreter imports grain, JAX and the source's modules).
      min_images_per_process: an iteration that decodes fewer images than this per worker (say the
        images of one class, for herding) runs ``workers`` threads in this process instead of
        worker processes, whose start would cost more than the decoding (0: always processes).
      prefetch: batches decoded ahead on the host (spread over the workers), and device batches put
        ahead by :meth:`device_iterator`.
      seed: seeds the epoch order and the per-image augmentation.
      process_index, process_count: this process's shard (default: jax's).
      mesh, sharding: where :meth:`device_iterator` puts batches; default ``NamedSharding(mesh,
        PartitionSpec('data'))`` over a 1-D mesh of all devices.
      shuffle: default ``train``. drop_remainder: default ``train``.
      scale, ratio, flip, brightness: training augmentation parameters.
      image_key, label_key: field names in the source's examples.
      start_epoch, start_step: initial :meth:`state` (resume).

    Attributes:
      dataset: the grain ``MapDataset`` of this process's batches: element ``g`` is a dict of
        ``images``, ``labels``, ``mask`` for step ``g % steps_per_epoch`` of epoch
        ``g // steps_per_epoch``.
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
        min_images_per_process: int = 4096,
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
        self.workers = max(0, int(workers))
        self.min_images_per_process = int(min_images_per_process)
        self.prefetch = max(1, int(prefetch))
        self.seed = int(seed)
        self.mesh = mesh
        self.sharding = sharding
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip, self.brightness = bool(flip), float(brightness)
        self.image_key, self.label_key = image_key, label_key
        if self.drop_remainder:
            self.steps_per_epoch = self.num_examples // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_examples // self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_examples} examples make no full batch of {self.batch_size}; lower the "
                "batch size or keep the last partial batch (drop_remainder=False)."
            )
        self.reader = BatchReader(
            source, self.indices, LabelMap(labels_map), seed=self.seed, shuffle=self.shuffle,
            train=self.train, batch_size=self.batch_size, process_index=self.process_index,
            process_count=self.process_count, steps_per_epoch=self.steps_per_epoch,
            image_size=self.image_size, test_resize=self.test_resize,
            transform=dict(scale=self.scale, ratio=self.ratio, flip=self.flip, brightness=self.brightness),
            image_key=image_key, label_key=label_key,
        )
        slots = grain.MapDataset.range(MAX_BATCHES * self.local_batch_size)
        self.dataset = slots.map(self.reader).batch(self.local_batch_size)
        self._iterators: weakref.WeakSet = weakref.WeakSet()  # open grain iterators, for close()
        self._next = 0  # global index of the next batch to hand over
        self.restore({"epoch": start_epoch, "step": start_step})

    # -- state ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.steps_per_epoch

    def state(self) -> dict[str, Any]:
        """The position of the next batch not yet handed to the consumer, JSON-able:
        ``{'epoch': e, 'step': s, 'grain': {'next_index': e * steps_per_epoch + s}}``.

        ``grain`` is what grain's iterator over :attr:`dataset` reports (``get_state()``) after the
        batches handed over so far, and accepts (``set_state()``) to continue from there. It does not
        depend on the worker count, unlike the state of an ``mp_prefetch`` iterator (one position per
        worker), so a run may resume with another ``workers``.
        """
        epoch, step = divmod(self._next, self.steps_per_epoch)
        return {"epoch": epoch, "step": step, "grain": {"next_index": self._next}}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state` (e.g. read from a checkpoint); a ``{'epoch', 'step'}`` dict
        (the format before grain) is accepted too. Raises ValueError on an invalid state, or if
        ``grain`` disagrees with ``epoch``/``step`` (a state of a pipeline with another number of
        steps per epoch)."""
        spe = self.steps_per_epoch
        position = None
        if "epoch" in state or "step" in state:
            epoch, step = int(state["epoch"]), int(state["step"])
            if epoch < 0 or not 0 <= step <= spe:  # step == spe: the start of the next epoch
                raise ValueError(f"Invalid pipeline state {dict(state)} ({spe} steps per epoch).")
            position = epoch * spe + step
        if "grain" in state:
            next_index = int(state["grain"]["next_index"])
            if next_index < 0 or position not in (None, next_index):
                raise ValueError(f"Invalid pipeline state {dict(state)} ({spe} steps per epoch).")
            position = next_index
        if position is None:
            raise ValueError(f"Pipeline state {dict(state)} has neither 'epoch'/'step' nor 'grain'.")
        self._next = position

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Source rows in the order of ``epoch`` (the same in every process)."""
        return self.reader.epoch_order(epoch)

    def load_example(self, epoch: int, position: int, row: int) -> tuple[np.ndarray, int]:
        """Decode and transform source row ``row`` at global ``position`` of ``epoch``."""
        return self.reader.load_example(epoch, position, row)

    # -- grain iteration ------------------------------------------------------------------------

    def _host_batches(self, first: int, stop: int) -> Iterator[tuple[int, Batch]]:
        """``(g, local batch g)`` for ``g`` in ``[first, stop)``, decoded by grain."""
        count = stop - first
        workers = min(self.workers, count)
        if count <= 0:
            return
        if workers == 0:
            iterator = self.dataset.to_iter_dataset(_READ_INLINE).__iter__()
            iterator.set_state({"next_index": first})
        elif count * self.local_batch_size < workers * self.min_images_per_process:
            # Too short to pay for starting processes: `workers` threads of this process (PIL
            # releases the GIL), each decoding whole batches. The slice ends their work at `stop`.
            threads = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(workers, self.prefetch))
            iterator = self.dataset[first:stop].to_iter_dataset(threads).__iter__()
        else:
            # Worker w decodes batches first + w, first + w + workers, ...; grain interleaves them
            # back in order. Slicing (rather than set_state) ends the workers' work at `stop`.
            _allow_unparsed_absl_flags()
            options = grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=-(-self.prefetch // workers)
            )
            iterator = self.dataset[first:stop].to_iter_dataset(_READ_INLINE).mp_prefetch(options)
            iterator = iterator.__iter__()
        self._iterators.add(iterator)
        try:
            for g in range(first, stop):
                element = next(iterator)
                # np.asarray: plain ndarray views of grain's shared-memory arrays (no copy).
                yield g, Batch(*(np.asarray(element[k]) for k in ("images", "labels", "mask")))
        finally:
            self._iterators.discard(iterator)
            iterator.close()  # stops the worker processes

    def _plan(self, epoch: int | None, start_step: int | None, num_epochs: int | None):
        """``[first, stop)`` global batch indices of an iteration (default start: :meth:`state`)."""
        spe = self.steps_per_epoch
        if epoch is None:
            epoch, step = divmod(self._next, spe)
            step = step if start_step is None else int(start_step)
        else:
            epoch, step = int(epoch), 0 if start_step is None else int(start_step)
        if not 0 <= step <= spe:
            raise ValueError(f"start_step {step} not in [0, {spe}].")
        first = epoch * spe + step
        if num_epochs is None:
            return first, MAX_BATCHES
        return first, max(first, (epoch + int(num_epochs)) * spe)

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
        first, stop = self._plan(epoch, start_step, num_epochs)

        def generate() -> Iterator[Batch]:
            for g, batch in self._host_batches(first, stop):
                self._next = g + 1
                yield batch

        return generate()

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch (so ``for epoch ...: for batch in pipeline:`` works)."""
        return self.iterate()

    def batch(self, epoch: int, step: int) -> Batch:
        """One local batch, decoded in this thread, without touching :meth:`state` (for inspection
        and tests)."""
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step {step} not in [0, {self.steps_per_epoch}).")
        element = self.dataset[int(epoch) * self.steps_per_epoch + int(step)]
        return Batch(element["images"], element["labels"], element["mask"])

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
        """Like :meth:`iterate`, but yields global jax Arrays (batch axis sharded).

        The arrays are built with ``jax.make_array_from_process_local_data`` in the consuming thread
        (no JAX call from a background thread): before it yields a batch, the iterator puts the
        following ones on the devices (asynchronously), so ``prefetch`` batches are in flight while
        the consumer runs its step. Needs ``process_count == jax.process_count()``.
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
        first, stop = self._plan(epoch, start_step, num_epochs)

        def put(item: tuple[int, Batch]) -> tuple[int, Batch]:
            g, batch = item
            return g, Batch(*(jax.make_array_from_process_local_data(sharding, x) for x in batch))

        def generate() -> Iterator[Batch]:
            host = self._host_batches(first, stop)
            try:
                in_flight = collections.deque(put(item) for item in itertools.islice(host, self.prefetch))
                while in_flight:
                    g, arrays = in_flight.popleft()
                    following = next(host, None)
                    if following is not None:
                        in_flight.append(put(following))
                    self._next = g + 1
                    yield arrays
            finally:
                host.close()

        return generate()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the worker processes of unfinished iterations (they cannot be resumed afterwards;
        a new iteration starts new workers)."""
        for iterator in list(self._iterators):
            iterator.close()
        self._iterators = weakref.WeakSet()

    def __enter__(self) -> HostPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

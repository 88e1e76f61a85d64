"""The replay generator's driver: one jitted program over a process's devices, fed and drained in
overlap.

Work unit: a *group* of ``B = generation.batch_per_device`` consecutive image indices of one class,
aligned on multiples of B (image i sits at position ``i % B`` of group ``i // B``; indices nobody asked
for are computed and dropped). One step runs ``n_devices`` groups, one per device, possibly of
different classes; the last step is padded with copies of its last group.

The program is ``jit(shard_map(per_device))`` over a 1-D mesh of the devices given (by default this
process's devices: with several processes each generates its own share, see
:mod:`sdcil_jax.generation.pool`): parameters and the unconditional text state are replicated, the
per-image text states, class ids and indices are sharded. Every device runs the same per-device
program on B images (latents drawn inside from (class, index); denoising; VAE decode; resize;
uint8), and the uint8 images at the dataset's size are gathered as the program's output. So an
image's pixels depend on (model, dtype, scheduler, steps, guidance, prompt, seed, class, index) and
B, not on the number of devices or processes, in bfloat16 as in float32 (tested byte for byte).
On the CPU backend one more input counts: XLA:CPU sizes a process's intra-op parallelism as
max(cores, devices of the process) and splits some of the work (loop partitions, library calls) by
that number, which moves float sums by a last bit, and bfloat16 pixels by one level. So on CPU the
bytes are the same across device and process counts whenever that number is the same, e.g. with at
most as many devices per process as the machine has cores; a 4-device process on 2 cores is not
(measured with jax 0.10.2 and 0.12.0.1; no XLA option found removes it).

Text states are encoded once per distinct prompt set (T prompts in one call of fixed shape (T, L))
and once per run for the empty prompt, on one local device, and kept on the host.

Overlap: steps are dispatched asynchronously; while the devices run step k+1 the host fetches step k
and a writer thread hands finished jobs to ``sink`` (the replay store's shard writer).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from sdcil_jax.generation.model import unet_predict, vae_decode
from sdcil_jax.generation.sampler import sample_images
from sdcil_jax.generation.schedulers import solver_table

AXIS = "devices"


@dataclasses.dataclass(frozen=True)
class ClassJob:
    """Images ``indices`` of class ``class_id``; image i is prompted with ``prompts[i % T]``."""

    class_id: int
    prompts: tuple[str, ...]
    indices: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Group:
    job: int  # position in the job list
    start: int  # first image index (a multiple of B)


def plan_steps(jobs: Sequence[ClassJob], per_device: int, n_devices: int) -> list[list[_Group]]:
    """Aligned groups of every job, ``n_devices`` per step, the last step padded (copies)."""
    groups = []
    for j, job in enumerate(jobs):
        for g in sorted({int(i) // per_device for i in job.indices}):
            groups.append(_Group(j, g * per_device))
    steps = [groups[k:k + n_devices] for k in range(0, len(groups), n_devices)]
    if steps and len(steps[-1]) < n_devices:
        steps[-1] = steps[-1] + [steps[-1][-1]] * (n_devices - len(steps[-1]))
    return steps


class _Delivered(dict):
    """Stands for the images of a job handed to the writer: every index counts as received."""

    def __contains__(self, index) -> bool:
        return True


@dataclasses.dataclass
class _Program:
    fn: Callable
    modules: tuple  # (unet, vae): kept alive so the id()s in the cache key stay theirs
    traces: int = 0


# Compiled programs by (modules, table, settings, mesh): engines built again for the same model
# and settings (a resumed pool, tests) reuse the compilation.
_PROGRAMS: dict[tuple, _Program] = {}
_MAX_PROGRAMS = 8


def _build_program(unet, vae, table, guidance, out_hw_c, latent_shape, mesh,
                   attention: str = "standard") -> _Program:
    """``jit(shard_map(sample_images))``: replicated params/uncond/key, sharded per-image inputs,
    replicated uint8 output (gathered on the devices); UNet and VAE attention as ``attention``."""
    images_fn = functools.partial(
        sample_images, functools.partial(unet_predict, unet, attention=attention),
        functools.partial(vae_decode, vae, attention=attention),
        table, guidance, out_hw_c, latent_shape)
    entry = _Program(fn=None, modules=(unet, vae))

    def per_device(params, uncond, key, cond, class_ids, indices):
        entry.traces += 1  # Python side effect: runs once per trace
        return images_fn(params, key, cond, uncond, class_ids, indices)

    rep, shard = P(), P(AXIS)
    step = jax.shard_map(per_device, mesh=mesh, in_specs=(rep, rep, rep, shard, shard, shard),
                         out_specs=shard, check_vma=False)
    entry.fn = jax.jit(step, out_shardings=NamedSharding(mesh, P()))
    return entry


def _put(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (works multi-process)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class Engine:
    """Generates uint8 replay images with :func:`~sdcil_jax.generation.sampler.sample_images`.

    Args:
      model: a loaded :class:`~sdcil_jax.generation.pipeline.SDModel`.
      gen_cfg: the ``generation`` config (scheduler, num_inference_steps, guidance_scale,
        resolution, batch_per_device).
      seed: the run's seed (image keys derive from it).
      devices: the mesh's devices (default: ``jax.local_devices()``, this process's).
    """

    def __init__(self, model: Any, gen_cfg: Any, seed: int, devices: Sequence[Any] | None = None):
        self.model = model
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.n_devices = len(devices)
        self.per_device = int(gen_cfg.batch_per_device)
        self.batch_size = self.per_device * self.n_devices
        self.guidance = float(gen_cfg.guidance_scale)
        self.resolution = int(gen_cfg.resolution)
        self.latent_shape = model.latent_shape(self.resolution)
        self.table = solver_table(str(gen_cfg.get("scheduler", "pndm")), model.scheduler_config,
                                  int(gen_cfg.num_inference_steps))
        self.seed = int(seed)
        self._replicated = NamedSharding(self.mesh, P())
        self._sharded = NamedSharding(self.mesh, P(AXIS))
        # only what decoding uses of the VAE (its encoder never runs)
        vae = {k: v for k, v in model.params["vae"].items() if k in ("decoder", "post_quant_conv")}
        params = {"unet": model.params["unet"], "vae": vae}
        self._params = jax.tree_util.tree_map(lambda x: _put(x, self._replicated), params)
        self._key = _put(np.asarray(jax.random.PRNGKey(self.seed)), self._replicated)
        local = [d for d in devices if d.process_index == jax.process_index()]
        self._text_device = local[0] if local else jax.local_devices()[0]
        self._text_params = jax.device_put(model.params["text_encoder"], self._text_device)
        self._uncond: np.ndarray | None = None
        self._entries: dict[tuple[int, ...], _Program] = {}

    # ------------------------------------------------------------------ text states
    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Text states (T, L, D) of a class's T prompts (one call of fixed shape, host numpy)."""
        ids = jax.device_put(self.model.tokenize(list(prompts)), self._text_device)
        return np.asarray(self.model.encode_text(self._text_params, ids))

    def _uncond_state(self) -> np.ndarray:
        """The empty prompt's text state (L, D), encoded once (as a batch of one)."""
        if self._uncond is None:
            self._uncond = self.encode([""])[0]
        return self._uncond

    # ------------------------------------------------------------------ the program
    @property
    def traces(self) -> int:
        """How often this engine's programs were traced (each trace is one XLA compilation)."""
        return sum(entry.traces for entry in self._entries.values())

    def program(self, out_hw_c: Sequence[int]) -> Callable:
        """The jitted step for images of shape ``out_hw_c`` (built and compiled once)."""
        out_hw_c = tuple(int(v) for v in out_hw_c)
        if out_hw_c not in self._entries:
            self._entries[out_hw_c] = self._program_entry(out_hw_c)
        return self._entries[out_hw_c].fn

    def _program_entry(self, out_hw_c: tuple[int, ...]) -> _Program:
        t = self.table
        key = (id(self.model.unet), id(self.model.vae), t.name, t.timesteps.tobytes(),
               t.keep_base.tobytes(), t.p.tobytes(), t.q.tobytes(), t.a.tobytes(), t.c.tobytes(),
               self.guidance, out_hw_c, self.latent_shape, tuple(self.mesh.devices.flat),
               self.per_device, self.model.attention)
        entry = _PROGRAMS.get(key)
        if entry is None or entry.modules[0] is not self.model.unet:
            entry = _build_program(self.model.unet, self.model.vae, t, self.guidance, out_hw_c,
                                   self.latent_shape, self.mesh, self.model.attention)
            _PROGRAMS[key] = entry
            while len(_PROGRAMS) > _MAX_PROGRAMS:
                _PROGRAMS.pop(next(iter(_PROGRAMS)))
        return entry

    def lower(self, out_hw_c: Sequence[int], per_device: int | None = None):
        """The program for images ``out_hw_c`` lowered (not run) at ``per_device`` images per
        device (default ``batch_per_device``): ``.compile().memory_analysis()`` sizes it."""
        b = self.per_device if per_device is None else int(per_device)
        n, text = b * self.n_devices, self._uncond_state()

        def spec(shape, dtype, sharding):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        return self.program(out_hw_c).lower(
            self._params, spec(text.shape, text.dtype, self._replicated), self._key,
            spec((n, *text.shape), text.dtype, self._sharded),
            *(spec((n,), np.uint32, self._sharded) for _ in range(2)))

    def _dispatch(self, program, groups, jobs, states, uncond) -> jax.Array:
        """Launch one global step (asynchronously); returns its replicated uint8 output."""
        B = self.per_device
        class_ids = np.concatenate([np.full(B, jobs[g.job].class_id) for g in groups])
        indices = np.concatenate([np.arange(g.start, g.start + B) for g in groups])
        cond = np.stack([states[g.job][(g.start + k) % len(states[g.job])]
                         for g in groups for k in range(B)])
        args = [_put(a, self._sharded) for a in (cond, class_ids.astype(np.uint32),
                                                  indices.astype(np.uint32))]
        return program(self._params, uncond, self._key, *args)

    # ------------------------------------------------------------------ the run
    def run(
        self,
        jobs: Sequence[ClassJob],
        out_hw_c: Sequence[int],
        sink: Callable[[int, np.ndarray, np.ndarray], None],
        progress: bool = True,
        desc: str = "generating replay",
        on_step: Callable[[int, int], None] | None = None,
    ) -> dict[str, float]:
        """Generate every job's images and call ``sink(class_id, images, indices)`` per job.

        ``images`` is uint8 (n, H, W, C) in ascending index order; ``sink`` runs in a writer thread,
        one job at a time, as soon as all of a job's images are back. ``on_step(done, total)`` runs
        in this thread after each step's images are back (``done`` images of ``total`` so far);
        if it raises, the jobs finished so far are still handed to ``sink`` before the error
        propagates. Returns timings: ``wall_s``, ``images``, ``steps``.
        """
        jobs = [j for j in jobs if j.indices]
        start = time.perf_counter()
        program = self.program(out_hw_c)
        uncond = _put(self._uncond_state(), self._replicated)
        encoded: dict[tuple[str, ...], np.ndarray] = {}
        for job in jobs:
            if job.prompts not in encoded:
                encoded[job.prompts] = self.encode(job.prompts)
        states = [encoded[job.prompts] for job in jobs]
        wanted = [set(int(i) for i in job.indices) for job in jobs]
        got: list[dict[int, np.ndarray]] = [{} for _ in jobs]
        steps = plan_steps(jobs, self.per_device, self.n_devices)
        total = sum(len(w) for w in wanted)
        finished = 0
        bar = None  # opened after the first dispatch, which compiles: its rate is the sampler's
        writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay-writer")
        futures: list[concurrent.futures.Future] = []
        failed = threading.Event()  # after a failed write, later classes are not written

        def deliver(job: ClassJob, images_by_index: dict[int, np.ndarray]) -> None:
            if failed.is_set():
                return
            try:
                order = sorted(images_by_index)
                sink(job.class_id, np.stack([images_by_index[i] for i in order]),
                     np.asarray(order, np.int64))
            except BaseException:
                failed.set()
                raise

        def collect(groups, out):
            nonlocal finished
            images = np.asarray(out.addressable_data(0))  # blocks until this step is done
            done = 0
            for pos, g in enumerate(groups):
                for k in range(self.per_device):
                    index = g.start + k
                    if index in wanted[g.job] and index not in got[g.job]:
                        got[g.job][index] = images[pos * self.per_device + k]
                        done += 1
                        if len(got[g.job]) == len(wanted[g.job]):
                            futures.append(writer.submit(deliver, jobs[g.job], got[g.job]))
                            got[g.job] = _Delivered()  # the writer holds the images now
            for f in futures:
                if f.done() and f.exception() is not None:
                    raise f.exception()
            bar.set_postfix_str(f"class {jobs[groups[-1].job].class_id}", refresh=False)
            bar.update(done)
            finished += done
            if on_step is not None:
                on_step(finished, total)

        try:
            pending = None
            for groups in steps:
                out = self._dispatch(program, groups, jobs, states, uncond)
                if bar is None:
                    bar = tqdm(total=total, unit="img", desc=desc, disable=not progress,
                               dynamic_ncols=True)
                if pending is not None:
                    collect(*pending)
                pending = (groups, out)
            if pending is not None:
                collect(*pending)
        finally:
            writer.shutdown(wait=True)
            if bar is not None:
                bar.close()
        for f in futures:
            f.result()
        return {"wall_s": time.perf_counter() - start, "images": float(total),
                "steps": float(len(steps))}

    def device_seconds_per_step(self, out_hw_c: Sequence[int], repeats: int = 5) -> float:
        """Seconds per global step when steps are dispatched back to back with no host work in
        between: the devices' busy time per step (for benchmarks; compiles if needed)."""
        program = self.program(out_hw_c)
        jobs = [ClassJob(0, ("",), tuple(range(self.batch_size)))]
        groups = plan_steps(jobs, self.per_device, self.n_devices)[0]
        states = [self.encode(jobs[0].prompts)]
        uncond = _put(self._uncond_state(), self._replicated)
        jax.block_until_ready(self._dispatch(program, groups, jobs, states, uncond))
        start = time.perf_counter()
        outs = [self._dispatch(program, groups, jobs, states, uncond) for _ in range(repeats)]
        jax.block_until_ready(outs)
        return (time.perf_counter() - start) / repeats

    def generate(self, class_id: int, prompts: Sequence[str], indices: Sequence[int],
                 out_hw_c: Sequence[int]) -> np.ndarray:
        """uint8 images (len(indices), H, W, C) of one class, in the order of ``indices``."""
        result: dict[int, np.ndarray] = {}

        def keep(_, images, order):
            result.update(zip(order.tolist(), images, strict=True))

        self.run([ClassJob(int(class_id), tuple(prompts), tuple(int(i) for i in indices))],
                 out_hw_c, keep, progress=False)
        if not indices:
            return np.zeros((0, *[int(v) for v in out_hw_c]), np.uint8)
        return np.stack([result[int(i)] for i in indices])

"""The state a run carries: what passes from task to task, where the run stands, and their saving.

* :class:`TaskState` is what one task hands to the next (``run_task(state, t) -> state``): the model
  (``params = {'backbone', 'head'}``, ``batch_stats``), the exemplar ``memory`` (incremental class ->
  pool positions), the frozen ``old`` model and the per-task ``results`` so far.
* :class:`Position` is where the run stands: task, phase ('train', 'finetune' or 'task_done'),
  epoch and step within the phase, the epoch's partial metric sums, and counters.
* :class:`Saver` writes both (plus the phase's optimizer state) into an orbax checkpoint, decides
  when to save inside a phase (timer, step count, a stop signal) and restores the newest good
  checkpoint on resume.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import numpy as np

from sdcil_jax import distributed, parallel
from sdcil_jax import train as train_lib
from sdcil_jax.checkpoint import SaveTimer
from sdcil_jax.preemption import Preempted, PreemptionGuard


@dataclasses.dataclass
class TaskState:
    """What a task hands to the next one (and what a task-end checkpoint holds)."""

    params: dict[str, Any]  # {'backbone': ..., 'head': ... (None before the first task)}
    batch_stats: Any
    memory: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
    old: Any = None  # the frozen previous model {'params', 'batch_stats'} (on the devices) or None
    results: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Position:
    """Where a run stands; the ``progress`` item of a checkpoint."""

    task: int = 0
    phase: str = "train"  # 'train', 'finetune' or 'task_done'
    epoch: int = 0
    step: int = 0  # steps done in ``epoch``
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    stream: dict[str, Any] = dataclasses.field(default_factory=dict)  # the batch stream's state
    global_step: int = 0
    save: int = 0  # id of the last checkpoint written
    metrics_lines: int = 0  # lines of metrics.jsonl that belong to the run so far
    wall_time_s: float = 0.0

    def describe(self) -> str:
        where = f"task {self.task + 1}, {self.phase}"
        if self.phase != "task_done":
            where += f", epoch {self.epoch + 1}, step {self.step}"
        return where


class Saver:
    """Checkpoints of one run (``checkpointer`` may be None: nothing is saved or restored)."""

    def __init__(self, checkpointer, logger, guard: PreemptionGuard | None, timer: SaveTimer,
                 board=None, sync_every: int = 10):
        from sdcil_jax.tensorboard import Board

        self.ckpt, self.logger, self.timer = checkpointer, logger, timer
        self.board = board if board is not None else Board("", enabled=False)
        self.guard = guard or PreemptionGuard()
        self.position = Position()
        self.save_seconds = 0.0  # time spent writing checkpoints so far
        self.sync_every = max(1, int(sync_every))
        self._wall_before = 0.0
        self._started = time.perf_counter()

    def wall_time(self) -> float:
        return self._wall_before + time.perf_counter() - self._started

    def save(self, state: TaskState, position: Position, train_state) -> None:
        """Write ``train_state`` (a :class:`~sdcil_jax.train.TrainState`), the task state and the
        position as the next checkpoint."""
        if self.ckpt is None:
            return
        clock = time.perf_counter()
        position.save = self.position.save + 1
        position.global_step = self.position.global_step
        position.metrics_lines = self.logger.count()
        position.wall_time_s = self.wall_time()
        progress = dataclasses.asdict(position)
        progress["sums"] = {k: float(v) for k, v in position.sums.items()}
        self.ckpt.save(position.save, state=train_state, memory=state.memory, progress=progress,
                       metrics={"per_task": state.results}, old=state.old)
        self.position = position
        self.timer.reset(position.global_step)
        self.save_seconds += time.perf_counter() - clock

    def save_task_end(self, state: TaskState, task: int) -> None:
        done = train_lib.TrainState(step=np.zeros((), np.int32), params=state.params,
                                    batch_stats=state.batch_stats, opt_state=())
        self.save(state, Position(task=task, phase="task_done"), done)

    def after_step(self, state: TaskState, position: Position, train_state) -> None:
        """Count the step; save when the timer says so or a stop was requested; then stop.

        With several processes the decision is taken together every ``sync_every`` steps (a small
        all-gather): a signal received by any process stops them all, at the same step, after one
        collective save; the timer is process 0's clock.
        """
        self.position.global_step += 1
        step = self.position.global_step
        if distributed.multi():
            if step % self.sync_every:
                return
            due = self.timer.due(step) if distributed.is_main() else False
            signum, due = distributed.agree_max([self.guard.requested or 0, due])
        else:
            signum, due = self.guard.requested or 0, self.timer.due(step)
        if signum or due:
            self.save(state, position, train_state)
        if signum:
            self._stop(signum, f"in {position.describe()}")

    def stop_if_requested(self, where: str) -> None:
        """Stop (every process) if any process received a stop signal; call it at the same point
        in every process."""
        (signum,) = distributed.agree_max([self.guard.requested or 0])
        if signum:
            self._stop(signum, where)

    @staticmethod
    def _stop(signum: int, where: str) -> None:
        raise Preempted(f"Stopped by {signal.Signals(signum).name} {where}; a checkpoint was "
                        "saved, rerun the same command to resume.", signum)

    def restore(self, template_fn, mesh) -> tuple[TaskState, Position, Any] | None:
        """The newest good checkpoint as ``(task state, position, train state)``, or None.

        ``template_fn(progress)`` gives the shapes of the saved train state. The old model goes back
        to the devices; the metrics log is cut to the lines the checkpoint knew about.
        """
        if self.ckpt is None:
            return None
        restored = self.ckpt.restore_latest(template_fn)
        if restored is None:
            self.logger.start_fresh()
            return None
        p = dict(restored.progress)
        position = Position(**{f.name: p[f.name] for f in dataclasses.fields(Position) if f.name in p})
        self.position = dataclasses.replace(position)
        self._wall_before = position.wall_time_s
        self._started = time.perf_counter()
        old = parallel.put_replicated(restored.old, mesh) if restored.old is not None else None
        memory = {int(c): np.asarray(v) for c, v in restored.memory.items()}
        state = TaskState(params=restored.state.params, batch_stats=restored.state.batch_stats,
                          memory=memory, old=old, results=list(restored.metrics["per_task"]))
        self.logger.truncate(position.metrics_lines)
        self.board.resume(position.global_step)
        self.timer.reset(position.global_step)
        if distributed.is_main():
            print(f"resuming from checkpoint {position.save}: {position.describe()}", flush=True)
        return state, position, restored.state

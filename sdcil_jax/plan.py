"""The training plan of a run (steps per task) and its projected time from the measured rate.

Printed before training starts (``plan: ...``) and after each task's first training epoch
(``projected: ...``), so a user on a time-limited machine (a Colab session) knows early whether the
run fits. Steps follow the batch streams: an epoch is ``ceil(n / batch)`` steps on the device
pipeline and ``floor(n / batch)`` on the host pipeline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdcil_jax.methods import TaskInfo, get_method


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    task: int
    train_images: int  # real images per epoch (new classes + memory)
    train_steps: int
    finetune_steps: int

    @property
    def steps(self) -> int:
        return self.train_steps + self.finetune_steps


def training_plan(exp) -> list[TaskPlan]:
    """Steps of every task of ``exp`` (an :class:`~sdcil_jax.runner.Experiment`)."""
    cfg, sc = exp.config, exp.scenario
    counts = np.bincount(sc.relabel(exp.dataset.train.labels[exp.train_idx]).clip(-1) + 1,
                         minlength=sc.num_classes + 1)[1:]
    batch = cfg.train.batch_size

    def steps(n: int) -> int:  # both pipelines keep an epoch's last partial batch (padded)
        return max(1, -(-n // batch))

    out = []
    for t in range(sc.num_tasks):
        start, end = sc.task_range(t)
        method = get_method(cfg, TaskInfo(task=t, num_old=start, num_new=end - start))
        per_old = cfg.synthetic.per_class if cfg.synthetic.replace_memory else cfg.memory.per_class
        n_mem = per_old * start if method.uses_memory else 0
        n = len(method.real_indices(np.arange(int(counts[start:end].sum())), np.arange(n_mem),
                                    np.arange(int(counts[:end].sum()))))
        finetune = 0
        if method.finetune_epochs():
            n_bal = cfg.memory.per_class * end
            if cfg.synthetic.in_finetuning and not cfg.synthetic.replace_memory:
                n_bal += cfg.synthetic.per_class * start
            finetune = method.finetune_epochs() * steps(n_bal)
        out.append(TaskPlan(t, n, cfg.train.epochs * steps(n), finetune))
    return out


def plan_line(plan: list[TaskPlan], first_task: int = 0) -> str:
    todo = plan[first_task:]
    total = sum(p.steps for p in todo)
    train = sum(p.train_steps for p in todo)
    return (f"plan: train {len(todo)} task(s), {total} steps ({train} training + "
            f"{total - train} balanced finetuning)" + (f", from task {first_task + 1}"
                                                         if first_task else ""))


def duration(seconds: float) -> str:
    """``'3 h 05 min'``, ``'4 min 10 s'`` or ``'12 s'``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours} h {rest // 60:02d} min"
    return f"{rest // 60} min {rest % 60:02d} s" if rest >= 60 else f"{rest} s"


def projection_line(plan: list[TaskPlan], task: int, steps_done: int, seconds_per_step: float
                    ) -> str:
    """Remaining time of the run if every remaining step took ``seconds_per_step``."""
    remaining = sum(p.steps for p in plan[task:]) - steps_done
    return (f"projected: {duration(remaining * seconds_per_step)} for the remaining {remaining} steps at "
            f"{seconds_per_step:.3f} s/step (measured in task {task + 1}; compilation, "
            "evaluation and checkpoints come on top)")

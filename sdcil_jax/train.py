"""The functional training step: ``(state, old model, pool, batch, key) -> (state, metrics)``.

One step for every dataset size: the batch stream (:mod:`sdcil_jax.data.stream`) turns its batch into
images, labels and per-sample masks inside the jitted step (``cls_mask``: the sample feeds the
classification loss; ``dist_mask``: the distillation losses), the images are normalised, and
:func:`update` runs the forward passes (frozen old model, current model), the method's loss, gradient
and update transforms and the optimizer. Balanced finetuning has its own step
(:func:`finetune_update`). The method (``sdcil_jax.methods``) supplies the head and the loss; this
module is method-agnostic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sdcil_jax.models import heads


@struct.dataclass
class TrainState:
    """Everything that changes during a task. ``params = {'backbone': ..., 'head': ...}``."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def schedule_value(kind: str, lr, total_steps, steps_per_epoch, step):
    """The learning rate at optimizer step ``step`` (0-based); every argument but ``kind`` may be
    traced, so one compiled step serves stages of any length.

    * ``constant``: ``lr`` (PODNet's balanced finetuning);
    * ``cosine_step``: ``lr * (1 + cos(pi * min(t, T) / T)) / 2`` with ``T = total_steps``
      (``optax.cosine_decay_schedule``'s formula and operation order);
    * ``cosine_epoch``: PODNet's ``CosineAnnealingLR(T_max=E)`` stepped once per epoch in closed form
      (``scheduler.step(epoch)`` after each epoch), with ``e = t // steps_per_epoch`` and
      ``E = ceil(total_steps / steps_per_epoch)`` epochs: epoch 0 uses ``lr``, epoch ``e >= 1`` uses
      ``lr * (1 + cos(pi * (e - 1) / E)) / 2``.
    """
    if kind == "constant":
        return jnp.asarray(lr, jnp.float32)
    if kind == "cosine_step":
        total = jnp.maximum(jnp.asarray(total_steps, jnp.int32), 1)
        count = jnp.minimum(jnp.asarray(step, jnp.int32), total)
        return lr * (0.5 * (1 + jnp.cos(jnp.pi * count / total)))
    if kind == "cosine_epoch":
        spe = jnp.maximum(jnp.asarray(steps_per_epoch, jnp.int32), 1)
        epochs = jnp.maximum(-(-jnp.asarray(total_steps, jnp.int32) // spe), 1)
        e = jnp.maximum(step // spe - 1, 0).astype(jnp.float32)
        return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * e / epochs.astype(jnp.float32)))
    raise ValueError(f"Unknown learning-rate schedule {kind!r}; use constant, cosine_step or "
                     "cosine_epoch.")


def lr_schedule(lr: float, kind: str, total_steps: int, steps_per_epoch: int = 1):
    """:func:`schedule_value` as a function of the step (the plain ``lr`` for ``constant``)."""
    if kind == "constant":
        return lr
    if kind not in ("cosine_step", "cosine_epoch"):
        schedule_value(kind, lr, total_steps, steps_per_epoch, 0)  # raises the message
    return lambda step: schedule_value(kind, lr, total_steps, steps_per_epoch, step)


def schedule_args(lr: float, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """The traced schedule arguments of a stage (``args['lr']`` of the step)."""
    return {"lr": np.asarray(lr, np.float32), "total": np.asarray(total_steps, np.int32),
            "spe": np.asarray(steps_per_epoch, np.int32)}


def make_optimizer(lr: float, momentum: float, weight_decay: float, total_steps: int,
                   schedule: str = "cosine_step",
                   steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, as ``torch.optim.SGD``.

    update = -lr_t * m_t,  m_t = momentum * m_{t-1} + (g_t + weight_decay * w)  (m_0 = g_0 + wd w),
    with ``lr_t`` from :func:`lr_schedule` (``schedule`` in constant, cosine_step, cosine_epoch).
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(lr_schedule(lr, schedule, total_steps, steps_per_epoch),
                  momentum=momentum if momentum > 0 else None),
    )


def sgd_direction(momentum: float, weight_decay: float) -> optax.GradientTransformation:
    """:func:`make_optimizer` without its learning rate: returns ``m_t`` (the step multiplies it by
    ``-lr_t`` from traced schedule arguments, :func:`apply_lr`), so the optimizer's program does
    not depend on a stage's length or learning rate."""
    parts = [optax.add_decayed_weights(weight_decay)]
    if momentum > 0:
        parts.append(optax.trace(decay=momentum))
    return optax.chain(*parts)


def apply_lr(updates, lr):
    """``-lr * updates`` leaf by leaf (``optax.scale_by_learning_rate``'s arithmetic)."""
    return jax.tree.map(lambda u: jnp.asarray(-lr, u.dtype) * u, updates)


def init_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))


def forward(backbone: flax.linen.Module, head_apply: Callable, params, batch_stats, images,
            train: bool, valid=None):
    """Backbone + head. Returns (outputs dict with 'maps', 'features', 'logits'; new batch_stats).

    ``valid`` (train mode): ``(B,)`` rows that enter batch normalisation's statistics (None: all).
    """
    variables = {"params": params["backbone"], "batch_stats": batch_stats}
    if train:
        kwargs = {} if valid is None else {"mask": valid}
        out, mutated = backbone.apply(variables, images, train=True, mutable=["batch_stats"],
                                      **kwargs)
        new_stats = mutated["batch_stats"]
    else:
        out = backbone.apply(variables, images, train=False)
        new_stats = batch_stats
    out = dict(out)
    out["logits"] = head_apply(params["head"], out["features"])
    return out, new_stats


def update(backbone, method, tx, state: TrainState, old_vars, images, y, cls_mask, dist_mask,
           args=None, lr=None, valid=None):
    """One optimisation step on a prepared batch (pure; traced inside the jitted step).

    Forward of the frozen old model (inference mode, no gradient) when the method needs it; forward
    of the current model in train mode (batch statistics; running statistics updated); the method's
    loss with the per-sample masks; ``method.transform_grads`` (e.g. PODNet's element-wise clamp);
    the optimizer; ``method.transform_updates`` (e.g. frozen old proxies).

    Args:
      images: (B, H, W, C) float32, normalised. y: (B,) int32 incremental labels.
      cls_mask, dist_mask: (B,) float32, 1 where the sample feeds the classification /
        distillation losses.
      args: the method's traced task arguments (``method.task_args(info)``; None: the method's own).
      lr: the traced learning rate when ``tx`` is :func:`sgd_direction` (None: ``tx`` applies it).
      valid: (B,) float32, 1 for the rows of the batch (0 for the padding of an epoch's last
        batch): only they enter the batch statistics; the masks already exclude the padding.

    Returns:
      (new state, metrics dict with 'loss' and the method's terms).
    """
    old_out = None
    if old_vars is not None and method.needs_old_model:
        old_out, _ = forward(backbone, method.head_apply, old_vars["params"],
                             old_vars["batch_stats"], images, train=False)
        old_out = jax.lax.stop_gradient(old_out)

    def loss_fn(params):
        out, new_stats = forward(backbone, method.head_apply, params, state.batch_stats,
                                 images, train=True, valid=valid)
        loss, metrics = method.loss(params, out, old_out, y, cls_mask, dist_mask, args)
        return loss, (new_stats, metrics)

    (loss, (new_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = method.transform_grads(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if lr is not None:
        updates = apply_lr(updates, lr)
    updates = method.transform_updates(updates, args)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state)
    return new_state, dict(metrics, loss=loss)


def finetune_update(backbone, method, tx, state: TrainState, images, y, args=None, lr=None,
                    valid=None):
    """Balanced finetuning, as PODNet's official ``finetuning_config`` (tuning: classifier).

    The network runs in train mode: batch norm normalises with the batch statistics and updates its
    running statistics; the backbone weights get no update (``stop_gradient`` on the features) and
    only the leaves that ``method.finetune_update_mask`` marks trainable move (for PODNet: every
    proxy, old and new, but not the learned scale, which the official finetuning optimizer omits).
    ``args``, ``lr`` and ``valid`` as in :func:`update` (padding rows feed neither the loss nor
    the batch statistics).
    """
    out, new_stats = forward(backbone, method.head_apply, state.params, state.batch_stats, images,
                             train=True, valid=valid)
    feats = jax.lax.stop_gradient(out["features"])
    mask = jnp.ones(y.shape, jnp.float32) if valid is None else valid

    def loss_fn(head):
        return method.finetune_loss(head, method.head_apply(head, feats), y, mask, args)

    loss, grads = jax.value_and_grad(loss_fn)(state.params["head"])
    grads = method.transform_grads({"head": grads})["head"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params["head"])
    if lr is not None:
        updates = apply_lr(updates, lr)
    updates = heads.mask_updates(updates, method.finetune_update_mask(updates, args))
    head = optax.apply_updates(state.params["head"], updates)
    params = dict(state.params, head=head)
    return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state), {"loss": loss}


def init_head_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
    """A TrainState whose optimizer covers the head only (balanced finetuning)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params["head"]))


def step_args(method, stream, lr: dict[str, np.ndarray] | None = None,
              info=None) -> dict[str, Any]:
    """Everything the compiled step reads that changes from task to task, as data: the method's
    task arguments, the stream's (``synth``: the pool's synthetic bounds) and, when the step applies
    the learning rate, :func:`schedule_args`."""
    args = {"method": method.task_args(info), "stream": stream.step_args()}
    if lr is not None:
        args["lr"] = lr
    return args


def _step_lr(lr_kind: str | None, state: TrainState, args):
    if lr_kind is None:
        return None
    a = args["lr"]
    return schedule_value(lr_kind, a["lr"], a["total"], a["spe"], state.step)


def make_train_step(backbone, method, tx: optax.GradientTransformation, batches, mean, std,
                    lr_kind: str | None = None):
    """The training step; jit it once per run (per batch kind) with the state donated.

    ``step(state, old_vars, pool, batch, task_key, args) -> (state, metrics)``: ``batches``'
    ``materialise`` turns ``batch`` (and the device ``pool``) into images, labels and masks with
    ``aug_key, synth_key = split(fold_in(task_key, state.step))``; the images are normalised
    ``(x - mean) / std`` and :func:`update` takes one optimisation step. ``old_vars`` is the frozen
    previous model ({'params', 'batch_stats'}) or None; ``args`` is :func:`step_args`. With
    ``lr_kind`` (a :func:`schedule_value` kind) ``tx`` is :func:`sgd_direction` and the learning
    rate comes from ``args['lr']``; without, ``tx`` applies its own schedule.
    """
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def step(state: TrainState, old_vars, pool, batch, task_key, args):
        aug_key, synth_key = jax.random.split(jax.random.fold_in(task_key, state.step))
        b = batches.materialise(pool, batch, aug_key, synth_key, args["stream"])
        return update(backbone, method, tx, state, old_vars, (b["image"] - mean) / std,
                      b["label"], b["cls_mask"], b["dist_mask"], args["method"],
                      _step_lr(lr_kind, state, args), b["valid"])

    return step


def make_finetune_step(backbone, method, tx: optax.GradientTransformation, batches, mean, std,
                       lr_kind: str | None = None):
    """The balanced-finetuning step (see :func:`finetune_update`); same signature as the training
    step (``old_vars`` unused), augmentation key ``fold_in(task_key, state.step)``."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def step(state: TrainState, old_vars, pool, batch, task_key, args):
        del old_vars
        b = batches.materialise(pool, batch, jax.random.fold_in(task_key, state.step), None,
                                args["stream"])
        return finetune_update(backbone, method, tx, state, (b["image"] - mean) / std, b["label"],
                               args["method"], _step_lr(lr_kind, state, args), b["valid"])

    return step


def make_eval_fn(backbone, head_apply: Callable | None, mean: jax.Array, std: jax.Array,
                 flip: bool = False):
    """``eval_fn(params, batch_stats, images_u8) -> (logits, features)`` in inference mode.

    ``flip=True`` mirrors the images horizontally first (the flipped copies of PODNet's NME means).
    ``head_apply=None``: features only, ``logits`` is None and ``params["head"]`` is not read (pass
    ``None`` there, so the program does not depend on the head's shape).
    """

    def eval_fn(params, batch_stats, images_u8):
        if flip:
            images_u8 = images_u8[:, :, ::-1, :]
        images = (images_u8.astype(jnp.float32) / 255.0 - mean) / std
        if head_apply is None:
            out = backbone.apply({"params": params["backbone"], "batch_stats": batch_stats}, images,
                                 train=False)
            return None, out["features"]
        out, _ = forward(backbone, head_apply, params, batch_stats, images, train=False)
        return out["logits"], out["features"]

    return eval_fn

"""The functional training step: ``(state, batch indices, key) -> (state, metrics)``.

The whole (small) training pool of a task lives on the devices as uint8 (``pool_x``, replicated) with
its incremental labels (``pool_y``). A step receives the global batch of *real* indices (sharded over
the ``data`` mesh axis) and, when synthetic data is on, draws the *synthetic* batch uniformly from the
pool's synthetic range ``[synth_lo, synth_hi)`` inside the step, so no image crosses the host boundary
during training. Both batches go through one forward pass with per-sample masks:

* ``cls_mask``: the sample feeds the classification loss;
* ``dist_mask``: the sample feeds the distillation losses.

The method (``sdcil_jax.methods``) supplies the head and the loss; this module is method-agnostic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from sdcil_jax import augment as aug_lib


@struct.dataclass
class TrainState:
    """Everything that changes during a task. ``params = {'backbone': ..., 'head': ...}``."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (compile-time) settings of a task's step."""

    real_batch: int
    synth_batch: int  # 0 = no synthetic stream
    synth_in_cls: bool
    synth_in_dist: bool
    crop_padding: int
    flip: bool
    brightness: float


def lr_schedule(lr: float, kind: str, total_steps: int, steps_per_epoch: int = 1):
    """The learning rate as a function of the optimizer step ``t`` (0-based).

    * ``constant``: ``lr`` (PODNet's balanced finetuning);
    * ``cosine_step``: ``lr * (1 + cos(pi * t / total_steps)) / 2``;
    * ``cosine_epoch``: PODNet's ``CosineAnnealingLR(T_max=E)`` stepped once per epoch in closed form
      (``scheduler.step(epoch)`` after each epoch), with ``e = t // steps_per_epoch`` and
      ``E = total_steps / steps_per_epoch`` epochs: epoch 0 uses ``lr``, epoch ``e >= 1`` uses
      ``lr * (1 + cos(pi * (e - 1) / E)) / 2``.
    """
    if kind == "constant":
        return lr
    if kind == "cosine_step":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    if kind == "cosine_epoch":
        spe = max(int(steps_per_epoch), 1)
        epochs = max(-(-int(total_steps) // spe), 1)

        def schedule(step):
            e = jnp.maximum(step // spe - 1, 0).astype(jnp.float32)
            return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * e / epochs))

        return schedule
    raise ValueError(f"Unknown learning-rate schedule {kind!r}; use constant, cosine_step or "
                     "cosine_epoch.")


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


def init_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))


def forward(backbone: flax.linen.Module, head_apply: Callable, params, batch_stats, images,
            train: bool):
    """Backbone + head. Returns (outputs dict with 'maps', 'features', 'logits'; new batch_stats)."""
    variables = {"params": params["backbone"], "batch_stats": batch_stats}
    if train:
        out, mutated = backbone.apply(variables, images, train=True, mutable=["batch_stats"])
        new_stats = mutated["batch_stats"]
    else:
        out = backbone.apply(variables, images, train=False)
        new_stats = batch_stats
    out = dict(out)
    out["logits"] = head_apply(params["head"], out["features"])
    return out, new_stats


def update(backbone, method, tx, state: TrainState, old_vars, images, y, cls_mask, dist_mask):
    """One optimisation step on a prepared batch (pure; traced inside the jitted step).

    Forward of the frozen old model (inference mode, no gradient) when the method needs it; forward
    of the current model in train mode (batch statistics; running statistics updated); the method's
    loss with the per-sample masks; ``method.transform_grads`` (e.g. PODNet's element-wise clamp);
    the optimizer; ``method.transform_updates`` (e.g. frozen old proxies).

    Args:
      images: (B, H, W, C) float32, normalised. y: (B,) int32 incremental labels.
      cls_mask, dist_mask: (B,) float32, 1 where the sample feeds the classification /
        distillation losses.

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
                                 images, train=True)
        loss, metrics = method.loss(params, out, old_out, y, cls_mask, dist_mask)
        return loss, (new_stats, metrics)

    (loss, (new_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = method.transform_grads(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = method.transform_updates(updates)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state)
    return new_state, dict(metrics, loss=loss)


def _masks(cfg: StepConfig, n_real: int):
    cls_mask = jnp.ones((n_real,), jnp.float32)
    dist_mask = jnp.ones((n_real,), jnp.float32)
    if cfg.synth_batch > 0:
        cls_mask = jnp.concatenate(
            [cls_mask, jnp.full((cfg.synth_batch,), float(cfg.synth_in_cls), jnp.float32)])
        dist_mask = jnp.concatenate(
            [dist_mask, jnp.full((cfg.synth_batch,), float(cfg.synth_in_dist), jnp.float32)])
    return cls_mask, dist_mask


def make_train_step(backbone, method, tx: optax.GradientTransformation, cfg: StepConfig,
                    mean: jax.Array, std: jax.Array, data_sharding=None):
    """Build the pure step for one task (device pipeline); jit it with the state donated.

    Returned signature::

        step(state, old_vars, pool_x, pool_y, real_idx, synth_lo, synth_hi, task_key)
          -> (state, metrics)

    ``old_vars`` is the frozen previous model ({'params', 'batch_stats'}) or None.
    """

    def step(state: TrainState, old_vars, pool_x, pool_y, real_idx, synth_lo, synth_hi, task_key):
        key = jax.random.fold_in(task_key, state.step)
        k_aug, k_syn = jax.random.split(key)
        x = pool_x[real_idx]
        y = pool_y[real_idx]
        if cfg.synth_batch > 0:
            s_idx = jax.random.randint(k_syn, (cfg.synth_batch,), synth_lo, synth_hi)
            x = jnp.concatenate([x, pool_x[s_idx]])
            y = jnp.concatenate([y, pool_y[s_idx]])
        cls_mask, dist_mask = _masks(cfg, real_idx.shape[0])
        if data_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, data_sharding)
        images = aug_lib.augment(x.astype(jnp.float32) / 255.0, k_aug, crop_padding=cfg.crop_padding,
                                 flip=cfg.flip, brightness=cfg.brightness)
        images = (images - mean) / std
        return update(backbone, method, tx, state, old_vars, images, y, cls_mask, dist_mask)

    return step


def make_host_train_step(backbone, method, tx: optax.GradientTransformation, cfg: StepConfig,
                         mean: jax.Array, std: jax.Array, data_sharding=None):
    """The step for the host pipeline: batches arrive decoded and augmented (uint8, sharded).

    Signature: ``step(state, old_vars, x_real, y_real, x_synth, y_synth) -> (state, metrics)``;
    ``x_synth``/``y_synth`` are ignored when ``cfg.synth_batch == 0``.
    """

    def step(state: TrainState, old_vars, x_real, y_real, x_synth, y_synth):
        x, y = x_real, y_real
        if cfg.synth_batch > 0:
            x = jnp.concatenate([x, x_synth])
            y = jnp.concatenate([y, y_synth])
        if data_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, data_sharding)
        cls_mask, dist_mask = _masks(cfg, x_real.shape[0])
        images = (x.astype(jnp.float32) / 255.0 - mean) / std
        return update(backbone, method, tx, state, old_vars, images, y, cls_mask, dist_mask)

    return step


def finetune_update(backbone, method, tx, state: TrainState, images, y):
    """Balanced finetuning, as PODNet's official ``finetuning_config`` (tuning: classifier).

    The network runs in train mode: batch norm normalises with the batch statistics and updates its
    running statistics; the backbone weights get no update (``stop_gradient`` on the features) and
    only the leaves that ``method.finetune_update_mask`` marks trainable move (for PODNet: every
    proxy, old and new, but not the learned scale, which the official finetuning optimizer omits).
    """
    out, new_stats = forward(backbone, method.head_apply, state.params, state.batch_stats, images,
                             train=True)
    feats = jax.lax.stop_gradient(out["features"])
    mask = jnp.ones(y.shape, jnp.float32)

    def loss_fn(head):
        return method.finetune_loss(head, method.head_apply(head, feats), y, mask)

    loss, grads = jax.value_and_grad(loss_fn)(state.params["head"])
    grads = method.transform_grads({"head": grads})["head"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params["head"])
    updates = jax.tree.map(lambda u, m: u * m, updates, method.finetune_update_mask(updates))
    head = optax.apply_updates(state.params["head"], updates)
    params = dict(state.params, head=head)
    return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state), {"loss": loss}


def make_finetune_step(backbone, method, tx: optax.GradientTransformation, cfg: StepConfig,
                       mean: jax.Array, std: jax.Array, data_sharding=None):
    """Classifier-only step (see :func:`finetune_update`): batch norm in train mode.

    Same signature as :func:`make_train_step`; ``params['head']`` and ``batch_stats`` change. The
    real batch is
    the class-balanced finetuning set; there is no synthetic stream (synthetic images, when asked
    for, are part of the balanced set) and no distillation.
    """

    def step(state: TrainState, old_vars, pool_x, pool_y, real_idx, synth_lo, synth_hi, task_key):
        del old_vars, synth_lo, synth_hi
        key = jax.random.fold_in(task_key, state.step)
        x = pool_x[real_idx]
        if data_sharding is not None:
            x = jax.lax.with_sharding_constraint(x, data_sharding)
        images = aug_lib.augment(x.astype(jnp.float32) / 255.0, key, crop_padding=cfg.crop_padding,
                                 flip=cfg.flip, brightness=cfg.brightness)
        return finetune_update(backbone, method, tx, state, (images - mean) / std,
                                pool_y[real_idx])

    return step


def make_host_finetune_step(backbone, method, tx: optax.GradientTransformation, cfg: StepConfig,
                            mean: jax.Array, std: jax.Array, data_sharding=None):
    """:func:`make_finetune_step` for the host pipeline (signature of :func:`make_host_train_step`)."""

    def step(state: TrainState, old_vars, x_real, y_real, x_synth, y_synth):
        del old_vars, x_synth, y_synth
        images = (x_real.astype(jnp.float32) / 255.0 - mean) / std
        return finetune_update(backbone, method, tx, state, images, y_real)

    return step


def init_head_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
    """A TrainState whose optimizer covers the head only (balanced finetuning)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params["head"]))


def make_eval_fn(backbone, head_apply: Callable, mean: jax.Array, std: jax.Array,
                 flip: bool = False):
    """``eval_fn(params, batch_stats, images_u8) -> (logits, features)`` in inference mode.

    ``flip=True`` mirrors the images horizontally first (the flipped copies of PODNet's NME means).
    """

    def eval_fn(params, batch_stats, images_u8):
        if flip:
            images_u8 = images_u8[:, :, ::-1, :]
        images = (images_u8.astype(jnp.float32) / 255.0 - mean) / std
        out, _ = forward(backbone, head_apply, params, batch_stats, images, train=False)
        return out["logits"], out["features"]

    return eval_fn

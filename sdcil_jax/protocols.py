"""Building blocks of the protocol configs (``configs/cifar100.py``, ``imagenet100.py``, ...).

A protocol config takes one argument string ``'key=value,key=value'`` (after the ``:`` of
``--config``); :func:`parse_protocol_arg` checks it against the file's choices, and the ``apply_*``
helpers set the groups of keys that the protocols share (PODNet's method, the optimiser, the
generator and the synthetic-data arm), so each config file only states what differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sdcil_jax.errors import ConfigError
from sdcil_jax.generation.backends import BACKENDS

SYNTHETIC_CHOICES = ("none", "distillation", "classification", "both")
GENERATOR_CHOICES = tuple(BACKENDS)
MEMORY_CHOICES = ("real", "synthetic")
COMMON_CHOICES: dict[str, Sequence[str]] = {
    "synthetic": SYNTHETIC_CHOICES,
    "generator": GENERATOR_CHOICES,
    "memory": MEMORY_CHOICES,
    "per_class": ("N",),
    "precision": ("float32", "bfloat16"),
}
COMMON_DEFAULTS = {"synthetic": "both", "generator": "sd", "memory": "real", "per_class": "",
                   "precision": "float32"}


def parse_protocol_arg(arg: str, choices: Mapping[str, Sequence[str]],
                       defaults: Mapping[str, str], file: str) -> dict[str, str]:
    """``'steps=10,synthetic=none'`` -> every argument with its value (defaults filled in).

    ``per_class`` takes any positive integer; every other key one of its ``choices``. Unknown keys,
    bad values and repeated keys raise :class:`ConfigError` naming the valid ones.
    """
    usage = "; ".join(f"{k}={'|'.join(v)}" for k, v in choices.items())
    values, given = dict(defaults), set()
    for item in (p.strip() for p in (arg or "").split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in choices:
            raise ConfigError(f"{file}: unknown argument {item!r}; valid arguments: {usage}.")
        if key in given:
            raise ConfigError(f"{file}: argument {key} is given twice; give it once.")
        given.add(key)
        if key == "per_class":
            if not value.isdigit() or int(value) == 0:
                raise ConfigError(f"{file}: per_class={value!r} must be a positive integer.")
        elif value not in choices[key]:
            raise ConfigError(f"{file}: {key}={value!r} is not one of {', '.join(choices[key])}.")
        values[key] = value
    return values


def apply_podnet(c, *, pod_flat: float, pod_spatial: float, finetune_lr: float) -> None:
    """PODNet's method settings (LSC 10 proxies, NCA margin 0.6, clamp 5, 20 finetuning epochs)."""
    c.method.name = "podnet"
    c.method.pod_flat = pod_flat
    c.method.pod_spatial = pod_spatial
    c.method.nca_margin = 0.6
    c.method.proxies_per_class = 10
    c.method.grad_clip = 5.0
    c.method.finetune_epochs = 20
    c.method.finetune_lr = finetune_lr
    c.memory.per_class = 20
    c.memory.selection = "herding"


def apply_optimiser(c, *, epochs: int, batch_size: int, lr: float, weight_decay: float) -> None:
    """SGD, momentum 0.9, PODNet's per-epoch cosine schedule per task, with the protocol's numbers."""
    c.train.epochs = epochs
    c.train.schedule = "cosine_epoch"
    c.train.batch_size = batch_size
    c.train.lr = lr
    c.train.momentum = 0.9
    c.train.weight_decay = weight_decay
    c.train.flip = True
    c.train.brightness = 63 / 255


def apply_generation(c, args: Mapping[str, str], *, per_class: int, holdout_per_class: int,
                     synthetic_batch: int) -> None:
    """Generator (SD v1.4 Flax bf16, guidance 2.0, 50 steps, 512 px) and the synthetic-data arm."""
    c.generation.backend = args["generator"]
    c.generation.model = "CompVis/stable-diffusion-v1-4"
    c.generation.revision = "flax"
    c.generation.dtype = "bfloat16"
    c.generation.guidance_scale = 2.0
    c.generation.num_inference_steps = 50
    c.generation.resolution = 512
    c.generation.prompt_templates = ["a photo of a {}"]
    c.generation.per_class = per_class
    if args["generator"] == "tiny_sd":  # [ours] smoke runs: the random pipeline's images are noise
        c.generation.resolution = 64
        c.generation.num_inference_steps = 5
    elif args["generator"] == "real_holdout":
        c.generation.per_class = holdout_per_class
        c.dataset.holdout_per_class = holdout_per_class
    c.synthetic.use_in = args["synthetic"]
    c.synthetic.replace_memory = args["memory"] == "synthetic"
    c.synthetic.per_class = int(args["per_class"]) if args["per_class"] else c.generation.per_class
    c.synthetic.batch_size = synthetic_batch  # [ours] one synthetic batch the size of the real one
    c.synthetic.diagnostic_per_class = 0
    # float32 is the official code's arithmetic (and what CPUs run fastest); on TPUs and recent
    # GPUs choose precision=bfloat16: bf16 convolutions, float32 parameters, statistics and losses.
    c.model.dtype = args["precision"]

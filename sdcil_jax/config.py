"""The configuration schema: every hyperparameter, its default, its type and its allowed values.

Configs are ``ml_collections.ConfigDict`` trees built from :func:`base_config`. Config files in
``configs/`` start from it and change values; command-line overrides ``--config.a.b=v`` change one leaf.
:func:`validate` refuses unknown keys, wrong types and values outside their allowed set *before any work
starts*, with one sentence that lists the valid keys or values.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from sdcil_jax.errors import ConfigError

# Keys whose value may take more than one type (the default's type is always accepted too).
_EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "scenario.class_order": (str, list, tuple),
    "generation.prompt_templates": (list, tuple),
    "dataset.class_names": (list, tuple),
    "dataset.mean": (list, tuple),
    "dataset.std": (list, tuple),
}

# Keys that were replaced: using one is refused with what to write instead.
_REPLACED: dict[str, str] = {
    "generation.memory_efficient_attention": (
        "generation.attention='memory_efficient' (was True) or 'standard' (was False)"),
}

# Keys restricted to a set of values that no registry owns.
_FIXED_CHOICES: dict[str, tuple[str, ...]] = {
    "dataset.pipeline": ("auto", "device", "host"),
    "memory.selection": ("herding", "random"),
    "generation.dtype": ("bfloat16", "float32", "float16"),
    "model.stem": ("podnet", "torchvision"),
    "model.dtype": ("float32", "bfloat16"),
    "train.schedule": ("cosine_epoch", "cosine_step"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Every key restricted to a set of values; registry-backed keys take the registry's names.

    ``method.name`` from :data:`sdcil_jax.methods.REGISTRY`, ``model.name`` from
    :data:`sdcil_jax.models.BACKBONES`, ``generation.backend`` / ``generation.scheduler`` from the
    generation backends and schedulers, ``generation.store_format`` from the store's codecs,
    ``synthetic.use_in`` from the batch-stream masks, ``generation.attention`` from
    :data:`sdcil_jax.generation.attention.KINDS` (imported here, not at module load, so a
    config file stays cheap to import).
    """
    from sdcil_jax.data.stream import USES
    from sdcil_jax.generation.attention import KINDS
    from sdcil_jax.generation.backends import BACKENDS
    from sdcil_jax.generation.schedulers import SCHEDULERS
    from sdcil_jax.generation.shards import FORMATS
    from sdcil_jax.methods import REGISTRY
    from sdcil_jax.models import BACKBONES

    out = dict(_FIXED_CHOICES)
    out.update({"method.name": tuple(REGISTRY), "model.name": tuple(BACKBONES),
                "generation.backend": tuple(BACKENDS), "generation.scheduler": tuple(SCHEDULERS),
                "generation.store_format": tuple(FORMATS), "synthetic.use_in": tuple(USES),
                "generation.attention": tuple(KINDS)})
    return out


def base_config() -> ml_collections.ConfigDict:
    """Every key the library reads, with its default (PODNet-like CIFAR100 values where they apply)."""
    c = ml_collections.ConfigDict(type_safe=False)
    c.seed = 0

    c.dataset = dict(
        name="cifar100",  # 'digits' (embedded, offline) or any prepared tfds image classification set
        data_dir="",  # tfds data dir; '' = TFDS_DATA_DIR or ~/tensorflow_datasets
        holdout_per_class=0,  # real training images per class kept out of training (real_holdout pool)
        class_names=[],  # overrides of readable class names for prompts: ["12=red bridge", ...]
        pipeline="auto",  # 'device' (uint8 pool on device), 'host' (decode+augment on host), 'auto'
        workers=8,  # host pipeline: grain worker processes decoding images (0: in the main process)
        prefetch=2,  # host pipeline batches prefetched to the devices
        image_size=224,  # host pipeline: random-resized crop size (train) / centre crop (test)
        test_resize=256,  # host pipeline: shorter side before the centre crop at test time
        # Per-channel normalisation of [0, 1] pixels; [] = computed from the training images
        # (device pipeline) or ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) (host).
        mean=[],
        std=[],
    )
    c.scenario = dict(
        initial_increment=50,
        increment=10,
        class_order="identity",  # 'identity', a named order (see data.class_orders) or a list of ids
        max_tasks=0,  # 0 = run every task
    )
    c.method = dict(
        name="replay",
        pod_flat=1.0,  # PODNet lambda_flat (times sqrt(seen / new classes))
        pod_spatial=3.0,  # PODNet lambda_spatial (times sqrt(seen / new classes))
        nca_margin=0.6,
        proxies_per_class=10,
        finetune_epochs=20,  # balanced finetuning of the classifier (t > 0); 0 disables
        finetune_lr=0.05,  # constant (no schedule), as the official finetuning
        grad_clip=5.0,  # element-wise gradient clamp to [-grad_clip, grad_clip]; 0 disables
    )
    c.memory = dict(per_class=20, selection="herding")
    c.synthetic = dict(
        use_in="none",
        per_class=500,  # synthetic images per old class used in training
        batch_size=0,  # 0 = train.batch_size
        replace_memory=False,  # use synthetic images as the exemplar memory instead of real ones
        in_finetuning=False,  # add synthetic images of old classes to the balanced finetuning
        diagnostic_per_class=0,  # synthetic images per class held out to measure the domain gap
    )
    c.generation = dict(
        backend="sd",
        model="CompVis/stable-diffusion-v1-4",  # hub id or local folder
        revision="flax",
        bf16_revision="bf16",  # hub revision loaded instead of 'flax' when dtype is bfloat16 ('' = cast)
        dtype="bfloat16",
        scheduler="pndm",  # 'pndm' (SD v1.4's PLMS), 'ddim' or 'dpm_solver' (DPM-Solver++ 2M)
        guidance_scale=2.0,
        num_inference_steps=50,
        resolution=512,
        prompt_templates=["a photo of a {}"],
        per_class=500,
        batch_per_device=4,
        # UNet and VAE attention: 'auto' (fused on GPU, standard on TPU/CPU), 'standard' (diffusers'),
        # 'memory_efficient' (diffusers' chunked UNet attention: less memory, slower, other pixels) or
        # 'fused' (jax.nn.dot_product_attention: cuDNN flash attention on GPU); see
        # sdcil_jax.generation.attention
        attention="auto",
        store_dir="",  # '' = <workdir>/replay_store
        # How stored images are encoded: 'raw' (uint8), 'png' (lossless), 'jpeg' (quality 95, lossy)
        # or 'auto' (raw up to 64 px, jpeg above; see benchmarks/RESULTS.md).
        store_format="auto",
        images_per_shard=64,  # images per store file: a killed generation loses at most one
        preview_per_class=4,
    )
    c.model = dict(
        name="resnet_digits",
        width=16,  # resnet_digits only
        last_relu=False,
        stem="podnet",  # resnet18 only: 'podnet' (3x3/1 conv + max-pool, official) or 'torchvision'
        # Computation dtype of convolutions and activations: 'bfloat16' for TPUs and recent GPUs
        # (parameters, batch-norm statistics, features, classifier and losses stay float32).
        dtype="float32",
    )
    c.checkpoint = dict(
        every_minutes=5.0,  # save inside a task at most this often (and at every task end)
        every_steps=0,  # if > 0, also save every this many steps
        keep=3,  # checkpoints kept (older ones are deleted)
        # With several processes, how often (in steps) they agree on saving / stopping (a tiny
        # all-gather; a signal is acted on within this many steps).
        sync_every_steps=10,
    )
    c.train = dict(
        epochs=160,
        batch_size=128,
        lr=0.1,
        # 'cosine_epoch': PODNet's CosineAnnealingLR stepped once per epoch (epochs 0 and 1 use lr,
        # epoch e >= 1 uses lr * (1 + cos(pi * (e - 1) / epochs)) / 2); 'cosine_step': per step.
        schedule="cosine_epoch",
        momentum=0.9,
        weight_decay=5e-4,
        eval_batch_size=512,
        crop_padding=0,  # random crop after zero padding (4 for CIFAR); 0 disables
        flip=False,  # random horizontal flip
        brightness=0.0,  # multiplicative brightness jitter U[1-b, 1+b] (63/255 for CIFAR); 0 disables
    )
    return c


def _leaves(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _did_you_mean(key: str, schema: Any) -> str:
    """`` (did you mean train.epochs?)`` for the closest valid key, or ''."""
    close = difflib.get_close_matches(key, sorted(schema), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _type_ok(key: str, value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    allowed = (type(default),) + _EXTRA_TYPES.get(key, ())
    return isinstance(value, allowed)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check keys, types and choices against :func:`base_config`; raise :class:`ConfigError`."""
    schema = _leaves(base_config())
    given = _leaves(config)
    unknown = sorted(set(given) - set(schema))
    _refuse_replaced(unknown)
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(unknown)}{_did_you_mean(unknown[0], schema)}; use one "
            f"of the valid keys: {', '.join(sorted(schema))}."
        )
    missing = sorted(set(schema) - set(given))
    if missing:
        raise ConfigError(
            f"Config is missing key(s) {', '.join(missing)}; build configs from "
            "sdcil_jax.config.base_config() so every key has a default."
        )
    restricted = choices()
    for key, value in given.items():
        if not _type_ok(key, value, schema[key]):
            raise ConfigError(
                f"Config key {key} must be of type {type(schema[key]).__name__}, "
                f"got {value!r} ({type(value).__name__}); fix the value in the config or override."
            )
        if key in restricted and value not in restricted[key]:
            raise ConfigError(
                f"Config key {key}={value!r} is not one of {', '.join(restricted[key])}; pick one "
                "of those."
            )
    _check_ranges(config)
    return config


def _refuse_replaced(keys: Sequence[str]) -> None:
    for key in keys:
        if key in _REPLACED:
            raise ConfigError(f"Config key {key} was replaced; use {_REPLACED[key]}.")


def _check_ranges(c: ml_collections.ConfigDict) -> None:
    positive = [
        "train.epochs", "train.batch_size", "train.eval_batch_size", "generation.num_inference_steps",
        "generation.resolution", "generation.batch_per_device", "generation.per_class",
        "generation.images_per_shard",
        "scenario.initial_increment", "scenario.increment", "model.width",
        "method.proxies_per_class", "method.finetune_lr",
        "checkpoint.keep", "checkpoint.sync_every_steps", "dataset.image_size",
        "dataset.test_resize",
    ]
    for key in positive:
        section, name = key.split(".")
        if c[section][name] <= 0:
            raise ConfigError(f"Config key {key} must be positive, got {c[section][name]!r}; set it "
                              "to 1 or more.")
    non_negative = ["memory.per_class", "synthetic.per_class", "synthetic.batch_size",
                    "scenario.max_tasks", "dataset.holdout_per_class", "generation.preview_per_class",
                    "train.crop_padding", "train.brightness", "train.weight_decay",
                    "train.momentum", "method.pod_flat", "method.pod_spatial",
                    "method.finetune_epochs", "method.grad_clip", "synthetic.diagnostic_per_class",
                    "checkpoint.every_minutes", "checkpoint.every_steps", "dataset.prefetch",
                    "dataset.workers"]
    for key in non_negative:
        section, name = key.split(".")
        if c[section][name] < 0:
            raise ConfigError(f"Config key {key} must be >= 0, got {c[section][name]!r}; set it to "
                              "0 or more.")
    mean, std = list(c.dataset.mean), list(c.dataset.std)
    if len(mean) != len(std) or any(not isinstance(v, (int, float)) for v in mean + std) or any(
            v <= 0 for v in std):
        raise ConfigError(
            f"dataset.mean={mean!r} and dataset.std={std!r} must be lists of the same length (one "
            "number per channel, std > 0), or both empty to compute them from the training images."
        )
    for item in c.dataset.class_names:
        head, sep, _ = str(item).partition("=")
        if not sep or not head.strip().isdigit():
            raise ConfigError(
                f"dataset.class_names entry {item!r} must look like 'ID=readable name', "
                "e.g. '30=dolphin'."
            )
    uses_synthetic = (c.synthetic.use_in != "none" or c.synthetic.replace_memory
                      or c.synthetic.diagnostic_per_class > 0)
    if uses_synthetic and (
            c.synthetic.per_class + c.synthetic.diagnostic_per_class > c.generation.per_class):
        raise ConfigError(
            f"synthetic.per_class + synthetic.diagnostic_per_class = "
            f"{c.synthetic.per_class + c.synthetic.diagnostic_per_class} exceeds "
            f"generation.per_class={c.generation.per_class}; raise generation.per_class or lower "
            "synthetic.per_class."
        )
    if c.train.lr <= 0:
        raise ConfigError(f"Config key train.lr must be positive, got {c.train.lr!r}; set it above 0.")
    if c.generation.resolution % 8:
        raise ConfigError(
            f"generation.resolution={c.generation.resolution} must be a multiple of 8 "
            "(Stable Diffusion works on 8x down-sampled latents)."
        )
    for tpl in c.generation.prompt_templates:
        if not isinstance(tpl, str) or "{}" not in tpl:
            raise ConfigError(
                f"generation.prompt_templates entry {tpl!r} must be a string containing '{{}}' "
                "where the class name goes."
            )
    if c.generation.backend == "real_holdout" and c.dataset.holdout_per_class < c.generation.per_class:
        raise ConfigError(
            f"generation.backend=real_holdout needs dataset.holdout_per_class >= generation.per_class "
            f"(got {c.dataset.holdout_per_class} < {c.generation.per_class}); raise the holdout or "
            "lower generation.per_class."
        )


def parse_override_value(text: str) -> Any:
    """Parse a command-line value: Python literals (1, 0.5, True, [1, 2]) or a bare string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``a.b=value`` overrides in place; unknown keys raise :class:`ConfigError`."""
    schema = _leaves(base_config())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like --config.section.key=value.")
        key, text = item.split("=", 1)
        _refuse_replaced([key])
        if key not in schema:
            raise ConfigError(
                f"Unknown config key {key} in override{_did_you_mean(key, schema)}; use one of the "
                f"valid keys: {', '.join(sorted(schema))}."
            )
        value = parse_override_value(text)
        default = schema[key]
        if isinstance(default, str) and not isinstance(value, str) and key not in _EXTRA_TYPES:
            value = text  # e.g. --config.dataset.name=123 stays a string
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        section, name = key.split(".") if "." in key else (None, key)
        if section is None:
            config[name] = value
        else:
            config[section][name] = value


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load ``path.py`` or ``path.py:arg`` and call its ``get_config()`` / ``get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"Config file {path} does not exist; pass e.g. --config configs/quickstart.py.")
    module_spec = importlib.util.spec_from_file_location("sdcil_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # a user's config file: report it in one line
        raise ConfigError(f"Config file {path} failed to load ({exc}); fix the file.") from exc
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {path} defines no get_config(); add one returning a ConfigDict.")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except TypeError as exc:
        raise ConfigError(f"Config file {path}: get_config() rejected argument {arg!r} ({exc}).") from exc
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return _json_ready(config.to_dict())


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj

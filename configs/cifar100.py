"""CIFAR100 B50: PODNet's protocol (50 base classes, then 5/10/25/50 steps) + Stable Diffusion replay.

Prepare CIFAR100 once (needs the network and TensorFlow: ``pip install -e ".[prepare]"``), then run:

    python -m sdcil_jax.main --config configs/cifar100.py --mode prepare
    python -m sdcil_jax.main --config configs/cifar100.py:steps=10,order=0,synthetic=both \\
        --workdir runs/cifar100_b50_10steps

Arguments after ``:`` (comma-separated ``key=value``, all optional; defaults marked *):
  steps=5*|10|25|50          tasks after the 50 base classes (10, 5, 2, 1 new classes per task)
  order=0*|1|2|seed1993      PODNet's CIFAR100 orders 0-2, or the np.random.seed(1993) order of
                             PyCIL / FACIL / Mammoth
  synthetic=none|distillation|classification|both*
                             where the generated images of old classes are used (none = PODNet alone,
                             distillation = the GD-like arm, both = the full method)
  generator=sd*|tiny_sd|real_holdout
                             SD v1.4 (Flax weights, bf16); the tiny offline random pipeline (smoke
                             runs: 64x64, 5 steps); or held-out real training images (upper bound:
                             100 per class are taken out of training, so the pool has 100 per class)
  memory=real*|synthetic     exemplar memory: 20 real images per class (herding), or the first
                             ``per_class`` synthetic images of each old class instead (no real memory)
  per_class=N                synthetic images per old class used in training (default 500; at most
                             generation.per_class, so every arm can share one replay store)

The synthetic-only memory table (20/100/500 per class, 5 steps):
``configs/cifar100.py:memory=synthetic,synthetic=none,per_class=20``. To share one replay store
between arms, add ``--config.generation.store_dir=runs/cifar100_store``.

Defaults are PODNet's CIFAR100 protocol (docs/method.md): ResNet-32 (no ReLU after the residual
addition), LSC with 10 proxies per class, NCA margin 0.6, POD-flat 1, POD-spatial 3, gradients
clamped to [-5, 5], SGD momentum 0.9, weight decay 5e-4, 160 epochs at lr 0.1 with a cosine schedule,
batch 128, memory of 20 per class by herding, balanced finetuning of the classifier for 20 epochs at
lr 0.05, random crop 32 with 4 px padding, flip, brightness jitter 63/255. Every value can be
overridden with ``--config.section.key=value``.
"""

from sdcil_jax.config import base_config
from sdcil_jax.errors import ConfigError

_FILE = "configs/cifar100.py"
_CHOICES = {
    "steps": ("5", "10", "25", "50"),
    "order": ("0", "1", "2", "seed1993"),
    "synthetic": ("none", "distillation", "classification", "both"),
    "generator": ("sd", "tiny_sd", "real_holdout"),
    "memory": ("real", "synthetic"),
    "per_class": ("N",),
}
_DEFAULTS = {"steps": "5", "order": "0", "synthetic": "both", "generator": "sd", "memory": "real",
             "per_class": ""}
_ORDERS = {"0": "cifar100_order0", "1": "cifar100_order1", "2": "cifar100_order2",
           "seed1993": "cifar100_seed1993"}
BASE_CLASSES = 50
SYNTHETIC_PER_CLASS = 500  # generated and used per old class (method.md: 500 for CIFAR100)
HOLDOUT_PER_CLASS = 100  # [ours] real_holdout: CIFAR100 has only 500 training images per class


def _usage() -> str:
    return "; ".join(f"{k}={'|'.join(v)}" for k, v in _CHOICES.items())


def parse_arg(arg: str) -> dict:
    """``'steps=10,order=1'`` -> every argument with its value (defaults filled in)."""
    values, given = dict(_DEFAULTS), set()
    for item in (p.strip() for p in (arg or "").split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or key not in _CHOICES:
            raise ConfigError(f"{_FILE}: unknown argument {item!r}; valid arguments: {_usage()}.")
        if key in given:
            raise ConfigError(f"{_FILE}: argument {key} is given twice; give it once.")
        given.add(key)
        if key == "per_class":
            if not value.isdigit() or int(value) == 0:
                raise ConfigError(f"{_FILE}: per_class={value!r} must be a positive integer.")
        elif value not in _CHOICES[key]:
            raise ConfigError(f"{_FILE}: {key}={value!r} is not one of {', '.join(_CHOICES[key])}.")
        values[key] = value
    return values


def get_config(arg: str = ""):
    a = parse_arg(arg)
    c = base_config()
    c.dataset.name = "cifar100"
    c.dataset.pipeline = "device"  # uint8 training set on the devices, augmented in the jitted step

    steps = int(a["steps"])
    c.scenario.initial_increment = BASE_CLASSES
    c.scenario.increment = (100 - BASE_CLASSES) // steps
    c.scenario.class_order = _ORDERS[a["order"]]

    c.model.name = "resnet32"
    c.model.last_relu = False

    c.method.name = "podnet"
    c.method.pod_flat = 1.0
    c.method.pod_spatial = 3.0
    c.method.nca_margin = 0.6
    c.method.proxies_per_class = 10
    c.method.grad_clip = 5.0
    c.method.finetune_epochs = 20
    c.method.finetune_lr = 0.05

    c.memory.per_class = 20
    c.memory.selection = "herding"

    c.train.epochs = 160
    c.train.batch_size = 128
    c.train.lr = 0.1
    c.train.momentum = 0.9
    c.train.weight_decay = 5e-4
    c.train.crop_padding = 4
    c.train.flip = True
    c.train.brightness = 63 / 255

    c.generation.backend = a["generator"]
    c.generation.model = "CompVis/stable-diffusion-v1-4"
    c.generation.revision = "flax"
    c.generation.dtype = "bfloat16"
    c.generation.guidance_scale = 2.0
    c.generation.num_inference_steps = 50
    c.generation.resolution = 512
    c.generation.prompt_templates = ["a photo of a {}"]
    c.generation.per_class = SYNTHETIC_PER_CLASS
    if a["generator"] == "tiny_sd":  # [ours] smoke runs: the random pipeline's images are noise
        c.generation.resolution = 64
        c.generation.num_inference_steps = 5
    elif a["generator"] == "real_holdout":
        c.generation.per_class = HOLDOUT_PER_CLASS
        c.dataset.holdout_per_class = HOLDOUT_PER_CLASS

    c.synthetic.use_in = a["synthetic"]
    c.synthetic.replace_memory = a["memory"] == "synthetic"
    c.synthetic.per_class = int(a["per_class"]) if a["per_class"] else c.generation.per_class
    c.synthetic.batch_size = 128  # [ours] one synthetic batch the size of the real batch per step
    c.synthetic.diagnostic_per_class = 0
    return c

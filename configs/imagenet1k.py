"""ImageNet-1k B500: PODNet's protocol (500 base classes, then 5 or 10 steps) + SD replay.

All 1000 classes of tfds ``imagenet2012`` in PODNet's ``imagenet1000`` order.

Prepare ImageNet once: download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from
https://image-net.org into ``<data_dir>/downloads/manual/`` (``<data_dir>`` is dataset.data_dir, by
default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), install the ``prepare`` extra
(``pip install -e ".[prepare]"``), then:

    python -m sdcil_jax.main --config configs/imagenet1k.py --mode prepare
    python -m sdcil_jax.main --config configs/imagenet1k.py:steps=10,synthetic=both \\
        --workdir runs/imagenet1k_b500_10steps

Arguments after ``:`` (comma-separated ``key=value``, all optional; defaults marked *):
  steps=5*|10                tasks after the 500 base classes (100 or 50 new classes per task)
  synthetic=none|distillation|classification|both*
                             where the generated images of old classes are used
  generator=sd*|tiny_sd|real_holdout
                             SD v1.4 (Flax weights, bf16); the tiny offline random pipeline (smoke
                             runs: 64x64, 5 steps); or 100 held-out real training images per class
  memory=real*|synthetic     20 real exemplars per class (herding), or the synthetic images instead
  precision=float32*|bfloat16
                             computation dtype of the network: bfloat16 on TPUs and recent GPUs
                             (bf16 convolutions; float32 parameters, BN statistics and losses)
  per_class=N                synthetic images per old class used in training (default 100)

Defaults are PODNet's ImageNet protocol (docs/method.md): ResNet-18, LSC with 10 proxies, NCA margin
0.6, POD-flat 10, POD-spatial 8, gradients clamped to [-5, 5], SGD momentum 0.9, weight decay 1e-4,
90 epochs at lr 0.05 (cosine), batch 64, memory 20 per class by herding, balanced finetuning for 20
epochs at lr 0.01; random-resized crop 224, flip, brightness jitter 63/255; test: resize 256 + centre
crop 224, decoded and augmented on the host (dataset.pipeline='host').
"""

from sdcil_jax.config import base_config
from sdcil_jax.protocols import (
    COMMON_CHOICES,
    COMMON_DEFAULTS,
    apply_generation,
    apply_optimiser,
    apply_podnet,
    parse_protocol_arg,
)

_FILE = "configs/imagenet1k.py"
_CHOICES = {"steps": ("5", "10"), **COMMON_CHOICES}
_DEFAULTS = {"steps": "5", **COMMON_DEFAULTS}
NUM_CLASSES = 1000
BASE_CLASSES = 500
# [ours] 100 generated images per class: up to 900 old classes make 90k SD images (500 per class,
# as for CIFAR100, would be 450k); raise with --config.generation.per_class and per_class=N.
SYNTHETIC_PER_CLASS = 100
HOLDOUT_PER_CLASS = 100  # [ours] real_holdout pool (ImageNet has at least 732 training images a class)


def parse_arg(arg: str) -> dict:
    """``'steps=10,synthetic=none'`` -> every argument with its value (defaults filled in)."""
    return parse_protocol_arg(arg, _CHOICES, _DEFAULTS, _FILE)


def get_config(arg: str = ""):
    a = parse_arg(arg)
    c = base_config()
    c.dataset.name = "imagenet2012"
    c.dataset.pipeline = "host"  # JPEG decoding + augmentation on the host, prefetched to devices
    c.dataset.image_size = 224
    c.dataset.test_resize = 256
    c.dataset.mean = [0.485, 0.456, 0.406]  # PODNet's (torchvision's) ImageNet normalisation
    c.dataset.std = [0.229, 0.224, 0.225]
    # [ours] Two pairs of classes share their first WordNet lemma; one prompt for two labels would
    # make label noise, so these four get distinct readable names (override more the same way).
    c.dataset.class_names = ["134=crane bird", "517=construction crane", "638=leotard",
                             "639=one-piece swimsuit"]
    c.scenario.initial_increment = BASE_CLASSES
    c.scenario.increment = (NUM_CLASSES - BASE_CLASSES) // int(a["steps"])
    c.scenario.class_order = "imagenet1000"
    c.model.name = "resnet18"
    c.model.stem = "podnet"  # official: 3x3/1 conv + 3x3/2 max-pool (112x112 at 224)
    c.model.last_relu = False
    apply_podnet(c, pod_flat=10.0, pod_spatial=8.0, finetune_lr=0.01)
    apply_optimiser(c, epochs=90, batch_size=64, lr=0.05, weight_decay=1e-4)
    c.train.eval_batch_size = 256
    c.train.crop_padding = 0  # the host pipeline does the random-resized crop
    apply_generation(c, a, per_class=SYNTHETIC_PER_CLASS, holdout_per_class=HOLDOUT_PER_CLASS,
                     synthetic_batch=64)
    return c

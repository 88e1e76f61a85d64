"""ImageNet-Subset B50: PODNet's protocol (50 base classes, then 5/10/25/50 steps) + SD replay.

ImageNet-Subset is the 100 classes of tfds ``imagenet2012`` with label id 0..99 (PODNet's split files
list exactly those WordNet ids), in PODNet's ``imagenet100`` order. The subset is the explicit list
``scenario.class_order`` below (other papers use other 100-class subsets; give yours the same way).

Prepare ImageNet once: download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from
https://image-net.org into ``<data_dir>/downloads/manual/`` (``<data_dir>`` is dataset.data_dir, by
default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), install the ``prepare`` extra
(``pip install -e ".[prepare]"``), then:

    python -m sdcil_jax.main --config configs/imagenet100.py --mode prepare
    python -m sdcil_jax.main --config configs/imagenet100.py:steps=10,synthetic=both \\
        --workdir runs/imagenet100_b50_10steps

Arguments after ``:`` (comma-separated ``key=value``, all optional; defaults marked *):
  steps=5*|10|25|50          tasks after the 50 base classes (10, 5, 2, 1 new classes per task)
  synthetic=none|distillation|classification|both*
                             where the generated images of old classes are used
  generator=sd*|tiny_sd|real_holdout
                             SD v1.4 (Flax weights, bf16); the tiny offline random pipeline (smoke
                             runs: 64x64, 5 steps); or 100 held-out real training images per class
  memory=real*|synthetic     20 real exemplars per class (herding), or the synthetic images instead
  precision=float32*|bfloat16
                             computation dtype of the network: bfloat16 on TPUs and recent GPUs
                             (bf16 convolutions; float32 parameters, BN statistics and losses)
  per_class=N                synthetic images per old class used in training (default 500)

Defaults are PODNet's ImageNet protocol (docs/method.md): ResNet-18, LSC with 10 proxies, NCA margin
0.6, POD-flat 10, POD-spatial 8, gradients clamped to [-5, 5], SGD momentum 0.9, weight decay 5e-4,
90 epochs at lr 0.05 (cosine), batch 64, memory 20 per class by herding, balanced finetuning for 20
epochs at lr 0.01; random-resized crop 224, flip, brightness jitter 63/255; test: resize 256 + centre
crop 224, decoded and augmented on the host (dataset.pipeline='host').
"""

from sdcil_jax.config import base_config
from sdcil_jax.data import named_orders
from sdcil_jax.protocols import (
    COMMON_CHOICES,
    COMMON_DEFAULTS,
    apply_generation,
    apply_optimiser,
    apply_podnet,
    parse_protocol_arg,
)

_FILE = "configs/imagenet100.py"
_CHOICES = {"steps": ("5", "10", "25", "50"), **COMMON_CHOICES}
_DEFAULTS = {"steps": "5", **COMMON_DEFAULTS}
NUM_CLASSES = 100
BASE_CLASSES = 50
# [ours] 500 generated images per class, as for CIFAR100 (the seed paper's ImageNet count is unknown).
SYNTHETIC_PER_CLASS = 500
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
    c.scenario.initial_increment = BASE_CLASSES
    c.scenario.increment = (NUM_CLASSES - BASE_CLASSES) // int(a["steps"])
    # The subset as an explicit list of imagenet2012 label ids (0..99) in PODNet's order.
    c.scenario.class_order = list(named_orders()["imagenet100"])
    c.model.name = "resnet18"
    c.model.stem = "podnet"  # official: 3x3/1 conv + 3x3/2 max-pool (112x112 at 224)
    c.model.last_relu = False
    apply_podnet(c, pod_flat=10.0, pod_spatial=8.0, finetune_lr=0.01)
    apply_optimiser(c, epochs=90, batch_size=64, lr=0.05, weight_decay=5e-4)
    c.train.eval_batch_size = 256
    c.train.crop_padding = 0  # the host pipeline does the random-resized crop
    apply_generation(c, a, per_class=SYNTHETIC_PER_CLASS, holdout_per_class=HOLDOUT_PER_CLASS,
                     synthetic_batch=64)
    return c

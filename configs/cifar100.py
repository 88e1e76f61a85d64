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
  precision=float32*|bfloat16
                             computation dtype of the network: bfloat16 on TPUs and recent GPUs
                             (bf16 convolutions; float32 parameters, BN statistics and losses)
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
from sdcil_jax.protocols import (
    COMMON_CHOICES,
    COMMON_DEFAULTS,
    apply_generation,
    apply_optimiser,
    apply_podnet,
    parse_protocol_arg,
)

_FILE = "configs/cifar100.py"
_CHOICES = {"steps": ("5", "10", "25", "50"), "order": ("0", "1", "2", "seed1993"), **COMMON_CHOICES}
_DEFAULTS = {"steps": "5", "order": "0", **COMMON_DEFAULTS}
_ORDERS = {"0": "cifar100_order0", "1": "cifar100_order1", "2": "cifar100_order2",
           "seed1993": "cifar100_seed1993"}
BASE_CLASSES = 50
SYNTHETIC_PER_CLASS = 500  # generated and used per old class (500 for CIFAR100)
HOLDOUT_PER_CLASS = 100  # [ours] real_holdout: CIFAR100 has only 500 training images per class


def parse_arg(arg: str) -> dict:
    """``'steps=10,order=1'`` -> every argument with its value (defaults filled in)."""
    return parse_protocol_arg(arg, _CHOICES, _DEFAULTS, _FILE)


def get_config(arg: str = ""):
    a = parse_arg(arg)
    c = base_config()
    c.dataset.name = "cifar100"
    c.dataset.pipeline = "device"  # uint8 training set on the devices, augmented in the jitted step
    # PODNet's CIFAR100 normalisation constants (inclearn/lib/data/datasets.py::iCIFAR100).
    c.dataset.mean = [0.5071, 0.4867, 0.4408]
    c.dataset.std = [0.2675, 0.2565, 0.2761]
    c.scenario.initial_increment = BASE_CLASSES
    c.scenario.increment = (100 - BASE_CLASSES) // int(a["steps"])
    c.scenario.class_order = _ORDERS[a["order"]]
    c.model.name = "resnet32"
    c.model.last_relu = False
    apply_podnet(c, pod_flat=1.0, pod_spatial=3.0, finetune_lr=0.05)
    apply_optimiser(c, epochs=160, batch_size=128, lr=0.1, weight_decay=5e-4)
    c.train.crop_padding = 4
    apply_generation(c, a, per_class=SYNTHETIC_PER_CLASS, holdout_per_class=HOLDOUT_PER_CLASS,
                     synthetic_batch=128)
    return c

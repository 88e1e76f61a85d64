"""Offline quickstart: PODNet + synthetic replay in both losses on scikit-learn digits, 5 tasks.

Runs in a few minutes on 2 CPU cores with no network:

    python -m sdcil_jax.main --config configs/quickstart.py --workdir /tmp/sdcil_quickstart
"""

from sdcil_jax.config import base_config


def get_config():
    config = base_config()
    config.dataset.name = "digits"
    config.dataset.holdout_per_class = 30
    config.scenario.initial_increment = 2
    config.scenario.increment = 2
    config.scenario.class_order = "identity"
    config.method.name = "podnet"
    config.method.finetune_epochs = 4
    config.method.finetune_lr = 0.01
    config.model.name = "resnet_digits"
    config.memory.per_class = 5
    config.synthetic.use_in = "both"
    config.synthetic.per_class = 30
    config.synthetic.batch_size = 32
    config.generation.backend = "tiny_sd"
    config.generation.resolution = 32
    config.generation.num_inference_steps = 3
    config.generation.per_class = 30
    config.generation.preview_per_class = 4
    config.train.epochs = 8
    config.train.batch_size = 64
    config.train.lr = 0.05
    return config

"""Registry of CIL methods keyed by ``config.method.name``."""

from __future__ import annotations

from sdcil_jax.errors import ConfigError
from sdcil_jax.methods.base import Method, TaskInfo
from sdcil_jax.methods.cross_entropy import Finetune, Joint, Replay
from sdcil_jax.methods.icarl import ICaRL
from sdcil_jax.methods.podnet import PODNet

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Finetune, Joint, Replay, ICaRL, PODNet)}


def get_method(config, info: TaskInfo) -> Method:
    """Instantiate the configured method for one task."""
    try:
        cls = REGISTRY[config.method.name]
    except KeyError:
        raise ConfigError(
            f"Unknown method.name={config.method.name!r}; choose one of {', '.join(REGISTRY)}."
        ) from None
    return cls(config, info)


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ConfigError(f"Unknown method.name={name!r}; choose one of {', '.join(REGISTRY)}.")
    return REGISTRY[name]


__all__ = ["Method", "TaskInfo", "REGISTRY", "get_method", "method_class"]

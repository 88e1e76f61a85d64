"""Registry of CIL methods keyed by ``config.method.name``."""

from __future__ import annotations

from sdcil_jax.errors import ConfigError
from sdcil_jax.methods.base import Method, TaskInfo
from sdcil_jax.methods.cross_entropy import Finetune, Joint, Replay
from sdcil_jax.methods.icarl import ICaRL
from sdcil_jax.methods.podnet import PODNet

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (Finetune, Joint, Replay, ICaRL, PODNet)}


def get_method(config, info: TaskInfo | None = None) -> Method:
    """Instantiate the configured method: for a whole run (``info=None``: the traced hooks get each
    task's ``args``), or for one task (``info``: its ``task_args`` are the default ``args``)."""
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

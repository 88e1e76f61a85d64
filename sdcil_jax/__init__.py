"""sdcil_jax: class-incremental learning with Stable Diffusion replay, in JAX/Flax.

``sdcil_jax.run(config, workdir)`` runs an experiment from a notebook exactly as the command line does.
"""

from __future__ import annotations

import warnings

__version__ = "0.1.0"

# diffusers' Flax classes print one deprecation notice per construction; silence only that message.
warnings.filterwarnings("ignore", message=r"Flax classes are deprecated.*")


def run(config, workdir: str, mode: str = "all", progress: bool = True) -> dict:
    """Run the experiment described by ``config`` in ``workdir``; returns the results dict."""
    from sdcil_jax.runner import run as _run

    return _run(config, workdir, mode=mode, progress=progress)


__all__ = ["run", "__version__"]

"""One persistent XLA compilation cache for the suite's subprocess runs.

The CLI runs of the suite (reliability kills and reruns, multi-host runs, end-to-end and bad-input
runs, the notebook's kernel) compile the same quickstart programs again and again: about half of a
short run's 30 s on 2 cores. With JAX's persistent cache the second and later runs load them.

Entries are kept apart by (processes, devices per process): XLA:CPU fixes some loop splits at
compile time from the process's intra-op parallelism, max(cores, devices), and a multi-process
client should only load executables built by one like it. Otherwise JAX's own rules apply: only
process 0 of a multi-process run writes; an entry it cannot read (a writer killed mid-write) is
reported as a warning and compiled again. The in-process tests do not use the cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_VAR = "SDCIL_TEST_XLA_CACHE"
if not os.environ.get(_VAR):
    os.environ[_VAR] = tempfile.mkdtemp(prefix="sdcil_xla_cache_")
    atexit.register(shutil.rmtree, os.environ[_VAR], True)


def cache_env(devices: int = 4, processes: int = 1) -> dict[str, str]:
    """Environment variables that point a subprocess's JAX at the cache for its shape."""
    return {"JAX_COMPILATION_CACHE_DIR": os.path.join(os.environ[_VAR], f"{processes}x{devices}"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

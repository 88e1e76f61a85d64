"""Device memory of the generation program, from XLA's compiled memory analysis (no execution).

For the engine's per-device program at ``B`` images per device, ``bytes(B) = arguments + outputs +
temporaries - aliased`` as reported by ``jit(...).lower(...).compile().memory_analysis()`` (per
device: the program is SPMD). Two compilations, at ``B`` and ``B + 1``, give the linear model
``bytes(b) = fixed + per_image * b`` with ``per_image = bytes(B + 1) - bytes(B)``, hence the largest
micro-batch that fits a device of capacity ``C``: ``floor((C - fixed) / per_image)``. The capacity is
the device's ``memory_stats()['bytes_limit']``; the CPU backend reports none, and then nothing is
compiled or printed. Costs two compilations of the sampler (the run's own may reuse neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

GIB = 2 ** 30


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def device_capacity(device: Any) -> int | None:
    """Bytes the device may allocate (``memory_stats()['bytes_limit']``), None where unknown."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats raise or return None)
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def program_bytes(engine: Any, out_hw_c: Sequence[int], per_device: int) -> int | None:
    """Per-device bytes of ``engine``'s program at ``per_device`` images (None: no analysis)."""
    compiled = engine.lower(out_hw_c, per_device).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


def memory_plan(engine: Any, out_hw_c: Sequence[int], capacity: int | None = None) -> str:
    """``plan: device memory ...`` for the engine's ``batch_per_device``, or '' where the device's
    capacity or XLA's memory analysis is unknown (the CPU backend)."""
    device = engine.mesh.devices.flat[0]
    capacity = capacity if capacity is not None else device_capacity(device)
    if capacity is None:
        return ""
    b = engine.per_device
    now, more = program_bytes(engine, out_hw_c, b), program_bytes(engine, out_hw_c, b + 1)
    if now is None or more is None:
        return ""
    per_image = max(1, more - now)
    largest = max(0, (capacity - (now - per_image * b)) // per_image)
    return (f"plan: device memory {_size(now)} at generation.batch_per_device={b} "
            f"({_size(per_image)} per image, {engine.model.attention} attention); the largest "
            f"micro-batch that fits {device.device_kind} ({_size(capacity)}): {largest}")

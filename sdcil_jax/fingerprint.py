"""JSON values and fingerprints: the one place where run data becomes JSON and gets a hash.

Used by the checkpoints (is this workdir's run the same experiment?), the replay store (were these
images made with these settings?), ``results.json`` / ``metrics.jsonl`` and the config dump.

* :func:`to_json` turns numpy / jax scalars and arrays, tuples and sets into plain JSON values.
* :func:`canonical` is the JSON value as it reads back from disk (so a freshly computed value and a
  stored one compare equal); :func:`dumps` its compact, key-sorted text.
* :func:`fingerprint_of` is the sha256 of that text.
* :func:`config_fields` flattens a config to ``{'section.key': value}`` minus the keys that cannot
  change results (:data:`NON_RESULT_KEYS`), plus derived values; :func:`diff_fields` lists what
  differs between two such dicts, for the error message that refuses a mismatching rerun.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Config keys (or whole sections) that cannot change any metric: where things live on disk, how
# often checkpoints are written, the host pipeline's worker and prefetch counts (its batches do not
# depend on them), the number of preview images, the replay store's file layout, logging.
NON_RESULT_KEYS: tuple[str, ...] = (
    "checkpoint",
    "dataset.data_dir",
    "dataset.workers",
    "dataset.prefetch",
    "generation.store_dir",
    "generation.images_per_shard",
    "generation.preview_per_class",
)

_ABSENT = object()


def to_json(obj: Any) -> Any:
    """Plain JSON types: mappings get string keys; numpy/jax scalars and arrays, tuples and sets
    become Python values and lists (sets sorted). Raises TypeError for anything else."""
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_json(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return to_json(obj.to_dict())
    raise TypeError(f"{type(obj).__name__} value {obj!r} cannot be stored as JSON")


def dumps(obj: Any) -> str:
    """Compact, key-sorted JSON text of :func:`to_json` (the text that is hashed)."""
    return json.dumps(to_json(obj), sort_keys=True, separators=(",", ":"))


def canonical(obj: Any) -> Any:
    """The JSON value exactly as it reads back from a file (e.g. int dict keys become strings)."""
    return json.loads(dumps(obj))


def fingerprint_of(fields: Mapping[str, Any]) -> str:
    """sha256 (hex) of :func:`dumps` of the fields."""
    return hashlib.sha256(dumps(fields).encode("utf-8")).hexdigest()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (empty mappings stay as values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in patterns)


def config_fields(config: Any, extra: Mapping[str, Any] | None = None,
                  ignore: Sequence[str] = ()) -> dict[str, Any]:
    """The config flattened to ``{'section.key': value}`` plus ``extra``, as canonical JSON.

    Keys in :data:`NON_RESULT_KEYS` and ``ignore`` (a key or a section) are left out. ``extra`` holds
    values derived from the config that also decide results (the resolved class order, the image
    shape...); its keys must not repeat config keys.
    """
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    skip = tuple(NON_RESULT_KEYS) + tuple(ignore)
    fields = {k: v for k, v in flatten(tree).items() if not _matches(k, skip)}
    for key, value in flatten(extra or {}).items():
        if key in fields:
            raise ValueError(f"fingerprint extra key {key!r} repeats a config key")
        fields[key] = value
    return canonical(fields)


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


def diff_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``['train.lr (0.1 -> 0.05)', 'seed (absent -> 1)', ...]`` for every key whose value differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a is _ABSENT or b is _ABSENT or a != b:
            left = "absent" if a is _ABSENT else _short(a)
            right = "absent" if b is _ABSENT else _short(b)
            out.append(f"{key} ({left} -> {right})")
    return out

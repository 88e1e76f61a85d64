"""Small random images (raw or encoded) shared by the transform and host-pipeline tests."""

import io

import numpy as np
from PIL import Image


def jpeg(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    """``array`` encoded as ``fmt`` (JPEG at quality 90, or e.g. PNG)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def random_image(rng: np.random.Generator, lo: int = 12, hi: int = 70) -> np.ndarray:
    """A uint8 RGB image of random height and width in ``[lo, hi)``."""
    h, w = (int(v) for v in rng.integers(lo, hi, size=2))
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

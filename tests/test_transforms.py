"""The pure decoding and augmentation functions of the host pipeline (sdcil_jax.data.transforms)."""

import io

import numpy as np
import pytest
from image_samples import jpeg, random_image
from PIL import Image

from sdcil_jax.data import transforms as tf

SIZE = 24  # output side used in the tests (small for speed)


def test_transform_shapes_and_determinism():
    rng = np.random.default_rng(0)
    for value in (random_image(rng), jpeg(random_image(rng))):
        out = tf.train_transform(value, np.random.default_rng(1), image_size=SIZE)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
        again = tf.train_transform(value, np.random.default_rng(1), image_size=SIZE)
        np.testing.assert_array_equal(out, again)
        test = tf.eval_transform(value, image_size=SIZE, resize=28)
        assert test.shape == (SIZE, SIZE, 3) and test.dtype == np.uint8
        np.testing.assert_array_equal(test, tf.eval_transform(value, image_size=SIZE, resize=28))


def test_test_transform_matches_resize_then_centre_crop():
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((300, 200), Image.Resampling.BICUBIC))
    out = tf.eval_transform(image, image_size=224, resize=256).astype(np.float32)
    resized = Image.fromarray(image).resize((384, 256), Image.Resampling.BILINEAR)
    ref = np.asarray(resized)[16:240, 80:304].astype(np.float32)
    assert np.abs(out - ref).mean() < 1.0


def test_random_resized_crop_stays_in_bounds():
    for height, width in [(1, 1), (1, 50), (50, 1), (2, 3), (7, 5), (224, 224), (4000, 6000), (20000, 300)]:
        for i in range(200):
            top, left, h, w = tf.random_resized_crop_box(height, width, np.random.default_rng(i))
            assert 1 <= h <= height and 1 <= w <= width
            assert 0 <= top <= height - h and 0 <= left <= width - w
    # impossible scale: the centred fallback with the aspect ratio clamped to [3/4, 4/3]
    assert tf.random_resized_crop_box(100, 400, np.random.default_rng(0), scale=(2, 3)) == (0, 133, 100, 133)
    assert tf.random_resized_crop_box(80, 60, np.random.default_rng(0), scale=(2, 3)) == (0, 0, 80, 60)


def test_tiny_huge_grayscale_and_odd_inputs_become_rgb():
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    rgba = rng.integers(0, 256, (20, 25, 4), dtype=np.uint8)
    cmyk = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).convert("CMYK").save(
        cmyk, format="JPEG"
    )
    values = [
        np.zeros((1, 1, 3), np.uint8),
        rng.integers(0, 256, (1, 90, 3), dtype=np.uint8),
        rng.integers(0, 256, (3000, 2000, 3), dtype=np.uint8),
        gray,
        gray[:, :, None],
        jpeg(gray),
        jpeg(rgba, "PNG"),
        cmyk.getvalue(),
        np.array(jpeg(gray), dtype=object),  # 0-d object array, as some sources return
        Image.fromarray(gray),
    ]
    for i, value in enumerate(values):
        train = tf.train_transform(value, np.random.default_rng(i), image_size=SIZE)
        test = tf.eval_transform(value, image_size=SIZE, resize=28)
        assert train.shape == test.shape == (SIZE, SIZE, 3)
        assert train.dtype == test.dtype == np.uint8
    out = tf.eval_transform(gray, image_size=SIZE, resize=28)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])  # gray stays gray in RGB
    with pytest.raises(TypeError):
        tf.to_pil_rgb(np.zeros((4, 4, 3), np.float32))


def test_brightness_is_multiplicative_and_flip_flips():
    image = np.full((30, 30, 3), 100, np.uint8)
    factors = set()
    for i in range(50):
        out = tf.train_transform(
            image, np.random.default_rng(i), image_size=8, scale=(1, 1), ratio=(1, 1), flip=False
        )
        assert (out == out[0, 0, 0]).all()
        factors.add(int(out[0, 0, 0]))
    assert min(factors) >= int(100 * (1 - tf.BRIGHTNESS)) and max(factors) <= int(100 * (1 + tf.BRIGHTNESS))
    assert max(factors) - min(factors) > 30
    ramp = np.tile(np.arange(0, 240, 8, dtype=np.uint8)[None, :, None], (30, 1, 3))
    flips = 0
    for i in range(20):
        kw = dict(image_size=30, scale=(1, 1), ratio=(1, 1), brightness=0.0)
        out = tf.train_transform(ramp, np.random.default_rng(i), **kw).astype(int)
        flips += out[0, 0, 0] > out[0, -1, 0]
    assert 0 < flips < 20

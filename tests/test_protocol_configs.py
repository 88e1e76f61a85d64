"""The protocol configs (``configs/cifar100.py``, ``imagenet100.py``, ``imagenet1k.py``).

Every argument combination validates and has PODNet's protocol values; bad arguments are refused with
the valid ones; and (slow) each config runs two tasks end to end on ``tfds.testing.mock_data`` with a
tiny model and ``tiny_sd``, through ``sdcil_jax.run``.
"""

import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from xla_cache import cache_env

import sdcil_jax
from sdcil_jax.config import load_config_file, validate
from sdcil_jax.data import build_scenario, named_orders
from sdcil_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ("none", "distillation", "classification", "both")
GENERATORS = ("sd", "tiny_sd", "real_holdout")
# file -> (dataset, classes in the protocol, base classes, steps, orders, PODNet protocol values)
PROTOCOLS = {
    "cifar100.py": dict(
        dataset="cifar100", classes=100, base=50, steps=(5, 10, 25, 50),
        orders={"0": "cifar100_order0", "1": "cifar100_order1", "2": "cifar100_order2",
                "seed1993": "cifar100_seed1993"},
        model="resnet32", epochs=160, lr=0.1, batch=128, wd=5e-4, flat=1.0, spatial=3.0,
        ft_lr=0.05, pipeline="device", crop_padding=4, synth_per_class=500),
    "imagenet100.py": dict(
        dataset="imagenet2012", classes=100, base=50, steps=(5, 10, 25, 50), orders={},
        model="resnet18", epochs=90, lr=0.05, batch=64, wd=5e-4, flat=10.0, spatial=8.0,
        ft_lr=0.01, pipeline="host", crop_padding=0, synth_per_class=500),
    "imagenet1k.py": dict(
        dataset="imagenet2012", classes=1000, base=500, steps=(5, 10), orders={},
        model="resnet18", epochs=90, lr=0.05, batch=64, wd=1e-4, flat=10.0, spatial=8.0,
        ft_lr=0.01, pipeline="host", crop_padding=0, synth_per_class=100),
}


def _load(name: str, arg: str = ""):
    return load_config_file(str(ROOT / "configs" / name) + (f":{arg}" if arg else ""))


def _combinations(name: str):
    p = PROTOCOLS[name]
    orders = list(p["orders"]) or [None]
    for steps, order, synthetic, generator in itertools.product(p["steps"], orders, SYNTHETIC,
                                                                GENERATORS):
        parts = [f"steps={steps}", f"synthetic={synthetic}", f"generator={generator}"]
        if order is not None:
            parts.append(f"order={order}")
        yield ",".join(parts), steps, order, synthetic, generator


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_every_combination_validates(name):
    p = PROTOCOLS[name]
    num_classes = 1000 if p["dataset"] == "imagenet2012" else p["classes"]
    count = 0
    for arg, steps, order, synthetic, generator in _combinations(name):
        c = validate(_load(name, arg))
        count += 1
        assert c.dataset.name == p["dataset"] and c.dataset.pipeline == p["pipeline"]
        assert c.scenario.initial_increment == p["base"]
        assert c.scenario.increment == (p["classes"] - p["base"]) // steps
        scenario = build_scenario(c, num_classes)
        assert scenario.increments == [p["base"]] + [c.scenario.increment] * steps
        assert scenario.num_classes == p["classes"]
        if order is not None:
            assert c.scenario.class_order == p["orders"][order]
        assert c.synthetic.use_in == synthetic and c.generation.backend == generator
        if generator == "real_holdout":
            assert c.dataset.holdout_per_class >= c.generation.per_class >= c.synthetic.per_class
        else:
            assert c.dataset.holdout_per_class == 0
            assert c.synthetic.per_class == c.generation.per_class == p["synth_per_class"]
    assert count == len(p["steps"]) * max(1, len(p["orders"])) * len(SYNTHETIC) * len(GENERATORS)


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_podnet_protocol_defaults(name):
    p = PROTOCOLS[name]
    c = validate(_load(name))
    assert c.method.name == "podnet"
    assert (c.method.pod_flat, c.method.pod_spatial) == (p["flat"], p["spatial"])
    assert c.method.nca_margin == 0.6 and c.method.proxies_per_class == 10
    assert c.method.grad_clip == 5.0
    assert (c.method.finetune_epochs, c.method.finetune_lr) == (20, p["ft_lr"])
    assert (c.memory.per_class, c.memory.selection) == (20, "herding")
    assert c.model.name == p["model"] and c.model.last_relu is False
    t = c.train
    assert (t.epochs, t.lr, t.batch_size, t.momentum, t.weight_decay) == (
        p["epochs"], p["lr"], p["batch"], 0.9, p["wd"])
    assert t.crop_padding == p["crop_padding"] and t.flip is True
    assert t.brightness == pytest.approx(63 / 255)
    assert c.synthetic.use_in == "both" and c.synthetic.replace_memory is False
    assert c.synthetic.batch_size == p["batch"] and c.synthetic.diagnostic_per_class == 0
    g = c.generation
    assert (g.backend, g.model, g.revision, g.dtype) == (
        "sd", "CompVis/stable-diffusion-v1-4", "flax", "bfloat16")
    assert (g.guidance_scale, g.num_inference_steps, g.resolution) == (2.0, 50, 512)
    assert g.per_class == p["synth_per_class"]
    if p["dataset"] == "imagenet2012":
        assert (c.dataset.image_size, c.dataset.test_resize) == (224, 256)
        assert c.model.stem == "podnet"  # official 3x3/1 conv + max-pool stem
    assert c.train.schedule == "cosine_epoch"  # PODNet's per-epoch CosineAnnealingLR
    official_norm = {"cifar100": ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]),
                     "imagenet2012": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}
    assert (list(c.dataset.mean), list(c.dataset.std)) == official_norm[p["dataset"]]


def test_cifar100_default_steps_and_order():
    c = _load("cifar100.py")
    assert (c.scenario.increment, c.scenario.class_order) == (10, "cifar100_order0")


def test_imagenet_subset_is_an_explicit_list():
    c = _load("imagenet100.py:steps=50")
    assert c.scenario.class_order == named_orders()["imagenet100"]
    assert sorted(c.scenario.class_order) == list(range(100))
    assert _load("imagenet1k.py").scenario.class_order == "imagenet1000"


def test_imagenet1k_prompt_names_are_unique():
    from sdcil_jax.data import apply_class_name_overrides
    from sdcil_jax.data.resources import load_resource
    from sdcil_jax.data.tfds_io import readable_class_names

    wnids = [wnid for wnid, _ in load_resource("imagenet_class_names.json")["classes"]]
    names = readable_class_names("imagenet2012", wnids, 1000)
    assert len(set(names)) == 998  # 'crane' and 'maillot' name two classes each
    names = apply_class_name_overrides(names, _load("imagenet1k.py").dataset.class_names)
    assert len(set(names)) == 1000 and names[134] == "crane bird"


def test_synthetic_memory_and_per_class():
    c = validate(_load("cifar100.py", "memory=synthetic,synthetic=none,per_class=20"))
    assert c.synthetic.replace_memory is True and c.synthetic.per_class == 20
    assert c.generation.per_class == 500  # the arms share one replay store
    assert _load("cifar100.py", "memory=real").synthetic.replace_memory is False
    with pytest.raises(ConfigError, match="exceeds generation.per_class"):
        validate(_load("cifar100.py", "per_class=600"))


def test_tiny_sd_generator_is_small():
    for name in PROTOCOLS:
        g = _load(name, "generator=tiny_sd").generation
        assert (g.resolution, g.num_inference_steps) == (64, 5)


@pytest.mark.parametrize("name,arg,match", [
    ("cifar100.py", "steps=7", "steps='7' is not one of 5, 10, 25, 50"),
    ("cifar100.py", "order=3", "order='3' is not one of 0, 1, 2, seed1993"),
    ("cifar100.py", "synthetic=all", "none, distillation, classification, both"),
    ("cifar100.py", "generator=dalle", "sd, tiny_sd, real_holdout"),
    ("cifar100.py", "memory=none", "real, synthetic"),
    ("cifar100.py", "per_class=0", "positive integer"),
    ("cifar100.py", "per_class=ten", "positive integer"),
    ("cifar100.py", "stepz=5", "unknown argument 'stepz=5'; valid arguments: steps="),
    ("cifar100.py", "steps", "unknown argument 'steps'"),
    ("cifar100.py", "steps=5,steps=10", "given twice"),
    ("imagenet100.py", "order=1", "unknown argument 'order=1'"),
    ("imagenet100.py", "steps=2", "5, 10, 25, 50"),
    ("imagenet1k.py", "steps=25", "steps='25' is not one of 5, 10"),
    ("imagenet1k.py", "synthetic=replay", "none, distillation, classification, both"),
])
def test_bad_arguments_are_refused(name, arg, match):
    with pytest.raises(ConfigError, match=match):
        _load(name, arg)


def test_bad_argument_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sdcil_jax.main", "--config", "configs/cifar100.py:steps=3",
         "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), **cache_env()))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "steps='3' is not one of 5, 10, 25, 50" in errors[0]


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_docstring_gives_the_command_line(name):
    text = (ROOT / "configs" / name).read_text()
    assert f"python -m sdcil_jax.main --config configs/{name}:" in text
    assert f"python -m sdcil_jax.main --config configs/{name} --mode prepare" in text


# ------------------------------------------------------------------------------- end to end (slow)
def _tiny(config, data_dir) -> None:
    """Shrink a protocol config to seconds on CPU (4 fake devices): batches multiple of 4."""
    config.model.name = "resnet_tiny"
    config.generation.backend = "tiny_sd"
    config.generation.resolution = 32
    config.generation.num_inference_steps = 2
    config.generation.per_class = 2
    config.generation.batch_per_device = 2
    config.synthetic.per_class = 2
    config.synthetic.batch_size = 8
    config.memory.per_class = 2
    config.method.proxies_per_class = 2  # k-means imprinting needs that many images of a new class
    config.train.epochs = 1
    config.train.batch_size = 8
    config.train.eval_batch_size = 64
    config.method.finetune_epochs = 1
    config.scenario.max_tasks = 2
    config.dataset.data_dir = str(data_dir)
    config.dataset.image_size = 32
    config.dataset.test_resize = 36
    config.dataset.workers = 2


class _MockSource:
    """A random-access source like ``tfds.data_source``'s: ``per_class`` examples of each class.

    Images are random, of random sizes in ``sizes`` (ImageNet-like) or of one fixed size; served as
    JPEG bytes when the caller asked tfds to skip decoding (the host pipeline decodes itself), as
    uint8 arrays otherwise.
    """

    def __init__(self, info, classes, per_class, sizes, encoded, seed):
        self.dataset_info = info
        self.labels = np.repeat(np.asarray(classes, np.int64), per_class)
        self.sizes, self.encoded, self.seed = sizes, encoded, seed

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, int(i)])
        h, w = (int(rng.integers(*self.sizes)) for _ in range(2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if self.encoded:
            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG")
            image = buffer.getvalue()
        return {"image": image, "label": np.int64(self.labels[i]), "file_name": f"{i}.JPEG"}

    def __getitems__(self, keys):
        return [self[i] for i in keys]


def _imagenet_mock(classes, train_per_class=2, test_per_class=1):
    """``mock_data`` for imagenet2012 covering ``classes`` (random labels over 1000 would not)."""

    def as_data_source(builder, split, decoders=None, **kwargs):
        del kwargs
        encoded = decoders is not None  # SkipDecoding on the image: serve encoded bytes
        per_class, seed = (train_per_class, 0) if split == "train" else (test_per_class, 1)
        return _MockSource(builder.info, classes, per_class, (20, 48), encoded, seed)

    return tfds.testing.mock_data(as_data_source_fn=as_data_source)


def _check_results(results, config, first_tasks_classes):
    assert results["num_tasks"] == 2 and len(results["per_task"]) == 2
    assert len(results["accuracy_matrix"][1]) == 2
    assert results["config"]["method"]["name"] == "podnet"
    assert [r["num_classes"] for r in results["per_task"]] == [
        config.scenario.initial_increment, first_tasks_classes]
    assert results["per_task"][1]["synthetic_images"] == config.scenario.initial_increment * 2
    for r in results["per_task"]:
        assert isinstance(r["cnn_accuracy"], float)


@pytest.mark.slow
def test_cifar100_two_tasks_end_to_end(tmp_path):
    config = _load("cifar100.py", "steps=10,order=1,synthetic=both,generator=tiny_sd")
    _tiny(config, tmp_path / "tfds")
    # Random labels over 100 classes: 1000 examples give every class of the first two tasks images.
    with tfds.testing.mock_data(num_examples=1000):
        results = sdcil_jax.run(config, str(tmp_path / "work"), progress=False)
    _check_results(results, config, 55)
    assert results["class_order"] == named_orders()["cifar100_order1"]
    assert (tmp_path / "work" / "results.json").is_file()


@pytest.mark.slow
def test_imagenet100_two_tasks_end_to_end(tmp_path):
    config = _load("imagenet100.py", "steps=10,synthetic=both,generator=tiny_sd")
    _tiny(config, tmp_path / "tfds")
    order = named_orders()["imagenet100"]
    with _imagenet_mock(order[:55]):
        results = sdcil_jax.run(config, str(tmp_path / "work"), progress=False)
    _check_results(results, config, 55)
    assert results["class_order"] == order


@pytest.mark.slow
def test_imagenet1k_two_tasks_end_to_end(tmp_path):
    # synthetic=none: generating even one tiny_sd image for each of the 500 old classes costs minutes
    # on 2 CPU cores, and the replay path is the one the CIFAR100 and ImageNet-Subset runs cover.
    # This run covers the scale: 500 base classes of the 1000-class order, 50 new ones.
    config = _load("imagenet1k.py", "steps=10,synthetic=none,generator=tiny_sd")
    _tiny(config, tmp_path / "tfds")
    order = named_orders()["imagenet1000"]
    with _imagenet_mock(order[:550], train_per_class=2, test_per_class=1):
        results = sdcil_jax.run(config, str(tmp_path / "work"), progress=False)
    assert results["num_tasks"] == 2 and len(results["per_task"]) == 2
    assert [r["num_classes"] for r in results["per_task"]] == [500, 550]
    assert results["config"]["method"]["name"] == "podnet"
    assert results["class_order"] == order

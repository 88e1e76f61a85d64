"""``--mode prepare``: digits offline, and one clear message for each missing prerequisite.

The two missing-prerequisite cases are tested in-process (``prepare(config)`` raises
:class:`DataError`) and through the command line (exit status 2, one ``error:`` line, no traceback).
TensorFlow's absence is simulated by patching ``sdcil_jax.data.prepare.has_tensorflow`` (in-process,
and in a subprocess that then runs the command line's ``main``), so the tests mean the same whether or
not TensorFlow is installed; where it is not installed, the plain command line is tested too.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from sdcil_jax.config import base_config, load_config_file, validate
from sdcil_jax.data import prepare as prepare_lib
from sdcil_jax.data.prepare import prepare, prepare_dataset
from sdcil_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
EXTRA = 'pip install -e ".[prepare]"'
# Runs the command line as if TensorFlow were not installed.
NO_TF = ("import sys; import sdcil_jax.data.prepare as p; p.has_tensorflow = lambda: False; "
         "from sdcil_jax.main import main; sys.exit(main())")
HAS_TF = importlib.util.find_spec("tensorflow") is not None


def _config(name: str, data_dir) -> object:
    config = base_config()
    config.dataset.name = name
    config.dataset.data_dir = str(data_dir)
    return validate(config)


@pytest.fixture
def no_tensorflow(monkeypatch):
    monkeypatch.setattr(prepare_lib, "has_tensorflow", lambda: False)


@pytest.fixture
def with_tensorflow(monkeypatch):
    monkeypatch.setattr(prepare_lib, "has_tensorflow", lambda: True)


def _manual(data_dir: Path) -> Path:
    return data_dir / "downloads" / "manual"


def _put_archives(data_dir: Path, names=ARCHIVES) -> None:
    _manual(data_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
        (_manual(data_dir) / name).write_bytes(b"")


def _cli(args, tmp_path, no_tf: bool = False):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "default_tfds"))
    head = [sys.executable, "-c", NO_TF] if no_tf else [sys.executable, "-m", "sdcil_jax.main"]
    return subprocess.run([*head, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------- in-process
def test_no_tensorflow_names_the_prepare_extra(tmp_path, no_tensorflow):
    with pytest.raises(DataError) as info:
        prepare(_config("cifar100", tmp_path))
    message = str(info.value)
    assert "TensorFlow" in message and "`prepare` extra" in message and EXTRA in message
    assert "cifar100" in message
    assert not (tmp_path / "cifar100").exists()


def test_missing_imagenet_archives_name_the_exact_folder(tmp_path, with_tensorflow):
    with pytest.raises(DataError) as info:
        prepare(_config("imagenet2012", tmp_path))
    message = str(info.value)
    assert f"{_manual(tmp_path)}/" in message
    assert all(name in message for name in ARCHIVES)
    assert "extra" not in message  # TensorFlow is there: the archives are the only thing missing


def test_one_missing_archive_is_named(tmp_path, with_tensorflow):
    _put_archives(tmp_path, ARCHIVES[:1])
    with pytest.raises(DataError, match=r"missing: ILSVRC2012_img_val\.tar\)"):
        prepare(_config("imagenet2012", tmp_path))


def test_no_archives_and_no_tensorflow_says_both(tmp_path, no_tensorflow):
    with pytest.raises(DataError) as info:
        prepare(_config("imagenet2012", tmp_path))
    message = str(info.value)
    assert str(_manual(tmp_path)) in message and ARCHIVES[0] in message and EXTRA in message


def test_archives_present_but_no_tensorflow(tmp_path, no_tensorflow):
    _put_archives(tmp_path)
    with pytest.raises(DataError) as info:
        prepare(_config("imagenet2012", tmp_path))
    message = str(info.value)
    assert EXTRA in message and "imagenet2012" in message and "manual" not in message


def test_archives_and_tensorflow_call_tfds_with_the_manual_dir(tmp_path, with_tensorflow,
                                                                monkeypatch):
    _put_archives(tmp_path)
    calls = []

    def fake_download_and_prepare(self, **kwargs):
        calls.append(kwargs)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_download_and_prepare)
    lines = prepare(_config("imagenet2012", tmp_path))
    assert len(calls) == 1
    assert calls[0]["file_format"] == "array_record"
    assert str(calls[0]["download_config"].manual_dir) == str(_manual(tmp_path))
    assert lines == [f"imagenet2012: prepared in {tmp_path / 'imagenet2012' / '5.1.0'}"]


def test_tfds_failure_becomes_one_data_error(tmp_path, with_tensorflow, monkeypatch):
    def broken(self, **kwargs):
        raise OSError("Connection refused\nmore detail")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", broken)
    with pytest.raises(DataError, match=r"Preparing dataset mnist .* failed \(Connection refused\)"):
        prepare_dataset("mnist", str(tmp_path))


def test_imagenet_protocol_configs_need_the_archives(tmp_path, with_tensorflow):
    for name in ("imagenet100.py", "imagenet1k.py:steps=10"):
        config = load_config_file(str(ROOT / "configs" / name))
        config.dataset.data_dir = str(tmp_path)
        with pytest.raises(DataError, match="ILSVRC2012_img_train.tar"):
            prepare(config)


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="not a registered tfds builder"):
        prepare_dataset("no_such_dataset_xyz", str(tmp_path))


def test_digits_prepare_then_already_prepared(tmp_path, no_tensorflow):
    config = _config("digits", tmp_path)
    first = prepare(config)
    assert first == [f"digits: prepared in {tmp_path / 'sdcil_digits' / '1.0.0'}"]
    assert prepare(config) == [f"digits: already prepared in {tmp_path / 'sdcil_digits' / '1.0.0'}"]
    assert prepare_dataset("digits", str(tmp_path)).path == str(tmp_path / "sdcil_digits" / "1.0.0")


# ------------------------------------------------------------------------------------ command line
def test_cli_digits_prepares_offline(tmp_path):
    data_dir = tmp_path / "tfds"
    args = ["--config", "configs/quickstart.py", "--mode", "prepare",
            f"--config.dataset.data_dir={data_dir}"]
    proc = _cli(args, tmp_path)  # no --workdir: prepare does not need one
    assert proc.returncode == 0, proc.stderr
    # tfds prints its own progress before our one line per dataset.
    assert proc.stdout.strip().splitlines()[-1] == f"digits: prepared in {data_dir}/sdcil_digits/1.0.0"
    assert (data_dir / "sdcil_digits" / "1.0.0" / "dataset_info.json").is_file()
    again = _cli(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"digits: already prepared in {data_dir}/sdcil_digits/1.0.0"


@pytest.mark.parametrize("simulated", [True, pytest.param(False, marks=pytest.mark.skipif(
    HAS_TF, reason="TensorFlow is installed: only the simulated case applies"))])
def test_cli_no_tensorflow_names_the_prepare_extra(tmp_path, simulated):
    proc = _cli(["--config", "configs/cifar100.py:steps=10", "--workdir", str(tmp_path / "w"),
                 "--mode", "prepare", f"--config.dataset.data_dir={tmp_path / 'tfds'}"],
                tmp_path, no_tf=simulated)
    line = _one_error_line(proc)
    assert "TensorFlow" in line and EXTRA in line and "cifar100" in line
    assert not (tmp_path / "w").exists()


def test_cli_missing_imagenet_archives_name_the_folder(tmp_path):
    # The archive check comes before the TensorFlow check: same message with or without TensorFlow.
    proc = _cli(["--config", "configs/imagenet100.py:steps=10", "--mode", "prepare"], tmp_path)
    line = _one_error_line(proc)
    folder = tmp_path / "default_tfds" / "downloads" / "manual"  # TFDS_DATA_DIR is the default
    assert f"{folder}/" in line
    assert "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar" in line


def test_cli_help_lists_prepare(tmp_path):
    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0 and "prepare" in proc.stdout and "downloads/manual" in proc.stdout

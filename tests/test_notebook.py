"""The Colab notebook: stored clean, and executed end to end in smoke mode (offline, CPU) with nbclient."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from xla_cache import cache_env

from sdcil_jax.errors import UserError
from sdcil_jax.notebook import (
    DrivePathError,
    check_drive_paths,
    move_aside_local_files,
    needs_tensorflow,
    plan_lines,
    run_plan,
    storage_layout,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "sdcil_jax_tpu.ipynb"


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs"
    params = nb.cells[_parameters_index(nb)].source
    assert "SMOKE = False" in params  # the stored notebook runs the real protocol


def _this_python_kernel() -> KernelManager:
    """A kernel manager for ipykernel on this interpreter.

    An empty ``kernel_dirs`` leaves only jupyter_client's built-in 'python3' spec, which runs
    ``sys.executable``, so a 'python3' kernelspec installed elsewhere for another Python is ignored.
    """
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    tfds_dir = tmp_path / "tfds"
    # The kernel is a subprocess: it inherits this environment (conftest's fake CPU devices included).
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    for key, value in cache_env().items():
        monkeypatch.setenv(key, value)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    smoke = nbformat.v4.new_code_cell(
        "import os\n"
        "SMOKE = True\n"
        f"WORKDIR = {str(workdir)!r}\n"
        f"os.environ['TFDS_DATA_DIR'] = {str(tfds_dir)!r}\n"
        "import sys\n"
        "print('kernel python:', os.path.realpath(sys.executable))\n")
    nb.cells.insert(_parameters_index(nb) + 1, smoke)

    km = _this_python_kernel()
    client = NotebookClient(nb, timeout=600, kernel_name="python3", km=km,
                            resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # kept for debugging a failure
        if km.has_kernel:  # a kernel manager we passed in is not shut down by nbclient
            km.shutdown_kernel(now=True)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors

    text = "".join(o.get("text", "") for o in nb.cells[_parameters_index(nb) + 1].outputs)
    assert os.path.realpath(sys.executable) in text
    results = json.loads((workdir / "results.json").read_text())
    assert 0.0 <= results["last_accuracy"] <= 100.0
    assert len(results["per_task"]) == 2
    assert results["config"]["generation"]["backend"] == "tiny_sd"
    plan = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   and "run_plan(" in c.source for o in c.outputs)
    assert "generate:" in plan and "train:" in plan, plan
    for name in ("replay_store/preview.png", "accuracy_per_task.png", "accuracy_matrix.png",
                 "replay_grid.png"):
        assert (workdir / name).is_file(), name
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if "image/png" in o.get("data", {}))
    assert images == 4  # preview, two plots, grid


# ---- Drive storage ---------------------------------------------------------------------------------

def _fake_unmounted_drive(tmp_path: Path) -> Path:
    """A plain folder at a 'mount point' holding MyDrive/: what a run leaves behind when it writes to a
    Drive path before Drive is mounted."""
    mount = tmp_path / "drive"
    (mount / "MyDrive" / "sdcil_jax" / "runs").mkdir(parents=True)
    return mount


def test_unmounted_drive_path_is_refused_with_the_fix(tmp_path):
    mount = _fake_unmounted_drive(tmp_path)
    runs = str(mount / "MyDrive" / "sdcil_jax" / "runs")
    with pytest.raises(DrivePathError) as info:
        check_drive_paths({"RUNS_DIR": runs}, mount_point=str(mount))
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message and message.count(". ") == 0, message  # one sentence
    assert runs in message and "not mounted" in message
    assert f"drive.mount({str(mount)!r})" in message  # names the fix


def test_drive_paths_accepted_when_mounted_or_elsewhere(tmp_path):
    mount = _fake_unmounted_drive(tmp_path)
    local = {"RUNS_DIR": str(tmp_path / "runs"), "DATA_DIR": "", "HF_CACHE": None}
    check_drive_paths(local, mount_point=str(mount))  # not under the mount point: fine
    on_drive = {"RUNS_DIR": str(mount / "MyDrive" / "runs"),
                "STORE_DIR": str(mount / "Shareddrives" / "team" / "store")}
    check_drive_paths(on_drive, mount_point=str(mount), mounted=True)
    with pytest.raises(DrivePathError, match="MyDrive"):  # the mount's root is not writable
        check_drive_paths({"RUNS_DIR": str(mount / "runs")}, mount_point=str(mount), mounted=True)


def test_relative_path_under_the_mount_point_is_refused(tmp_path, monkeypatch):
    mount = _fake_unmounted_drive(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DrivePathError, match="drive.mount"):
        check_drive_paths({"WORKDIR": "drive/MyDrive/run"}, mount_point=str(mount))


def test_local_files_at_the_mount_point_are_moved_aside(tmp_path):
    mount = _fake_unmounted_drive(tmp_path)
    assert move_aside_local_files(str(mount)) == f"{mount}_local"
    assert not mount.exists() and (tmp_path / "drive_local" / "MyDrive" / "sdcil_jax").is_dir()
    mount.mkdir()
    assert move_aside_local_files(str(mount)) is None  # empty: drive.mount accepts it
    (mount / "x").write_text("x")
    assert move_aside_local_files(str(mount)) == f"{mount}_local1"  # nothing is overwritten
    assert move_aside_local_files(str(tmp_path / "absent")) is None


def test_storage_layout():
    assert storage_layout("/d/sdcil") == {
        "runs": "/d/sdcil/runs", "replay_store": "/d/sdcil/replay_store",
        "tensorflow_datasets": "/d/sdcil/tensorflow_datasets", "hf_cache": "/d/sdcil/hf_cache",
        "xla_cache": "/d/sdcil/xla_cache"}


_CACHE_SCRIPT = """
import sys
import jax
import jax.numpy as jnp
from sdcil_jax.notebook import use_compilation_cache

use_compilation_cache(sys.argv[1], min_compile_secs=0)
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event))
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))
print("HITS", hits.count("/jax/compilation_cache/cache_hits"))
"""


def test_compilation_cache_outlives_the_process(tmp_path):
    """The notebook's XLA_CACHE: a second session (process) loads what the first compiled."""
    cache = tmp_path / "xla_cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    hits = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(cache)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        hits.append(int(out.stdout.split("HITS")[-1]))
        assert any(cache.iterdir())  # the first process wrote its programs there
    assert hits[0] == 0 and hits[1] >= 1, hits  # the second loaded them (the jitted step included)


def test_tensorflow_only_needed_to_prepare(tmp_path):
    assert not needs_tensorflow("digits", str(tmp_path))
    assert needs_tensorflow("cifar100", str(tmp_path))  # not prepared there


def test_notebook_refuses_unmounted_drive_path(tmp_path, monkeypatch):
    """The notebook's storage cell refuses a Drive path when Drive is not mounted (fake mount point)."""
    mount = _fake_unmounted_drive(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    storage = next(i for i, c in enumerate(nb.cells) if "check_drive_paths(" in c.source)
    params = nbformat.v4.new_code_cell(
        f"DRIVE_MOUNT = {str(mount)!r}\nRUNS_DIR = {str(mount / 'MyDrive' / 'runs')!r}\n")
    nb.cells = nb.cells[:_parameters_index(nb) + 1] + [params] + nb.cells[_parameters_index(nb) + 1:
                                                                         storage + 1]
    km = _this_python_kernel()
    client = NotebookClient(nb, timeout=120, kernel_name="python3", km=km,
                            resources={"metadata": {"path": str(ROOT)}})
    try:
        with pytest.raises(CellExecutionError) as info:
            client.execute()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert "DrivePathError" in str(info.value) and "drive.mount(" in str(info.value)
    assert not (mount / "MyDrive" / "runs").exists()  # refused before anything was written


# ---- plan ------------------------------------------------------------------------------------------

def _cifar100_plan(**kwargs):
    from sdcil_jax.config import load_config_file
    from sdcil_jax.data import build_scenario

    config = load_config_file(str(ROOT / "configs" / "cifar100.py"))
    labels = np.repeat(np.arange(100), 500)  # CIFAR100: 500 training images per class
    return run_plan(config, build_scenario(config, 100), labels, **kwargs)


def test_plan_of_cifar100_b50_on_a_v5e_chip():
    scenario_first = [int(c) for c in json.loads(
        (ROOT / "sdcil_jax" / "resources" / "class_orders.json").read_text())["cifar100"][0][:10]]
    plan = _cifar100_plan(stored={c: 500 for c in scenario_first}, device_kind="TPU v5 lite")
    assert plan["generate_classes"] == 90 and plan["images"] == 45_000
    assert plan["images_to_go"] == 40_000  # ten classes already complete in the store
    # 160 epochs: 196 steps of 128 on 25,000 images, then 5,000 new + 20 per old class.
    assert plan["train_steps"] == 160 * (196 + 47 + 49 + 50 + 52 + 54)
    assert plan["tflop_per_image"] == pytest.approx(51 * 2 * 0.797 + 2.513)  # PLMS: 51 UNet calls
    low, high = plan["generation_hours"]
    assert low == pytest.approx(40_000 * plan["tflop_per_image"] / (197 * 0.5) / 3600)
    assert 9 < low < high < 17
    assert plan["training_hours"][1] < 1
    text = "\n".join(plan_lines(plan))
    assert "40,000 to go" in text and "not a measurement" in text


def test_plan_without_a_known_chip_has_no_projection():
    plan = _cifar100_plan(device_kind="cpu")
    assert plan["generation_hours"] is None and plan["peak_tflops"] is None
    assert "no projection" in plan_lines(plan)[-1]

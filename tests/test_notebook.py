"""The Colab notebook: stored clean, and executed end to end in smoke mode (offline, CPU) with nbclient."""

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

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
    for name in ("replay_store/preview.png", "accuracy_per_task.png", "accuracy_matrix.png",
                 "replay_grid.png"):
        assert (workdir / name).is_file(), name
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if "image/png" in o.get("data", {}))
    assert images == 4  # preview, two plots, grid

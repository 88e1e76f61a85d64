"""Test set-up: 4 fake CPU devices so every multi-device path runs in CI."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
from processes import end_group  # noqa: E402
from xla_cache import cache_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")
# The quickstart shortened to seconds: 2 tasks, 1 epoch, 8 replay images per class.
TINY = ["--config.train.epochs=1", "--config.method.finetune_epochs=1",
        "--config.scenario.max_tasks=2", "--config.generation.num_inference_steps=2",
        "--config.generation.per_class=8", "--config.synthetic.per_class=8",
        "--config.dataset.holdout_per_class=8", "--no-progress"]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """ONE shortened quickstart CLI run (4 fake devices) for the session: test_end_to_end checks its
    output and files, test_bad_input copies its workdir; neither may change it. Returns
    ``(proc, workdir, tfds_dir)``."""
    tmp = tmp_path_factory.mktemp("quickstart_run")
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp / "tfds"), HF_HUB_OFFLINE="1", **cache_env())
    assert "--xla_force_host_platform_device_count=4" in env.get("XLA_FLAGS", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdcil_jax.main", "--config", QUICKSTART, "--workdir",
         str(tmp / "work"), *TINY], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)  # a hang fails the tests that use the run
    finally:
        end_group(proc)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return SimpleNamespace(proc=done, workdir=tmp / "work", tfds_dir=tmp / "tfds")

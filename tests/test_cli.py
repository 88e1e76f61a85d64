"""Bad input on the command line: one clear line on stderr, exit status 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")


def _cli(args, tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"))
    return subprocess.run([sys.executable, "-m", "sdcil_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


CASES = [
    (["--config.train.epochz=3"], "Unknown config key train.epochz"),
    (["--config.train.epochs=abc"], "train.epochs must be of type int"),
    (["--config.dataset.name=no_such_dataset"], "Unknown dataset 'no_such_dataset'"),
    (["--config.scenario.increment=0"], "scenario.increment must be positive"),
    (["--config.scenario.initial_increment=12"], "initial_increment"),
    (["--config.scenario.class_order=[0,1,2,3,4,5,6,7,8,8]"], "more than once"),
    (["--config.generation.backend=sd", "--config.generation.model=/nonexistent/sd-folder"],
     "Local model folder /nonexistent/sd-folder does not exist"),
    (["--config.method.name=icarus"], "method.name='icarus' is not one of"),
]


@pytest.mark.parametrize("extra,expected", CASES)
def test_bad_input_one_line(extra, expected, tmp_path):
    workdir = tmp_path / "work"
    proc = _cli(["--config", QUICKSTART, "--workdir", str(workdir), "--no-progress", *extra],
                tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    error_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(error_lines) == 1, proc.stderr
    assert expected.lower() in error_lines[0].lower(), error_lines[0]
    assert not (workdir / "results.json").exists()


def test_missing_config_file(tmp_path):
    proc = _cli(["--config", "configs/nope.py", "--workdir", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_help_lists_modes(tmp_path):
    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0 and "generate" in proc.stdout and "--config" in proc.stdout

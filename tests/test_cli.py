"""The command line: help text and a missing config file (the error table is test_bad_input.py)."""

import os
import subprocess
import sys
from pathlib import Path

from xla_cache import cache_env

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")


def _cli(args, tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), **cache_env())
    return subprocess.run([sys.executable, "-m", "sdcil_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# The table of user errors (messages, exit codes, untouched files) is tests/test_bad_input.py.


def test_missing_config_file(tmp_path):
    proc = _cli(["--config", "configs/nope.py", "--workdir", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_help_lists_modes(tmp_path):
    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0 and "generate" in proc.stdout and "--config" in proc.stdout

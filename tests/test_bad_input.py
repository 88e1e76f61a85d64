"""Bad-input table: user errors through the CLI give one clear line, exit 2, no traceback, no damage.

Every case runs ``python -m sdcil_jax.main`` as a subprocess (4 fake devices, inherited from
``tests/conftest.py``) and checks:

- the exit status (2 for every user error);
- stdout + stderr hold no traceback;
- stderr has exactly one line starting with ``error:``, and it names the problem and the fix;
- no file that existed in the case folder before the command changed (sha256 and mtime), and new
  files appear only where the case expects them (none at all for config errors).

Cases that need finished work copy ONE trained quickstart workdir (the session's run, conftest.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import QUICKSTART, ROOT, TINY
from xla_cache import cache_env

SENTINEL = '{"sentinel": "results of an earlier run"}\n'


@dataclasses.dataclass(frozen=True)
class Case:
    """One user error. ``{tmp}`` in ``args`` is replaced by the case folder."""

    name: str
    args: tuple[str, ...]
    problem: str  # substring of the error line naming the problem (case-insensitive)
    fix: str  # substring of the error line naming the fix (case-insensitive)
    workdir: str = "sentinel"  # 'sentinel': only results.json; 'trained': copy of the trained
    #                            quickstart; 'store': only its replay_store (+ sentinel results.json)
    config_text: str | None = None  # write this config file and pass it instead of the quickstart
    config_path: str | None = None  # pass this --config (relative to the case folder)
    env: tuple[tuple[str, str], ...] = ()
    code: int = 2
    tiny: bool = True  # append the TINY overrides
    new_files: tuple[str, ...] = ()  # fnmatch patterns (relative to the case folder) allowed to appear
    setup: Callable[[Path], None] | None = None  # damage something in the case folder first
    workdir_rel: str = "work"


def _garbage_manifest(tmp: Path) -> None:
    (tmp / "work" / "replay_store" / "manifest.json").write_bytes(b"\x00\xffnot json{{" * 20)


def _file_parent(tmp: Path) -> None:
    (tmp / "afile").write_text("a regular file where a folder should be\n")


# Files a run may create before it reaches its error (empty folders are not files).
RUN_STARTED = ("work/checkpoints/*", "work/replay_store/*")

CASES = [
    # -- config: keys, types, values --------------------------------------------------------------
    Case("unknown-key", ("--config.train.epochz=3",), "unknown config key train.epochz",
         "did you mean train.epochs"),
    Case("wrong-type", ("--config.train.epochs=abc",), "train.epochs must be of type int",
         "fix the value"),
    Case("bad-choice", ("--config.method.name=icarus",), "method.name='icarus' is not one of",
         "pick one of"),
    Case("zero-increment", ("--config.scenario.increment=0",), "scenario.increment must be positive",
         "set it to 1 or more"),
    Case("normalisation-lengths", ("--config.dataset.mean=[0.5, 0.5]", "--config.dataset.std=[0.2]"),
         "must be lists of the same length", "both empty"),
    Case("class-too-small", ("--config.memory.per_class=500",), "training images",
         "lower memory.per_class", new_files=("work/*",)),
    Case("negative-memory", ("--config.memory.per_class=-1",), "memory.per_class must be >= 0",
         "set it to 0 or more"),
    Case("override-without-value", ("--config.train.epochs",), "override 'train.epochs'",
         "--config.section.key=value"),
    Case("synthetic-more-than-generated", ("--config.synthetic.per_class=9",),
         "exceeds generation.per_class=8", "lower synthetic.per_class"),
    Case("zero-learning-rate", ("--config.train.lr=0.0",), "train.lr must be positive",
         "set it above 0"),
    Case("batch-not-multiple-of-devices", ("--config.train.batch_size=66",),
         "train.batch_size=66 must be a multiple of the 4 devices", "use a multiple of 4"),
    # -- config files ----------------------------------------------------------------------------
    Case("missing-config-file", (), "does not exist", "pass e.g. --config",
         config_path="no_such_config.py"),
    Case("config-syntax-error", (), "failed to load", "fix the file",
         config_text="def get_config(:\n    pass\n"),
    Case("config-without-get_config", (), "defines no get_config()", "add one",
         config_text="X = 1\n"),
    Case("config-file-unknown-key", (), "unknown config key(s) train.epochz",
         "did you mean train.epochs",
         config_text=("from sdcil_jax.config import base_config\n\n\ndef get_config():\n"
                      "    config = base_config()\n    config.dataset.name = 'digits'\n"
                      "    config.train.epochz = 3\n    return config\n"), tiny=False),
    # -- scenario ----------------------------------------------------------------------------------
    Case("initial-increment-too-large", ("--config.scenario.initial_increment=12",),
         "initial_increment=12 exceeds the 10 classes", "lower it"),
    Case("increment-does-not-divide", ("--config.scenario.increment=3",),
         "do not split into tasks of scenario.increment=3", "choose an increment that divides 8"),
    Case("class-order-duplicate", ("--config.scenario.class_order=[0,1,2,3,4,5,6,7,8,8]",),
         "lists class 8 more than once", "may appear once"),
    Case("class-order-out-of-range", ("--config.scenario.class_order=[0,1,2,3,4,5,6,7,8,10]",),
         "outside 0..9", "use an order made for this dataset"),
    Case("unknown-named-order", ("--config.scenario.class_order=no_such_order",),
         "unknown class order 'no_such_order'", "use one of"),
    # -- data -------------------------------------------------------------------------------------
    Case("unknown-dataset", ("--config.dataset.name=no_such_dataset",),
         "unknown dataset 'no_such_dataset'", "use 'digits'"),
    Case("dataset-not-prepared", ("--config.dataset.name=cifar10",
                                  "--config.dataset.data_dir={tmp}/empty_tfds"),
         "not prepared", "--mode prepare"),
    # -- workdir ----------------------------------------------------------------------------------
    Case("workdir-under-a-file", (), "cannot create workdir", "choose a writable --workdir",
         setup=_file_parent, workdir_rel="afile/work"),
    # -- generator weights -----------------------------------------------------------------------
    Case("sd-local-folder-missing", ("--config.generation.backend=sd",
                                     "--config.generation.model={tmp}/no_sd_weights"),
         "local model folder", "set generation.model", new_files=RUN_STARTED),
    Case("sd-hub-offline", ("--config.generation.backend=sd",), "compvis/stable-diffusion-v1-4",
         "download", env=(("HF_HUB_OFFLINE", "1"),), new_files=RUN_STARTED),
    # -- replay store ------------------------------------------------------------------------------
    Case("train-without-store", ("--mode", "train"), "no replay store", "run with --mode generate",
         new_files=RUN_STARTED),
    Case("corrupt-manifest-train", ("--mode", "train"), "manifest", "rerun --mode generate",
         workdir="trained", setup=_garbage_manifest),
    Case("corrupt-manifest-all", ("--mode", "all"), "manifest", "rerun --mode generate",
         workdir="trained", setup=_garbage_manifest),
    Case("store-other-settings-generate", ("--mode", "generate",
                                           "--config.generation.guidance_scale=3.0"),
         "guidance_scale", "set generation.store_dir", workdir="trained"),
    Case("store-other-settings-train", ("--mode", "train", "--config.generation.guidance_scale=3.0"),
         "guidance_scale", "set generation.store_dir", workdir="store", new_files=RUN_STARTED),
    # -- checkpoints and training ------------------------------------------------------------------
    Case("checkpoint-other-config", ("--config.train.lr=0.07",), "train.lr (0.05 -> 0.07)",
         "--restart", workdir="trained"),
    Case("nan-loss", ("--mode", "train", "--config.train.lr=1e30"),
         "loss is nan in task 1, epoch 1 (steps 1-", "lower train.lr", workdir="store",
         new_files=RUN_STARTED + ("work/metrics.jsonl", "work/tensorboard/*")),
]


def _env(tfds_dir: Path, extra=()) -> dict[str, str]:
    env = dict(os.environ, TFDS_DATA_DIR=str(tfds_dir), HF_HUB_OFFLINE="1", **cache_env())
    env.update(dict(extra))
    # The 4 fake devices of conftest.py must reach the subprocess (batch-size checks rely on it).
    assert "--xla_force_host_platform_device_count=4" in env.get("XLA_FLAGS", "")
    return env


def _cli(args, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "sdcil_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(quickstart_run):
    """The session's tiny quickstart run (2 tasks, 1 epoch; conftest.py): its workdir and the tfds
    dir it prepared."""
    assert quickstart_run.proc.returncode == 0, quickstart_run.proc.stderr[-3000:]
    assert (quickstart_run.workdir / "results.json").exists()
    return quickstart_run.workdir, quickstart_run.tfds_dir


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(folder))] = (digest, path.stat().st_mtime_ns)
    return out


def _build_case_folder(case: Case, tmp: Path, trained_workdir: Path) -> None:
    work = tmp / "work"
    if case.workdir == "trained":
        shutil.copytree(trained_workdir, work, symlinks=True)
    elif case.workdir == "store":
        work.mkdir()
        shutil.copytree(trained_workdir / "replay_store", work / "replay_store", symlinks=True)
        (work / "results.json").write_text(SENTINEL)
    else:
        work.mkdir()
        (work / "results.json").write_text(SENTINEL)
    if case.config_text is not None:
        (tmp / "user_config.py").write_text(case.config_text)
    if case.setup is not None:
        case.setup(tmp)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, trained, tmp_path):
    trained_workdir, tfds_dir = trained
    _build_case_folder(case, tmp_path, trained_workdir)
    if case.config_path is not None:
        config = str(tmp_path / case.config_path)
    elif case.config_text is not None:
        config = str(tmp_path / "user_config.py")
    else:
        config = QUICKSTART
    args = ["--config", config, "--workdir", str(tmp_path / case.workdir_rel)]
    args += TINY if case.tiny else ["--no-progress"]
    args += [a.replace("{tmp}", str(tmp_path)) for a in case.args]  # after TINY: they win

    before = _snapshot(tmp_path)
    time.sleep(0.01)  # so a rewrite with identical bytes would still change the mtime
    proc = _cli(args, _env(tfds_dir, case.env))
    after = _snapshot(tmp_path)

    output = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    print(f"{case.name}: rc={proc.returncode} {errors}")
    assert "Traceback" not in output, output[-4000:]
    assert proc.returncode == case.code, output[-4000:]
    assert len(errors) == 1, proc.stderr[-4000:]
    line = errors[0].lower()
    assert case.problem.lower() in line, errors[0]
    assert case.fix.lower() in line, errors[0]

    changed = [p for p, meta in before.items() if after.get(p) != meta]
    assert not changed, f"pre-existing files changed or removed: {changed}"
    unexpected = [p for p in sorted(set(after) - set(before))
                  if not any(fnmatch.fnmatch(p, pat) for pat in case.new_files)]
    assert not unexpected, f"unexpected new files: {unexpected}"


def test_table_is_large_enough():
    assert len(CASES) >= 15
    assert len({c.name for c in CASES}) == len(CASES)

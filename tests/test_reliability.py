"""Resume from anywhere: SIGKILL fault injection, SIGTERM, corrupt checkpoints and shards."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import end_group
from xla_cache import cache_env

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")
# A short quickstart (2 tasks) with a checkpoint every 2 steps, so kills land between checkpoints.
SHORT = ["--config.train.epochs=2", "--config.method.finetune_epochs=2",
         "--config.scenario.max_tasks=2", "--config.generation.num_inference_steps=2",
         "--config.generation.per_class=8", "--config.synthetic.per_class=8",
         "--config.dataset.holdout_per_class=8", "--config.checkpoint.every_steps=2",
         "--no-progress"]
METRIC_KEYS = ("avg_incremental_accuracy", "last_accuracy", "accuracy_matrix", "forgetting",
               "nme_accuracy_matrix")


# The same scenario through the host (grain) pipeline: digits decoded and augmented on the host.
HOST = ["--config.dataset.pipeline=host", "--config.dataset.image_size=8",
        "--config.dataset.test_resize=8", "--config.dataset.workers=0",
        "--config.train.batch_size=16", "--config.synthetic.batch_size=16"]


def _cmd(workdir, extra=()):
    return [sys.executable, "-m", "sdcil_jax.main", "--config", QUICKSTART, "--workdir",
            str(workdir), *SHORT, *extra]


def _strip(lines):
    """metrics.jsonl records without their timings."""
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("time_s")} for x in lines]


def _env(tmp_path):
    return dict(os.environ, TFDS_DATA_DIR=str(tmp_path / "tfds"), **cache_env())


def _run(workdir, tmp_path, extra=()):
    proc = subprocess.run(_cmd(workdir, extra), cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@contextlib.contextmanager
def _launched(workdir, tmp_path, extra=(), env=None, **popen_kwargs):
    """The CLI as a child in its own session; whatever happens in the block, it is ended by its
    process group on the way out (SIGKILL if still running), so a hang or a failed assertion never
    leaves it behind."""
    proc = subprocess.Popen(_cmd(workdir, extra), cwd=ROOT, env=env or _env(tmp_path),
                            start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        end_group(proc, wait_s=60)


def _metrics(workdir):
    results = json.loads((Path(workdir) / "results.json").read_text())
    per_task = [{k: r[k] for k in ("cnn_accuracy", "nme_accuracy", "task_accuracies")}
                for r in results["per_task"]]
    return {k: results[k] for k in METRIC_KEYS}, per_task


def _wait_for(predicate, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def _n_checkpoints(workdir):
    folder = Path(workdir) / "checkpoints"
    return len([p for p in folder.iterdir() if p.name.isdigit()]) if folder.exists() else 0


def _shards(workdir):
    folder = Path(workdir) / "replay_store"
    return len(list(folder.glob("class_*.shard"))) if folder.exists() else 0


def _task_events(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return path.read_text().count('"event": "task"') if path.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    _run(tmp / "work", tmp)
    return _metrics(tmp / "work"), tmp / "work"


@pytest.mark.slow
def test_sigkill_at_three_random_moments_gives_identical_metrics(reference, tmp_path):
    rng = random.Random(1234)
    workdir = tmp_path / "work"
    # Moments: during generation, inside task 1 (mid-epoch checkpoints), inside task 2.
    moments = [lambda: _shards(workdir) >= 1,
               lambda: _n_checkpoints(workdir) >= 1 and _task_events(workdir) == 0,
               lambda: _task_events(workdir) >= 1]
    killed = 0
    for moment in moments:
        with _launched(workdir, tmp_path, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL) as proc:
            if _wait_for(moment, proc):
                time.sleep(rng.uniform(0.0, 1.5))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed += 1
            proc.wait(timeout=600)
    assert killed >= 2  # at least two kills really landed mid-run
    _run(workdir, tmp_path)
    assert _metrics(workdir) == reference[0]
    ref_lines = (reference[1] / "metrics.jsonl").read_text().splitlines()
    got_lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert _strip(got_lines) == _strip(ref_lines)


@pytest.mark.slow
def test_sigterm_saves_and_exits_quickly_then_rerun_finishes(reference, tmp_path):
    workdir = tmp_path / "work"
    with _launched(workdir, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True) as proc:
        assert _wait_for(lambda: _n_checkpoints(workdir) >= 1, proc)
        before = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                        if p.name.isdigit())
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        elapsed = time.time() - sent
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert elapsed < 15, elapsed
    assert "Traceback" not in err and "rerun the same command to resume" in err
    after = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert after[-1] > before[-1]  # a checkpoint was written on the way out
    _run(workdir, tmp_path)
    assert _metrics(workdir) == reference[0]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
    workdir = tmp_path / "work"
    with _launched(workdir, tmp_path, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL) as proc:
        _wait_for(lambda: _n_checkpoints(workdir) >= 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    latest = max((p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))
    victim = max((f for f in (latest / "state").rglob("*") if f.is_file()),
                 key=lambda f: f.stat().st_size)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    proc = _run(workdir, tmp_path)
    assert f"checkpoint {latest.name}" in proc.stderr.lower() or latest.name in proc.stderr
    assert _metrics(workdir) == reference[0]
    assert any((workdir / "checkpoints.corrupt").iterdir())  # moved aside, not deleted


@pytest.mark.slow
def test_corrupt_shard_is_regenerated_on_rerun(reference, tmp_path):
    workdir = tmp_path / "work"
    _run(workdir, tmp_path)
    shard = sorted((workdir / "replay_store").glob("class_*.shard"))[0]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    # Training is finished, so the rerun only re-checks the store (and repairs it).
    proc = _run(workdir, tmp_path)
    assert "checksum" in proc.stderr.lower() or "corrupt" in proc.stderr.lower()
    assert shard.read_bytes() == good  # regenerated byte for byte (header, codec and pixels)
    assert _metrics(workdir) == reference[0]


def _progress(workdir):
    folder = Path(workdir) / "checkpoints"
    out = []
    for path in folder.glob("[0-9]*/progress/metadata") if folder.exists() else []:
        try:
            out.append(json.loads(path.read_text()))
        except ValueError:
            pass
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_of_the_host_pipeline_resumes_at_the_same_batch(tmp_path):
    """The host (grain) pipeline: killed right after a mid-epoch checkpoint (which holds grain's
    iterator state), the rerun continues at that batch and ends with the uninterrupted metrics."""
    reference = tmp_path / "reference"
    _run(reference, tmp_path, HOST)
    workdir = tmp_path / "work"
    with _launched(workdir, tmp_path, HOST, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL) as proc:
        landed = _wait_for(lambda: any(p["phase"] == "train" and p["step"] > 0 and p["task"] == 1
                                       for p in _progress(workdir)), proc)
        proc.send_signal(signal.SIGKILL)
    assert landed
    latest = max(_progress(workdir), key=lambda p: p["save"])
    assert latest["phase"] in ("train", "finetune") and latest["step"] > 0
    assert "grain" in latest["stream"]["real"]  # grain's iterator state, saved in the checkpoint
    _run(workdir, tmp_path, HOST)
    assert _metrics(workdir) == _metrics(reference)
    assert _strip((workdir / "metrics.jsonl").read_text().splitlines()) == _strip(
        (reference / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_resume_on_fewer_devices_continues_with_a_warning(tmp_path):
    """A checkpoint made on 4 devices resumes on 2: the device count only changes float rounding,
    so the run continues (with a warning) instead of being refused."""
    workdir = tmp_path / "work"
    with _launched(workdir, tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   text=True) as proc:
        assert _wait_for(lambda: _n_checkpoints(workdir) >= 1, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    env = dict(_env(tmp_path), XLA_FLAGS="--xla_force_host_platform_device_count=2",
               **cache_env(devices=2))
    rerun = subprocess.run(_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoint" in rerun.stdout
    assert "on other hardware (runtime.device_count (4 -> 2))" in rerun.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert len(results["per_task"]) == 2

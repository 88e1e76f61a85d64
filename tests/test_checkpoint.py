"""Checkpoints: round trip, retention, corruption fallback, half-written saves, fingerprints."""

import glob
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdcil_jax import checkpoint as ck
from sdcil_jax import fingerprint as fp
from sdcil_jax import parallel
from sdcil_jax import train as train_lib
from sdcil_jax.config import base_config
from sdcil_jax.errors import UserError

FIELDS = {"seed": 0, "train.lr": 0.1, "scenario.class_order": [2, 0, 1]}


def _params(num_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {"backbone": {"stem": {"kernel": f32(3, 3, 3, 8)},
                         "block0": {"conv": {"kernel": f32(3, 3, 8, 8)},
                                    "bn": {"scale": f32(8), "bias": f32(8)}}},
            "head": {"w": f32(8, num_classes), "b": f32(num_classes)}}


def _state(num_classes=4, seed=0, steps=2):
    """A TrainState after a few SGD-momentum updates, replicated on the 4 test devices."""
    params = _params(num_classes, seed)
    stats = {"block0": {"bn": {"mean": jnp.full((8,), 0.5), "var": jnp.ones((8,))}}}
    tx = train_lib.make_optimizer(0.1, 0.9, 5e-4, 100)
    state = train_lib.init_state(params, stats, tx)
    for _ in range(steps):
        grads = jax.tree_util.tree_map(lambda p: 0.01 * p + 0.1, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, params=jax.tree_util.tree_map(
            jnp.add, state.params, updates), opt_state=opt_state)
    return {"train": parallel.put_replicated(state, parallel.make_mesh()),
            "rng": jax.random.PRNGKey(seed)}


def _old():
    return {"params": jax.device_get(_params(2, seed=5)),
            "batch_stats": {"block0": {"bn": {"mean": np.zeros(8, np.float32)}}}}


MEMORY = {0: np.array([5, 9, 2], np.int64), 1: np.array([7], np.int64), 3: np.zeros(0, np.int64)}
METRICS = [{"task": 0, "cnn_accuracy": 0.8125, "old_accuracy": None, "task_accuracies": [0.8125],
            "loss": float("nan")}]


def _save(c, step_id, state=None, old=None, progress=None):
    state = _state() if state is None else state
    return c.save(step_id, state=state, old=old, memory=MEMORY,
                  progress=progress or {"task": 1, "epoch": 3, "step_in_epoch": 7, "save": step_id},
                  metrics=METRICS)


def _assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def ckdir(tmp_path):
    return str(tmp_path / "checkpoints")


def test_round_trip_identical_values_dtypes_structure(ckdir):
    state = _state()
    old = _old()
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        path = _save(c, 1, state=state, old=old)
        assert os.path.isdir(path) and c.steps() == [1]
        assert os.path.isfile(os.path.join(path, ck.FILE_LIST))
        seen = []
        template = lambda progress: seen.append(progress) or jax.device_get(state)
        r = c.restore_latest(template, old_template=old)
    assert seen == [{"task": 1, "epoch": 3, "step_in_epoch": 7, "save": 1}]
    assert r.step_id == 1
    assert isinstance(r.state["train"], train_lib.TrainState)
    _assert_same_tree(r.state, jax.device_get(state))
    assert int(r.state["train"].opt_state[1][1].count) == 2  # the schedule's step count
    _assert_same_tree(r.old, old)
    assert sorted(r.memory) == [0, 1, 3]
    for c_id, idx in MEMORY.items():
        assert r.memory[c_id].dtype == np.int64
        np.testing.assert_array_equal(r.memory[c_id], idx)
    assert r.progress["step_in_epoch"] == 7
    assert r.metrics[0]["cnn_accuracy"] == 0.8125 and r.metrics[0]["old_accuracy"] is None
    assert np.isnan(r.metrics[0]["loss"])
    assert r.meta["fields"] == FIELDS and r.meta["has_old"]


def test_without_old_model_and_without_template(ckdir):
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        _save(c, 4, old=None)
        r = c.restore_latest(None)
    assert r.old is None and not r.meta["has_old"]
    # No template: the stored tree as nested dicts/lists with numpy leaves.
    assert set(r.state["train"]) == {"step", "params", "batch_stats", "opt_state"}
    assert r.state["train"]["params"]["head"]["w"].dtype == np.float32


def test_template_mismatch_is_an_error_not_corruption(ckdir):
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        _save(c, 1)
        wrong = jax.device_get(_state(num_classes=6))
        with pytest.raises(ck.CheckpointMismatchError, match=r"params\.head\.b: saved float32\[4\]"):
            c.restore_latest(wrong)
        assert c.steps() == [1]  # not moved aside
        assert c.restore_latest(jax.device_get(_state())).step_id == 1


def test_keep_retention_and_increasing_ids(ckdir):
    state = _state()
    with ck.Checkpointer(ckdir, keep=2, fingerprint_fields=FIELDS) as c:
        for i in (1, 2, 3, 5):
            _save(c, i, state=state)
        assert c.steps() == [3, 5]
        assert sorted(os.listdir(ckdir)) == ["3", "5"]
        with pytest.raises(ValueError, match="not larger"):
            _save(c, 4, state=state)
        c.save(5, state=state, memory={}, progress={"task": 9}, metrics=[], force=True)
        r = c.restore_latest(jax.device_get(state))
        assert r.step_id == 5 and r.progress == {"task": 9} and r.memory == {}


def _zero(path):
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(b"\0" * size)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _state_files(ckdir, step):
    files = sorted(glob.glob(os.path.join(ckdir, str(step), "state", "**", "d", "*"),
                             recursive=True))
    assert files
    return files


CORRUPTIONS = {
    "zero_state_file": lambda d, s: [_zero(f) for f in _state_files(d, s)],
    "truncate_state_file": lambda d, s: [_truncate(f) for f in _state_files(d, s)],
    "delete_state_file": lambda d, s: os.remove(_state_files(d, s)[0]),
    "delete_memory_item": lambda d, s: shutil.rmtree(os.path.join(d, str(s), "memory")),
    "altered_progress_json": lambda d, s: _rewrite(os.path.join(d, str(s), "progress", "metadata"),
                                                   b'"epoch": 3', b'"epoch": 4'),
    "zero_meta": lambda d, s: _zero(os.path.join(d, str(s), "meta", "metadata")),
}


def _rewrite(path, old, new):
    with open(path, "rb") as f:
        data = f.read()
    assert old in data, data
    data = data.replace(old, new)
    with open(path, "wb") as f:
        f.write(data)


CASES = [(kind, True) for kind in sorted(CORRUPTIONS)] + [
    # Killed between orbax's rename and the file list: the item checksums catch the damage.
    ("altered_progress_json", False), ("delete_memory_item", False),
    pytest.param("zero_state_file", False, marks=pytest.mark.filterwarnings(
        # tensorstore fails the read, then its other reads report to orbax's closed event loop
        "ignore::pytest.PytestUnraisableExceptionWarning")),
]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind,file_list", CASES)
def test_corrupt_latest_falls_back_to_previous(ckdir, kind, file_list, caplog):
    state = _state()
    template = jax.device_get(state)
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        _save(c, 1, state=state)
        _save(c, 2, state=state, progress={"task": 1, "epoch": 3, "save": 2})
        if not file_list:
            os.remove(os.path.join(ckdir, "2", ck.FILE_LIST))
        CORRUPTIONS[kind](ckdir, 2)
        with caplog.at_level(logging.WARNING, logger="sdcil_jax.checkpoint"):
            r = c.restore_latest(template)
        assert r.step_id == 1
        bad = [rec.getMessage() for rec in caplog.records if "unreadable (" in rec.getMessage()]
        assert len(bad) == 1 and bad[0].startswith(f"Checkpoint 2 in {ckdir} is unreadable")
        assert "\n" not in bad[0]
        # The bad checkpoint is moved aside, not deleted, and its id can be written again.
        assert c.steps() == [1]
        assert len(os.listdir(ckdir + ".corrupt")) == 1
        _save(c, 2, state=state)
        assert c.restore_latest(template).step_id == 2


def test_all_corrupt_returns_none_with_warning(ckdir, caplog):
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        _save(c, 1)
        _save(c, 2)
        for s in (1, 2):
            _zero(_state_files(ckdir, s)[0])
        with caplog.at_level(logging.WARNING, logger="sdcil_jax.checkpoint"):
            assert c.restore_latest(jax.device_get(_state())) is None
        assert "No readable checkpoint left" in caplog.text
        assert c.steps() == [] and len(os.listdir(ckdir + ".corrupt")) == 2
        assert c.restore_latest(None) is None  # empty folder: None, silently


def test_half_written_checkpoint_is_never_read(ckdir, caplog):
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        _save(c, 1)
    # As if killed mid-save: orbax's temporary folders (both namings), with a missing item.
    tmps = [os.path.join(ckdir, name) for name in ("2.orbax-checkpoint-tmp",
                                                   "3.orbax-checkpoint-tmp-1700000000")]
    for tmp in tmps:
        shutil.copytree(os.path.join(ckdir, "1"), tmp)
        shutil.rmtree(os.path.join(tmp, "metrics"))
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        assert c.steps() == [1]
        with caplog.at_level(logging.WARNING):
            assert c.restore_latest(jax.device_get(_state())).step_id == 1
        assert "unreadable" not in caplog.text
        _save(c, 2)  # the next save clears the leftovers
        assert not any(os.path.exists(tmp) for tmp in tmps) and c.steps() == [1, 2]


KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from sdcil_jax.checkpoint import Checkpointer
    c = Checkpointer(sys.argv[1], keep=3, fingerprint_fields={"seed": 0})
    rng = np.random.default_rng(0)
    state = {"w": rng.normal(size=(4, 1024, 1024)).astype(np.float32)}
    for i in range(1, 10_000):
        state["w"][0, 0, 0] = i
        c.save(i, state=state, memory={0: np.arange(i)}, progress={"i": i}, metrics=[])
        print(i, flush=True)
""")


def test_killed_mid_save_leaves_only_complete_checkpoints(ckdir, caplog):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, ckdir], stdout=subprocess.PIPE,
                            env=env, text=True)
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a stuck writer
    watchdog.start()
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert all(line.strip() for line in lines), lines
        time.sleep(0.15)  # usually inside the next save (each takes ~0.3 s for 16 MiB)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields={"seed": 0}) as c:
        with caplog.at_level(logging.WARNING, logger="sdcil_jax.checkpoint"):
            r = c.restore_latest({"w": jax.ShapeDtypeStruct((4, 1024, 1024), np.float32)})
        assert "unreadable" not in caplog.text
        assert r.step_id >= 3 and r.progress == {"i": r.step_id}
        assert r.state["w"][0, 0, 0] == r.step_id and len(r.memory[0]) == r.step_id
        c.save(r.step_id + 1, state=r.state, memory={}, progress={}, metrics=[])
        assert not [name for name in os.listdir(ckdir) if "tmp" in name]


def test_fingerprint_mismatch_names_keys_and_restart_moves_aside(ckdir):
    with ck.Checkpointer(ckdir, keep=3, fingerprint_fields=FIELDS) as c:
        _save(c, 1)
        _save(c, 2)
        c.check_compatible()  # same fields: fine
    before = sorted(os.path.relpath(p, ckdir) for p in glob.glob(ckdir + "/**", recursive=True))
    changed = dict(FIELDS, seed=1, **{"train.lr": 0.05, "train.epochs": 3})
    c = ck.Checkpointer(ckdir, keep=3, fingerprint_fields=changed)
    with pytest.raises(ck.CheckpointMismatchError) as info:
        c.check_compatible()
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "train.lr (0.1 -> 0.05)" in msg and "seed (0 -> 1)" in msg
    assert "train.epochs (absent -> 3)" in msg and "scenario.class_order" not in msg
    assert "--restart" in msg and "--workdir" in msg and "\n" not in msg and msg.endswith(".")
    moved = c.restart()
    assert os.path.basename(moved).startswith("checkpoints.old-")
    after = sorted(os.path.relpath(p, moved) for p in glob.glob(moved + "/**", recursive=True))
    assert after == before  # nothing deleted
    assert c.steps() == [] and c.restore_latest(None) is None
    c.check_compatible()
    _save(c, 1)
    c.close()
    assert ck.Checkpointer(ckdir, fingerprint_fields=changed).restore_latest(None).step_id == 1


def test_config_fields_for_the_fingerprint():
    cfg = base_config()
    fields = fp.config_fields(cfg, extra={"scenario": {"resolved_order": (3, 1, 2)},
                                               "num_classes": np.int64(10)})
    assert fields["train.lr"] == 0.1 and fields["seed"] == 0
    assert fields["scenario.resolved_order"] == [3, 1, 2] and fields["num_classes"] == 10
    assert fields["generation.prompt_templates"] == ["a photo of a {}"]
    assert fields["train.eval_batch_size"] == 512  # may change the last bits of features: kept
    assert not any(k.startswith("checkpoint.") for k in fields)
    assert "dataset.data_dir" not in fields and "generation.store_dir" not in fields
    assert "train.flip" not in fp.config_fields(cfg, ignore=["train.flip"])
    assert "model.name" not in fp.config_fields(cfg, ignore=["model"])
    other = base_config()
    other.checkpoint.every_minutes = 1.0
    other.dataset.data_dir = "/elsewhere"
    other.dataset.workers = 3
    assert fp.config_fields(other) == fp.config_fields(cfg)
    other.train.lr = 0.05
    assert fp.diff_fields(fp.config_fields(cfg), fp.config_fields(other)) == [
        "train.lr (0.1 -> 0.05)"]
    with pytest.raises(ValueError, match="repeats"):
        fp.config_fields(cfg, extra={"seed": 1})


def test_diff_fields():
    assert fp.diff_fields({"a": 1, "b": "x"}, {"a": 1, "b": "x"}) == []
    assert fp.diff_fields({"a": 1, "b": "x"}, {"b": "y", "c": [1]}) == [
        'a (1 -> absent)', 'b ("x" -> "y")', "c (absent -> [1])"]
    long = fp.diff_fields({"o": list(range(100))}, {"o": list(range(1, 101))})[0]
    assert len(long) < 100 and "..." in long


def test_save_timer_with_fake_clock():
    now = [0.0]
    timer = ck.SaveTimer(every_minutes=5, every_steps=0, clock=lambda: now[0])
    assert not timer.due(10)
    now[0] = 299.0
    assert not timer.due(20)
    now[0] = 300.0
    assert timer.due(21)
    assert not timer.due(22)  # counts again from the save
    now[0] = 599.0
    assert not timer.due(30)
    now[0] = 600.5
    assert timer.due(31)

    steps = ck.SaveTimer(every_minutes=0, every_steps=100, start_step=50, clock=lambda: now[0])
    assert not steps.due(149)
    assert steps.due(150) and not steps.due(151) and steps.due(250)
    now[0] = 1e9
    assert not steps.due(251)  # time disabled

    both = ck.SaveTimer(every_minutes=1, every_steps=10, clock=lambda: now[0])
    assert both.due(10)
    now[0] += 61
    assert both.due(11)
    both.reset(11)  # e.g. after an end-of-task save
    assert not both.due(20) and both.due(21)

    off = ck.SaveTimer(0, 0, clock=lambda: now[0])
    now[0] += 1e6
    assert not off.due(10 ** 9)


def test_unwritable_directory_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ck.CheckpointError, match="choose a writable --workdir"):
        ck.Checkpointer(str(blocker / "checkpoints"), fingerprint_fields=FIELDS)

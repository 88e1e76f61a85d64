"""End-to-end runs of the quickstart scenario (shortened), through the CLI and ``sdcil_jax.run``."""

import json
import logging
from pathlib import Path

import jax
import pytest

import sdcil_jax
from sdcil_jax.config import load_config_file
from sdcil_jax.errors import GenerationError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.py")


def short_config(tfds_dir, **overrides):
    config = load_config_file(QUICKSTART)
    config.dataset.data_dir = str(tfds_dir)
    config.train.epochs = 1
    config.method.finetune_epochs = 1
    config.scenario.max_tasks = 2
    config.generation.per_class = 8
    config.generation.num_inference_steps = 2
    config.synthetic.per_class = 8
    config.dataset.holdout_per_class = 8
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


@pytest.mark.slow
def test_quickstart_cli_writes_results(quickstart_run):
    proc, workdir = quickstart_run.proc, quickstart_run.workdir
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "average incremental accuracy (CNN)" in proc.stdout
    # The plans before generating and training; a projection once generation has a measured rate
    # and once each task's first epoch has one.
    lines = proc.stdout.splitlines()
    gen_plan = [line for line in lines if line.startswith("plan: generate ")]
    assert len(gen_plan) == 1 and " images (" in gen_plan[0], proc.stdout[-2000:]
    plan = [line for line in lines if line.startswith("plan: train 2 task(s)")]
    assert len(plan) == 1, proc.stdout[-2000:]
    projected = [line for line in lines if line.startswith("projected: ")]
    assert sum(" images/s" in line for line in projected) == 1, projected
    assert len(projected) == 3, projected
    results = json.loads((workdir / "results.json").read_text())
    for key in ("avg_incremental_accuracy", "last_accuracy", "accuracy_matrix", "forgetting",
                "per_task", "config", "class_order", "versions"):
        assert key in results
    assert len(results["per_task"]) == 2 and len(results["accuracy_matrix"][1]) == 2
    assert results["config"]["method"]["name"] == "podnet"
    assert results["per_task"][1]["synthetic_images"] == 2 * 8
    for name in ("accuracy_per_task.png", "accuracy_matrix.png", "metrics.jsonl",
                 "replay_store/manifest.json", "replay_store/preview.png"):
        assert (workdir / name).exists(), name
    events = [json.loads(line)["event"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("task") == 2 and "train" in events and "finetune" in events
    # TensorBoard events (tensorboardX) read back with a plain TFRecord reader.
    scalars = read_scalars(workdir / "tensorboard")
    for tag in ("accuracy/cnn", "accuracy/nme", "accuracy/new", "train/loss", "train/lr",
                "finetune/loss", "train/pod_spatial"):
        assert tag in scalars, (tag, sorted(scalars))
    cnn = [v for _, v in sorted(scalars["accuracy/cnn"])]
    assert cnn == pytest.approx([r["cnn_accuracy"] for r in results["per_task"]], abs=1e-4)
    assert len(scalars["accuracy/old"]) == 1  # defined from the second task on
    images = read_tags(workdir / "tensorboard", "image")
    assert {"accuracy_matrix", "replay/samples"} <= images


def _records(logdir: Path):
    """Every Event in the TFRecord files of ``logdir`` (length, crc, data, crc framing)."""
    from tensorboardX.proto.event_pb2 import Event

    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            length = int.from_bytes(data[pos:pos + 8], "little")
            yield Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for event in _records(logdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def read_tags(logdir: Path, kind: str) -> set[str]:
    return {v.tag for e in _records(logdir) for v in e.summary.value if v.HasField(kind)}


ARMS = {
    "finetune": dict(method__name="finetune", synthetic__use_in="none"),
    "podnet": dict(method__name="podnet", synthetic__use_in="none"),
    "podnet_distillation": dict(method__name="podnet", synthetic__use_in="distillation"),
    "podnet_classification": dict(method__name="podnet", synthetic__use_in="classification"),
    "podnet_both": dict(method__name="podnet", synthetic__use_in="both"),
    "podnet_replace_memory": dict(method__name="podnet", synthetic__use_in="none",
                                  synthetic__replace_memory=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("arm", sorted(ARMS))
def test_ablation_arms_run(arm, tmp_path):
    config = short_config(tmp_path / "tfds", generation__backend="real_holdout",
                          synthetic__diagnostic_per_class=0, **ARMS[arm])
    results = sdcil_jax.run(config, str(tmp_path / arm), progress=False)
    assert 0.0 <= results["last_accuracy"] <= 100.0
    assert results["per_task"][1]["train_images"] > 0
    if ARMS[arm].get("synthetic__replace_memory"):
        assert results["per_task"][1]["synthetic_images"] == 2 * 8


@pytest.mark.slow
def test_generate_then_train_and_domain_gap(tmp_path, caplog):
    config = short_config(tmp_path / "tfds", generation__backend="real_holdout",
                          synthetic__per_class=6, synthetic__diagnostic_per_class=2)
    workdir = str(tmp_path / "w")
    with pytest.raises(GenerationError, match="--mode generate"):
        sdcil_jax.run(config, workdir, mode="train", progress=False)
    out = sdcil_jax.run(config, workdir, mode="generate", progress=False)
    assert len(out["classes"]) == 4  # diagnostic on: the last task's classes are generated too
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        results = sdcil_jax.run(config, workdir, mode="train", progress=False)
    gaps = [r["synthetic_accuracy"] for r in results["per_task"]]
    assert all(g is not None and 0 <= g <= 100 for g in gaps)
    # The evaluation programs compile once each per run, however many passes and tasks: features
    # only (imprinting, herding, the memory's NME means), plain and flipped; the head's logits
    # (test set, domain gap: the head holds every class from the first task). The steps: task 0's
    # training step, the later tasks' (old model, synthetic batch) and the finetuning step.
    compiled = [r.getMessage().split()[1] for r in caplog.records
                if r.getMessage().startswith("Compiling ")]
    assert compiled.count("jit(eval_fn)") == 3, compiled
    assert compiled.count("jit(step)") == 3, compiled

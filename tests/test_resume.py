"""Checkpoints and resume: file format (no pickles), atomic publication, keep-last, refusal of changed settings,
and the real thing: a stage-2 LoRA run killed with SIGKILL after a mid-run checkpoint and resumed in a new process
ends with exactly the weights of an uninterrupted run (LoRA dropout on, so RNG state matters).

Run as a script, this file is the training worker the SIGKILL test starts.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

# one_thread is an autouse fixture: imported here, it runs for every test of this file.
from fixtures.training import TinySamples, one_thread, save_base, tiny_config  # noqa: F401
from spatial_mllm.training.checkpoint import (
    TRAINER_STATE,
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    load_tree,
    publish,
    save_tree,
    staging_folder,
)
from spatial_mllm.training.engine import train
from spatial_mllm.training.metrics import read_metrics

WORKER_STEPS = 8


def worker_config(base: Path, out: Path, resume: str, every: int = 2):
    return tiny_config(
        base, out, "instruct",
        f"optimisation.max_steps={WORKER_STEPS}", "lora.dropout=0.1", f"checkpoint.every_steps={every}", f"resume={resume}",
    )


def run_worker(base: str, out: str, resume: str, delay: str, every: str = "2") -> None:
    torch.set_num_threads(1)
    train(worker_config(Path(base), Path(out), resume, int(every)), TinySamples(Path(base), delay=float(delay)))


def worker_command(base: Path, out: Path, resume: str, delay: float, every: int = 2) -> list[str]:
    return [sys.executable, __file__, str(base), str(out), resume, str(delay), str(every)]


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory) -> Path:
    """A stage-1 output folder, the starting point of the stage-2 runs below."""
    root = tmp_path_factory.mktemp("resume")
    base = save_base(root / "base")
    torch.set_num_threads(1)
    return train(tiny_config(base, root / "stage1", "align", "optimisation.max_steps=2"), TinySamples(base))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    weights = load_file(out / "model.safetensors")
    weights.update(load_file(out / "adapter_model.safetensors"))
    return weights


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(stage1_dir, tmp_path):
    killed, full = tmp_path / "killed", tmp_path / "full"
    # Slow samples (0.15 s each) leave time to kill the run right after its step-4 checkpoint appears.
    process = subprocess.Popen(worker_command(stage1_dir, killed, "null", 0.15), env=worker_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 120
    while not checkpoint.exists():
        assert process.poll() is None, f"the worker ended before its step-4 checkpoint:\n{process.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, "no step-4 checkpoint within 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "config.json").exists(), "the run finished before it was killed"
    latest_checkpoint_before = latest_checkpoint(killed)
    assert latest_checkpoint_before.name in ("step-00000004", "step-00000006")

    outputs = {}
    for out, resume in ((killed, "auto"), (full, "null")):
        result = subprocess.run(worker_command(stage1_dir, out, resume, 0.0), env=worker_env(), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[out] = result.stdout
    assert f"resuming from {latest_checkpoint_before}" in outputs[killed] and "resuming" not in outputs[full]

    resumed, uninterrupted = final_weights(killed), final_weights(full)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=0, msg=name)
    trained = [n for n in uninterrupted if ".lora_B." in n]
    assert trained and all(uninterrupted[n].abs().sum() > 0 for n in trained)
    # One consistent history: steps 1..8 once each, the same losses, no half-written checkpoint left behind.
    killed_losses = [(m["step"], m["loss"]) for m in read_metrics(killed / "metrics.jsonl")]
    full_losses = [(m["step"], m["loss"]) for m in read_metrics(full / "metrics.jsonl")]
    assert [s for s, _ in killed_losses] == list(range(1, WORKER_STEPS + 1))
    np.testing.assert_allclose([v for _, v in killed_losses], [v for _, v in full_losses], atol=1e-6, rtol=0)
    assert not list((killed / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_random_kills_and_a_damaged_checkpoint_still_end_byte_identical(stage1_dir, tmp_path):
    """SIGKILL at random moments of a run that checkpoints (and prunes) every step, timed to land while a checkpoint
    is saved, published or pruned; after the second kill the newest checkpoint is also zeroed. Each restart resumes
    with resume=auto; the final weights must equal an uninterrupted run's exactly."""
    rng = random.Random(11)
    out, damaged = tmp_path / "killed", False
    steps_done = 0
    for kill in range(4):
        process = subprocess.Popen(worker_command(stage1_dir, out, "auto", 0.04, every=1), env=worker_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Kill moments: as the checkpoint of a random later step starts to be written (its hidden staging folder
        # appears), plus a random few milliseconds: in the middle of saving, publishing or pruning.
        target = rng.randint(steps_done + 1, WORKER_STEPS - 1)
        names = (f".tmp-step-{target:08d}", f"step-{target:08d}")
        deadline = time.monotonic() + 120
        while not any((out / "checkpoints" / name).exists() for name in names):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint of step {target} within 120 s"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.04))
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        latest = latest_checkpoint(out)
        steps_done = int(latest.name.split("-")[1]) if latest is not None else 0
        if kill == 1 and latest is not None:
            (latest / "trainable.safetensors").write_bytes(b"\0" * 256)  # the newest checkpoint is damaged too
            damaged = True
            steps_done = max(0, steps_done - 1)
        if steps_done >= WORKER_STEPS - 1:
            break
    assert damaged
    finish = subprocess.run(worker_command(stage1_dir, out, "auto", 0.0, every=1), env=worker_env(),
                            capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-3000:]
    full = tmp_path / "full"
    result = subprocess.run(worker_command(stage1_dir, full, "null", 0.0, every=1), env=worker_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, uninterrupted = final_weights(out), final_weights(full)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_from_a_copied_checkpoint_gives_the_same_weights(stage1_dir, tmp_path):
    full = train(worker_config(stage1_dir, tmp_path / "full", "null"), TinySamples(stage1_dir))
    assert [p.name for p in list_checkpoints(full)] == ["step-00000006", "step-00000008"]  # keep_last 2
    shutil.copytree(full / "checkpoints" / "step-00000006", tmp_path / "copy" / "checkpoints" / "step-00000006")
    resumed = train(worker_config(stage1_dir, tmp_path / "copy", "auto"), TinySamples(stage1_dir))
    expected, got = final_weights(full), final_weights(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert [m["step"] for m in read_metrics(resumed / "metrics.jsonl")] == [7, 8]


def test_checkpoint_contents(stage1_dir, tmp_path):
    out = train(worker_config(stage1_dir, tmp_path / "run", "null"), TinySamples(stage1_dir))
    folder = latest_checkpoint(out)
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.safetensors",
        "scheduler.json", "rng-rank0.safetensors", "rng-rank0.json", TRAINER_STATE,
    }  # tensors in safetensors, the rest in JSON: nothing to unpickle
    state = TrainerState.load(folder)
    assert (state.step, state.epoch, state.step_in_epoch, state.samples_seen) == (8, 4, 0, 32)
    assert state.fingerprint["lora.dropout"] == 0.1 and state.fingerprint["dataset.num_samples"] == 8
    trainable = load_file(folder / "trainable.safetensors")
    assert trainable and all(k.startswith("model.projector.") or ".lora_" in k for k in trainable)
    optimizer = load_tree(folder, "optimizer")
    assert len(optimizer["state"]) == len(trainable)
    assert {g["name"] for g in optimizer["param_groups"]} == {"language_model", "projector", "projector_no_decay"}
    assert load_tree(folder, "scheduler")["last_epoch"] == 8
    rng = load_tree(folder, "rng-rank0")
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"][0] == "MT19937" and isinstance(rng["python"], tuple)


def test_resume_refuses_other_settings(stage1_dir, tmp_path):
    train(tiny_config(stage1_dir, tmp_path / "run", "instruct", "optimisation.max_steps=2"), TinySamples(stage1_dir))
    changed = tiny_config(stage1_dir, tmp_path / "run", "instruct", "optimisation.max_steps=2", "resume=auto",
                          "optimisation.lr=5e-4")
    with pytest.raises(ValueError, match=r"optimisation\.lr: checkpoint 0\.001, now 0\.0005"):
        train(changed, TinySamples(stage1_dir))
    with pytest.raises(ValueError, match="dataset.num_samples: checkpoint 8, now 12"):
        train(tiny_config(stage1_dir, tmp_path / "run", "instruct", "optimisation.max_steps=2", "resume=auto"),
              TinySamples(stage1_dir, n=12))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint folder"):
        train(tiny_config(stage1_dir, tmp_path / "other", "instruct", f"resume={tmp_path / 'nowhere'}"),
              TinySamples(stage1_dir))
    # Settings that do not change the result may differ: micro-batch size, checkpointing, workers.
    same = tiny_config(stage1_dir, tmp_path / "run", "instruct", "optimisation.max_steps=2", "resume=auto",
                       "optimisation.micro_batch_size=4", "checkpoint.every_steps=1")
    assert train(same, TinySamples(stage1_dir)) == tmp_path / "run"


def test_half_written_checkpoints_are_ignored_and_cleaned(stage1_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(stage1_dir, out, "align", "optimisation.max_steps=2"), TinySamples(stage1_dir))
    staging = staging_folder(out, 3)
    staging.mkdir()
    (staging / "trainable.safetensors").write_bytes(b"partial")
    incomplete = out / "checkpoints" / "step-00000009"  # e.g. copied by hand, without its trainer state
    incomplete.mkdir()
    assert latest_checkpoint(out).name == "step-00000002"
    train(tiny_config(stage1_dir, out, "align", "optimisation.max_steps=2", "resume=auto"), TinySamples(stage1_dir))
    assert not staging.exists()


def test_state_tree_round_trip_and_publish(tmp_path):
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).reshape(2, 3)}},
        "param_groups": [{"name": "projector", "betas": (0.9, 0.999), "params": [0], "foreach": None}],
        "numpy": ("MT19937", np.arange(5, dtype=np.uint32), 2, 0, 0.5),
    }
    staging = staging_folder(tmp_path, 5)
    staging.mkdir(parents=True)
    save_tree(tree, staging, "part")
    final = publish(staging)
    assert final.name == "step-00000005" and not staging.exists()
    back = load_tree(final, "part")
    assert list(back["state"]) == [0]  # int keys stay ints
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and back["param_groups"][0]["foreach"] is None
    assert back["numpy"][0] == "MT19937" and back["numpy"][1].dtype == np.uint32
    np.testing.assert_array_equal(back["numpy"][1], np.arange(5))
    with pytest.raises(TypeError, match="cannot store a object in checkpoint part 'bad'"):
        save_tree({"x": object()}, tmp_path, "bad")


if __name__ == "__main__":
    run_worker(*sys.argv[1:])

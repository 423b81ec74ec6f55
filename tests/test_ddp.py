"""Two processes with DDP (gloo on CPU, started by torchrun) give the same loss curve and weights as one process
with the same global batch (gradient accumulation instead of a second process). Half the samples are text-only,
so some micro-batches leave the projector out of the graph on one process but not the other.

Run as a script (under torchrun), this file is the training worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spatial_mllm.training.batches import MicroBatchSampler
from spatial_mllm.training.engine import train
from spatial_mllm.training.metrics import read_metrics
from fixtures.training import TinySamples, save_base, tiny_config

TEXT_ONLY = frozenset({0, 1, 2, 3})
STEPS = 6


def ddp_config(base: Path, out: Path):
    return tiny_config(base, out, "instruct", f"optimisation.max_steps={STEPS}", "checkpoint.every_steps=3")


def run_worker(base: str, out: str) -> None:
    torch.set_num_threads(1)
    train(ddp_config(Path(base), Path(out)), TinySamples(Path(base), text_only=TEXT_ONLY))
    torch.distributed.destroy_process_group()


def weights(out: Path) -> dict[str, torch.Tensor]:
    found = load_file(out / "model.safetensors")
    found.update(load_file(out / "adapter_model.safetensors"))
    return found


def test_processes_share_out_the_same_micro_batches():
    def steps(world_size: int, rank: int, start_step: int = 0, count: int = 6) -> list[list[list[int]]]:
        sampler = iter(MicroBatchSampler(10, 4, 2, world_size, rank, seed=3, start_step_in_epoch=start_step))
        per_step = 4 // (2 * world_size)
        return [[next(sampler) for _ in range(per_step)] for _ in range(count)]

    one = steps(1, 0)
    two = [r0 + r1 for r0, r1 in zip(steps(2, 0), steps(2, 1))]
    assert sorted(map(sorted, one)) == sorted(map(sorted, two))
    assert [sorted(sum(s, [])) for s in one] == [sorted(sum(s, [])) for s in two]  # step by step
    assert all(len(set(sum(s, []))) == 4 for s in one)
    epoch0 = sum(sum(one[:2], []), [])
    assert len(set(epoch0)) == 8  # 2 steps of an epoch of 10 samples (the incomplete 3rd is dropped)
    assert steps(1, 0, start_step=1, count=3) == one[1:4]  # a resumed sampler continues the same order
    assert one[2:4] != one[:2]  # the next epoch is reshuffled


def test_length_grouped_batches_pad_less_and_keep_every_rule():
    lengths = [int(x) for x in torch.randint(10, 400, (640,), generator=torch.Generator().manual_seed(0))]

    def epoch(grouped: bool, start_step: int = 0) -> list[list[int]]:
        sampler = MicroBatchSampler(640, 32, 8, 1, 0, seed=5, start_step_in_epoch=start_step,
                                    lengths=lengths if grouped else None)
        batches = iter(sampler)
        return [next(batches) for _ in range((sampler.steps_per_epoch - start_step) * 4)]

    def padded_tokens(micro_batches: list[list[int]]) -> int:
        return sum(len(m) * max(lengths[i] for i in m) for m in micro_batches)

    grouped, random_order = epoch(True), epoch(False)
    assert sorted(sum(grouped, [])) == list(range(640))  # every sample once per epoch
    assert padded_tokens(grouped) < 0.75 * padded_tokens(random_order)
    assert epoch(True) == grouped and epoch(True, start_step=3) == grouped[12:]  # deterministic, resumable
    steps = [max(lengths[i] for i in sum(grouped[k : k + 4], [])) for k in range(0, len(grouped), 4)]
    assert steps != sorted(steps, reverse=True)  # long and short steps alternate


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    base = save_base(tmp_path / "base")
    # Some micro-batch is all text: on that process the projector gets no gradient (DDP must not hang on it).
    micro_batches = iter(MicroBatchSampler(8, 4, 2, world_size=1, rank=0, seed=0))
    assert any(set(next(micro_batches)) <= TEXT_ONLY for _ in range(2 * STEPS))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(ddp_config(base, tmp_path / "one"), TinySamples(base, text_only=TEXT_ONLY))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, str(base), str(tmp_path / "two")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "= 2 x 2 process(es) x 1 accumulation" in result.stdout

    two = tmp_path / "two"
    one_metrics, two_metrics = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [m["step"] for m in two_metrics] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "lr"):
        np.testing.assert_allclose([m[key] for m in two_metrics], [m[key] for m in one_metrics], rtol=1e-5, atol=1e-6)
    expected, got = weights(one), weights(two)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    # Only the main process wrote: one metrics line per step, one set of checkpoints, both processes' RNG state.
    checkpoint = two / "checkpoints" / f"step-{STEPS:08d}"
    assert (checkpoint / "rng-rank0.json").is_file() and (checkpoint / "rng-rank1.json").is_file()


if __name__ == "__main__":
    run_worker(*sys.argv[1:])

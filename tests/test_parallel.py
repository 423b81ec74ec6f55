"""The demo's arms in worker processes (demo/parallel.py): results in order, threads shared out, log records
forwarded, errors raised here, and a training that gives the same numbers there as here."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from fixtures.training import save_base
from fixtures.workers import refuse, tiny_losses, where_am_i
from spatial_mllm.demo.parallel import default_jobs, map_in_processes, threads_per_job


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_calls_run_in_worker_processes_in_order_with_shared_threads(two_threads, caplog):
    with caplog.at_level(logging.INFO, logger="spatial_mllm.demo"):
        results = map_in_processes(where_am_i, [("a",), ("b",), ("c",)], jobs=2)
    assert [tag for tag, _, _ in results] == ["a", "b", "c"]
    pids = {pid for _, pid, _ in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert {threads for _, _, threads in results} == {1}  # two jobs share this process's two threads
    messages = sorted(record.getMessage() for record in caplog.records if record.name == "spatial_mllm.demo.worker")
    assert messages == ["working on a", "working on b", "working on c"]


def test_worker_errors_reach_the_caller_and_jobs_are_checked():
    with pytest.raises(ValueError, match="record 7 is broken"):
        map_in_processes(refuse, [("7",)], jobs=1)
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        map_in_processes(refuse, [("7",)], jobs=0)


def test_thread_shares_and_default_jobs(two_threads, monkeypatch):
    assert threads_per_job(1) == 2 and threads_per_job(2) == 1 and threads_per_job(8) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_jobs(5) == 2 and default_jobs(1) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_jobs(5) == 1


def test_a_training_gives_the_same_losses_in_a_worker(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker gets this process's thread count (one job)
    try:
        base = save_base(tmp_path / "base")
        here = tiny_losses(base, tmp_path / "here")
        [there] = map_in_processes(tiny_losses, [(base, tmp_path / "there")], jobs=1)
    finally:
        torch.set_num_threads(threads)
    assert len(here) == 4
    assert there == here

"""Intra-op threads of an evaluation: few on a GPU, all on the CPU, restored afterwards."""
from __future__ import annotations

import torch

from evaluator.threads import CUDA_HOST_THREADS, evaluation_threads, torch_threads


def test_gpu_evaluations_use_few_host_threads_and_cpu_ones_all():
    with torch_threads(8):
        assert evaluation_threads("cpu") == 8
        assert evaluation_threads(torch.device("cuda", 1)) == CUDA_HOST_THREADS
    with torch_threads(1):
        assert evaluation_threads("cuda") == 1  # never more than the caller has


def test_torch_threads_restores_the_count_even_after_an_error():
    before = torch.get_num_threads()
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == before


def test_in_process_score_runs_with_the_evaluation_threads(tmp_path):
    """The in-process reference path (trusted seeds) sees the count a sandbox worker gets."""
    from pathlib import Path

    from evaluator.candidate import load_masker
    from evaluator.inprocess import score_masker
    from evaluator.workload import load_workload

    wl = load_workload("tiny", progress=False)
    seed = load_masker(Path(__file__).resolve().parents[1] / "seeds" / "sink_window.py")
    seen = []

    def masker(inp):
        seen.append(torch.get_num_threads())
        return seed(inp)

    with torch_threads(2):
        report = score_masker(masker, wl, 0.1)
    assert report.valid and set(seen) == {evaluation_threads(wl.records[0].queries.device)}

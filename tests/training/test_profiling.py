"""The NVIDIA example's TrainerArgs.profile over [profile_step_start, profile_step_end) (our TrainerArgs.profile_range)
and our profile_steps: torch.profiler over exactly those steps, its summary and Chrome trace written atomically into
the run directory, on CPU too."""

import json
import os
import re

import gin
import pytest
import torch

from hstu.training.config import parse_gin
from hstu.training.profiling import SUMMARY_FILE, TRACE_FILE, WARMUP_STEPS, StepProfiler


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _profiled_steps(tmp_path, steps, **window):
    """Run ``steps`` fake steps (a record_function named step_<k> each) under a StepProfiler; the profiled k."""
    profiler = StepProfiler.of(run_dir=str(tmp_path), is_main=True, device=torch.device("cpu"), **window)
    profiler.at_step(0)
    for k in range(1, steps + 1):
        with torch.profiler.record_function(f"step_{k}"):
            torch.ones(4).sum()
        profiler.at_step(k)
    profiler.finish()
    if not (tmp_path / TRACE_FILE).exists():
        return []
    with open(tmp_path / TRACE_FILE) as f:
        names = {event.get("name", "") for event in json.load(f)["traceEvents"]}
    return sorted(int(n[5:]) for n in names if re.fullmatch(r"step_\d+", n))


@pytest.mark.parametrize("window, steps, expected", [
    (dict(profile_steps=0, profile_range=(0, 3)), 5, [1, 2, 3]),  # 0-based steps 0..2: from before the first step
    (dict(profile_steps=0, profile_range=(2, 4)), 6, [3, 4]),
    (dict(profile_steps=0, profile_range=(3, 10)), 5, [4, 5]),  # the run ends inside the window: what it captured
    (dict(profile_steps=0, profile_range=(7, 9)), 5, []),  # never reached: nothing written
    (dict(profile_steps=2, profile_range=None), WARMUP_STEPS + 4, [WARMUP_STEPS + 1, WARMUP_STEPS + 2]),
    (dict(profile_steps=0, profile_range=None), 5, []),
])
def test_exactly_the_steps_of_the_window_are_profiled(tmp_path, window, steps, expected):
    assert _profiled_steps(tmp_path, steps, **window) == expected
    assert (tmp_path / SUMMARY_FILE).exists() == bool(expected)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_resumed_run_counts_profile_steps_from_its_first_step(tmp_path):
    profiler = StepProfiler.of(2, None, str(tmp_path), True, torch.device("cpu"), first_step=30)
    assert profiler.window == (30 + WARMUP_STEPS, 32 + WARMUP_STEPS)


def test_the_example_profile_fields_map_onto_profile_range():
    example = ["TrainerArgs.train_batch_size=8", "DatasetArgs.dataset_name='ml-1m'", "DatasetArgs.max_history_seqlen=20"]
    assert parse_gin([], example + ["TrainerArgs.profile=True"]).trainer.profile_range == (100, 200)
    gin.clear_config()
    args = parse_gin([], example + ["TrainerArgs.profile=True", "TrainerArgs.profile_step_start=1",
                                    "TrainerArgs.profile_step_end=3"])
    assert (args.trainer.profile_range, args.trainer.profile_steps) == ((1, 3), 0)
    gin.clear_config()
    assert parse_gin([], example + ["TrainerArgs.profile_step_start=1"]).trainer.profile_range is None


@pytest.mark.parametrize("bindings, fields", [
    (["TrainerArgs.profile=True", "TrainerArgs.profile_steps=3"], ["TrainerArgs.profile_range",
                                                                   "TrainerArgs.profile_steps"]),
    (["TrainerArgs.profile=True", "TrainerArgs.profile_step_start=5", "TrainerArgs.profile_step_end=5"],
     ["TrainerArgs.profile_step_start", "TrainerArgs.profile_step_end"]),
    (["TrainerArgs.profile_step_start=1", "TrainerArgs.profile_range=(1, 2)"],
     ["TrainerArgs.profile_step_start", "TrainerArgs.profile_range"]),
    (["TrainerArgs.profile_range=(3, 1)"], ["TrainerArgs.profile_range"]),
    (["TrainerArgs.profile_range=(1,)"], ["TrainerArgs.profile_range"]),
])
def test_bad_profile_settings_are_named_errors(bindings, fields):
    with pytest.raises(ValueError) as info:
        parse_gin([], bindings)
    for name in fields:
        assert name in str(info.value)


def test_a_three_step_example_run_writes_a_trace_of_its_profiled_steps(tmp_path):
    from hstu.data.synthetic import write_synthetic
    from hstu.training.trainer import run

    data = tmp_path / "data"
    write_synthetic(str(data), show_progress=False, num_users=40, num_items=60, num_topics=4, mean_length=12,
                    min_length=6, max_length=20, seed=1)
    run_dir = tmp_path / "run"
    args = parse_gin([], [
        "TrainerArgs.train_batch_size=8", "TrainerArgs.eval_batch_size=8", "TrainerArgs.max_train_iters=3",
        "TrainerArgs.max_eval_iters=1", "TrainerArgs.log_interval=1", "TrainerArgs.eval_interval=0",
        "TrainerArgs.profile=True", "TrainerArgs.profile_step_start=1", "TrainerArgs.profile_step_end=3",
        "DatasetArgs.dataset_name='synthetic'", f"DatasetArgs.dataset_path={str(data)!r}",
        "DatasetArgs.max_history_seqlen=10", "NetworkArgs.num_layers=1", "NetworkArgs.hidden_size=8",
        "NetworkArgs.num_attention_heads=1", "NetworkArgs.kv_channels=8", "NetworkArgs.scaling_seqlen=40",
        "OptimizerArgs.optimizer_str='adam'", "OptimizerArgs.learning_rate=1e-3",
        f"TrainerArgs.ckpt_save_dir={str(run_dir)!r}", "TrainerArgs.device='cpu'", "TrainerArgs.progress_bar=False",
        "TrainerArgs.tensorboard=False", "TrainerArgs.plot=False", "TrainerArgs.compute_baseline=False"])
    run("retrieval", args)
    with open(run_dir / TRACE_FILE) as f:
        trace = json.load(f)
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    summary = (run_dir / SUMMARY_FILE).read_text()
    assert summary.startswith("profiled steps 2..3:") and "== by host time ==" in summary
    # the window's per-category breakdown (CPU time here), in profile.txt and summary.json
    assert "step breakdown over 2 profiled steps (CPU time" in summary
    with open(run_dir / "summary.json") as f:
        breakdown = json.load(f)["profile_breakdown"]
    assert breakdown["time"] == "cpu" and breakdown["steps"] == 2
    assert sum(breakdown["share"].values()) == pytest.approx(1.0)
    assert set(breakdown["share"]) == {"attention", "embeddings", "collectives", "optimizer", "gemm", "other", "idle"}
    for category in ("attention", "embeddings", "optimizer", "gemm", "other", "idle"):  # one process: no collectives
        assert breakdown["ms_per_step"][category] > 0, category
    assert breakdown["busy_ms"] <= breakdown["window_ms"]
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]

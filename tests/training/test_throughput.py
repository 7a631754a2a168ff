"""Throughput and MFU reporting: the card peak table, the log window's numbers, and the run summary."""

from __future__ import annotations

import types

import pytest
import torch

from hstu.training.flops import device_peak, peak_for_name
from hstu.training.policies import LogWindow


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0),
    ("NVIDIA L40S", 362.1), ("Tesla T4", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_dense_bf16_peaks_by_card_name(name, peak):
    assert peak_for_name(name) == peak


def test_cpu_has_no_peak_and_an_override_wins():
    assert device_peak(torch.device("cpu")) == ("cpu", None)
    assert device_peak(torch.device("cpu"), 500.0) == ("cpu", None)  # no MFU on CPU, whatever is set


def _window(device: str, peak=None, world: int = 4):
    ctx = types.SimpleNamespace(device=torch.device(device), world_size=world, dp_size=world)
    return LogWindow(ctx, peak_tflops=peak)


def test_gpu_throughput_has_tflops_and_mfu_against_the_peak():
    got = _window("cuda", peak=1000.0)._throughput(global_tokens=8e6, flops=3e14, seconds=2.0)
    assert got == {"tokens_per_s": 4e6, "tokens_per_s_per_gpu": 1e6, "tflops": 150.0, "mfu": 0.15}
    unknown = _window("cuda")._throughput(8e6, 3e14, 2.0)
    assert "mfu" not in unknown and unknown["tflops"] == 150.0
    cpu = _window("cpu", peak=1000.0)._throughput(8e6, 3e14, 2.0)
    assert set(cpu) == {"tokens_per_s", "tokens_per_s_per_gpu"}


def test_run_throughput_is_the_mean_over_flushed_windows_only():
    window = _window("cpu", world=1)
    assert window.run_throughput() == {}
    window.total_seconds, window.total_tokens, window.total_flops = 4.0, 1000.0, 0.0
    assert window.run_throughput() == {"tokens_per_s": 250.0, "tokens_per_s_per_gpu": 250.0}


def test_throughput_warmup_steps_are_left_out_of_the_run_mean():
    """TrainerArgs.throughput_warmup_steps: a log window ends at the warm-up's last step, and the windows up to it
    are not in the run's totals."""
    from hstu.training.config import TrainerArgs
    from hstu.training.policies import Schedule, StepResult

    args = TrainerArgs(log_interval_steps=10, throughput_warmup_steps=3)
    schedule = Schedule.of(args, first_step=20)  # a resumed run: the warm-up is its own first 3 steps
    assert [s for s in range(21, 41) if schedule.log_due(s, False, False)] == [23, 30, 40]
    assert [s for s in range(1, 21) if Schedule.of(TrainerArgs(log_interval_steps=10)).log_due(s, False, False)] \
        == [10, 20]
    ctx = types.SimpleNamespace(device=torch.device("cpu"), world_size=1, dp_size=1)
    window = LogWindow(ctx, count_after_step=23)
    for step in range(21, 31):
        window.add(StepResult(torch.tensor(1.0), 1e-3, num_tokens=100 if step <= 23 else 7, flops=0.0), step, 0)
        if schedule.log_due(step, False, False):
            window.flush()
    assert window.total_tokens == 7 * 7  # steps 24..30 only

"""Optional torch.profiler capture of a window of training steps (``TrainerArgs.profile_steps``)."""

from __future__ import annotations

import os
import time
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

WARMUP_STEPS = 10  # steps skipped first: allocator growth, autotuning and lazy initialisation are not steady state


class StepProfiler:
    """Profiles ``num_steps`` training steps after ``WARMUP_STEPS`` on the main rank and writes ``profile.txt``:
    the mean step time of the window, then the ops sorted by device time and by host time."""

    def __init__(self, num_steps: int, run_dir: str, enabled: bool, device: torch.device, first_step: int = 0):
        self.num_steps = num_steps
        self.path = os.path.join(run_dir, "profile.txt")
        self.device = device
        self.start_step = first_step + WARMUP_STEPS
        self.enabled = enabled and num_steps > 0
        self.profiler: Optional[profile] = None
        self.started_at = 0.0
        self.last_step = first_step

    def after_step(self, step: int) -> None:
        """Call after every optimizer step with the new global step count."""
        if not self.enabled:
            return
        self.last_step = step
        if step == self.start_step and self.profiler is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._synchronize()
            self.profiler = profile(activities=activities, record_shapes=False)
            self.profiler.__enter__()
            self.started_at = time.perf_counter()
        elif self.profiler is not None and step >= self.start_step + self.num_steps:
            self.finish()

    def finish(self) -> None:
        if self.profiler is None:
            return
        self._synchronize()
        elapsed = time.perf_counter() - self.started_at
        self.profiler.__exit__(None, None, None)
        steps = max(self.last_step - self.start_step, 1)
        averages = self.profiler.key_averages()
        sections = [f"profiled {steps} steps: {1e3 * elapsed / steps:.2f} ms per step (wall, incl. profiler overhead)"]
        if self.device.type == "cuda":
            sections += ["== by device time ==", averages.table(sort_by="self_cuda_time_total", row_limit=40)]
        sections += ["== by host time ==", averages.table(sort_by="self_cpu_time_total", row_limit=40)]
        with open(self.path, "w") as f:
            f.write("\n\n".join(sections) + "\n")
        print(f"[hstu] profile of {steps} steps written to {self.path}", flush=True)
        self.profiler = None
        self.enabled = False

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

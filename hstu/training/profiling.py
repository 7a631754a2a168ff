"""torch.profiler capture of a window of training steps, written into the run directory.

Two ways to choose the window (``TrainerArgs``):

* ``profile_steps = N``: N steps after ``WARMUP_STEPS`` steps of this run;
* ``profile_range = (start, end)``: the steps with 0-based indices ``start .. end - 1`` of the run, i.e. the capture
  begins once ``start`` optimizer steps are done and ends once ``end`` are (the NVIDIA example's ``profile = True``
  with ``profile_step_start`` / ``profile_step_end``). On CUDA the window is also a ``cudaProfilerStart`` /
  ``cudaProfilerStop`` range on every rank, which ``nsys profile --capture-range=cudaProfilerApi`` records, as the
  example's.

The main rank writes ``profile.txt`` (mean step time of the window, the window's per-category breakdown of
:mod:`hstu.training.breakdown`, then the ops sorted by device and by host time) and ``profile_trace.json`` (a Chrome trace, for chrome://tracing or Perfetto), each through a temporary file that is
fsynced and renamed. A run that ends inside the window writes what it captured.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from hstu.training.breakdown import format_breakdown, step_breakdown
from hstu.training.run_logging import fsync_directory, write_text_atomic

WARMUP_STEPS = 10  # steps skipped first: allocator growth, autotuning and lazy initialisation are not steady state
SUMMARY_FILE = "profile.txt"
TRACE_FILE = "profile_trace.json"


class StepProfiler:
    """Profiles the optimizer steps ``start_step + 1 .. end_step`` (global step counts; None: no window)."""

    def __init__(self, window: Optional[tuple[int, int]], run_dir: str, is_main: bool, device: torch.device):
        self.window = window
        self.run_dir = run_dir
        self.is_main = is_main
        self.device = device
        self.profiler: Optional[profile] = None  # the main rank's, while the window is open
        self.active = False  # the window is open
        self.cuda_range = False
        self.started_at = 0.0
        self.started_step = 0
        self.last_step = 0
        self.breakdown: Optional[dict] = None  # the finished window's step_breakdown (main rank)

    @classmethod
    def of(cls, profile_steps: int, profile_range: Optional[Sequence[int]], run_dir: str, is_main: bool,
           device: torch.device, first_step: int = 0) -> "StepProfiler":
        """The window of ``TrainerArgs.profile_range`` (absolute steps), else of ``profile_steps`` (after
        ``WARMUP_STEPS`` steps of a run starting at ``first_step``), else none."""
        if profile_range is not None:
            window: Optional[tuple[int, int]] = (int(profile_range[0]), int(profile_range[1]))
        elif profile_steps > 0:
            window = (first_step + WARMUP_STEPS, first_step + WARMUP_STEPS + profile_steps)
        else:
            window = None
        return cls(window, run_dir, is_main, device)

    def at_step(self, step: int) -> None:
        """Call with the global step count before the first step and after every optimizer step."""
        if self.window is None:
            return
        self.last_step = step
        start, end = self.window
        if not self.active and start <= step < end:
            self._start(step)
        elif step >= end:
            self.finish()

    def _start(self, step: int) -> None:
        self._synchronize()
        if self.device.type == "cuda":
            torch.cuda.profiler.start()
            self.cuda_range = True
        if self.is_main:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=False)
            self.profiler.__enter__()
        self.active = True
        self.started_at, self.started_step = time.perf_counter(), step

    def finish(self) -> None:
        """End the window (if one is open) and write its files; the profiler is done afterwards."""
        if self.window is None:
            return
        self.window = None
        if not self.active:
            return
        self.active = False
        self._synchronize()
        elapsed = time.perf_counter() - self.started_at
        if self.cuda_range:
            torch.cuda.profiler.stop()
            self.cuda_range = False
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        steps = max(self.last_step - self.started_step, 1)
        averages = profiler.key_averages()
        self.breakdown = step_breakdown(profiler.events(), elapsed, steps, self.device.type)
        sections = [f"profiled steps {self.started_step + 1}..{self.started_step + steps}: {1e3 * elapsed / steps:.2f} "
                    "ms per step (wall, incl. profiler overhead)", format_breakdown(self.breakdown)]
        if self.device.type == "cuda":
            sections += ["== by device time ==", averages.table(sort_by="self_cuda_time_total", row_limit=40)]
        sections += ["== by host time ==", averages.table(sort_by="self_cpu_time_total", row_limit=40)]
        write_text_atomic(os.path.join(self.run_dir, SUMMARY_FILE), "\n\n".join(sections) + "\n")
        trace = os.path.join(self.run_dir, TRACE_FILE)
        export_trace_atomic(profiler, trace)
        print(format_breakdown(self.breakdown), flush=True)
        print(f"[hstu] profile of {steps} steps written to {os.path.join(self.run_dir, SUMMARY_FILE)} and {trace}",
              flush=True)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def export_trace_atomic(profiler: profile, path: str) -> None:
    """The Chrome trace of a finished ``profiler`` at ``path``, through a temporary sibling: fsync, rename."""
    tmp = f"{path}.tmp"
    try:
        profiler.export_chrome_trace(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_directory(os.path.dirname(path) or ".")

"""What the training loop does between steps: when to log, evaluate, checkpoint and stop (:class:`Schedule`), and
the logging window that turns step results into ``train_log.jsonl`` records (:class:`LogWindow`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from hstu.training.config import TrainerArgs


@dataclass
class StepResult:
    """What one training step hands to logging. ``loss`` stays on the device until the log window ends."""

    loss: torch.Tensor
    lr: float
    num_tokens: int
    flops: float
    grad_norm: Any = None  # the dense optimizer's clipped norm (None without grad_clip_norm)
    loss_scale: Any = None  # fp16: the loss scale after this step, a device tensor (None without loss scaling)


@dataclass(frozen=True)
class Schedule:
    """The cadences of ``TrainerArgs``: each method answers "is it due now" for the step just taken (1-based
    ``step``) or for the end of an epoch. ``last_step``: the step that ends training; ``stop``: the step after which
    the run stops early (``stop_after_steps``), where the stop itself writes the checkpoint."""

    log_interval_steps: int
    eval_interval_steps: Optional[int]
    eval_every_epochs: int
    checkpoint_interval_steps: Optional[int]
    stop_after_steps: Optional[int]
    warmup_end: Optional[int] = None  # the step that ends the throughput warm-up (a log window ends there)

    @classmethod
    def of(cls, t: TrainerArgs, first_step: int = 0) -> "Schedule":
        """The cadences of ``t`` for a run whose first step follows ``first_step`` steps taken."""
        warmup_end = first_step + t.throughput_warmup_steps if t.throughput_warmup_steps > 0 else None
        return cls(t.log_interval_steps, t.eval_interval_steps, t.eval_every_epochs, t.checkpoint_interval_steps,
                   t.stop_after_steps, warmup_end)

    def stop_due(self, step: int) -> bool:
        return self.stop_after_steps is not None and step >= self.stop_after_steps

    def log_due(self, step: int, last_step: bool, stop: bool) -> bool:
        return step % self.log_interval_steps == 0 or last_step or stop or step == self.warmup_end

    def eval_due_after_step(self, step: int, last_step: bool) -> bool:
        """Every ``eval_interval_steps`` steps; the last step is left to the final evaluation."""
        return bool(self.eval_interval_steps) and step % self.eval_interval_steps == 0 and not last_step

    def eval_due_at_epoch_end(self, step: int, epoch: int, last_eval_step: int, total_steps: int) -> bool:
        """At the end of every ``eval_every_epochs``-th epoch (``epoch`` counts the finished ones), unless this step
        was just evaluated or training is over (the final evaluation follows)."""
        if last_eval_step == step or step >= total_steps:
            return False
        if self.eval_interval_steps and step % self.eval_interval_steps == 0:
            return True
        return self.eval_every_epochs > 0 and epoch % self.eval_every_epochs == 0

    def checkpoint_due_after_step(self, step: int, stop: bool) -> bool:
        """Every ``checkpoint_interval_steps`` steps (> 0); -1 and None never checkpoint by step count."""
        interval = self.checkpoint_interval_steps
        return interval is not None and interval > 0 and step % interval == 0 and not stop

    def steps_to_break(self, step: int, total_steps: int) -> int:
        """How many steps after ``step`` (the steps taken) the next one comes after which the model is used outside
        the step loop: an evaluation, a checkpoint, the stop or the end of training. A train pipeline is drained
        there, so that nothing is in flight while the model evaluates or its state and data position are saved."""
        end = step + 1
        while end < total_steps:
            stop = self.stop_due(end)
            if stop or self.eval_due_after_step(end, False) or self.checkpoint_due_after_step(end, stop):
                break
            end += 1
        return end - step

    def checkpoint_due_after_eval(self, stop: bool) -> bool:
        """With ``checkpoint_interval_steps`` None, every periodic evaluation is followed by a checkpoint."""
        return self.checkpoint_interval_steps is None and not stop


@dataclass
class LogWindow:
    """The steps since the last ``train_log.jsonl`` write. Losses are kept on the device; :meth:`flush` makes one
    collective and one device sync for the whole window."""

    ctx: Any  # the run's ParallelContext
    peak_tflops: Optional[float] = None  # one GPU's dense bf16 peak: records get "mfu" when known
    # windows that end at or before this step are left out of the run's totals (TrainerArgs.throughput_warmup_steps)
    count_after_step: int = 0
    losses: list = field(default_factory=list)
    records: list = field(default_factory=list)
    tokens: int = 0
    flops: float = 0.0
    grad_norm: Any = None
    loss_scale: Any = None
    started: float = field(default_factory=time.perf_counter)
    # totals over every flushed window (time in training steps only): the run's mean throughput
    total_seconds: float = 0.0
    total_flops: float = 0.0
    total_tokens: float = 0.0

    def add(self, result: StepResult, step: int, epoch: int) -> None:
        self.tokens += result.num_tokens
        self.flops += result.flops
        self.grad_norm = result.grad_norm
        self.loss_scale = result.loss_scale
        self.losses.append(result.loss)
        self.records.append({"step": step, "epoch": epoch, "lr": result.lr})

    def restart_clock(self) -> None:
        """Leave the time spent outside training steps (an evaluation, a checkpoint) out of the throughput."""
        self.started = time.perf_counter()

    def flush(self) -> tuple[list[dict], dict]:
        """The window's records (loss averaged over the data-parallel group, throughput on the last) and the progress
        bar's postfix; starts the next window."""
        ctx = self.ctx
        # Losses averaged over the DP group (the TP ranks of a group hold the same loss), tokens summed over it.
        packed = torch.cat([torch.stack(self.losses).float(), torch.tensor([float(self.tokens)], device=ctx.device)])
        if ctx.dp_size > 1:
            torch.distributed.all_reduce(packed, group=ctx.dp_group)  # SUM (gloo has no AVG)
            packed[:-1].div_(ctx.dp_size)
        values = packed.cpu().tolist()
        losses, global_tokens = values[:-1], values[-1]
        records = self.records
        for record, loss in zip(records, losses):
            record["loss"] = loss
        if self.grad_norm is not None:
            records[-1]["grad_norm"] = round(float(self.grad_norm), 4)
        if self.loss_scale is not None:
            records[-1]["loss_scale"] = float(self.loss_scale)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        if records[-1]["step"] > self.count_after_step:
            self.total_seconds += elapsed
            self.total_flops += self.flops
            self.total_tokens += global_tokens
        throughput = self._throughput(global_tokens, self.flops, elapsed)
        records[-1].update(throughput)
        postfix = {"loss": f"{losses[-1]:.4f}", "tok/s": f"{throughput['tokens_per_s']:,.0f}"}
        if "tflops" in throughput:
            postfix["TFLOP/s"] = f"{throughput['tflops']:.1f}"
        if "mfu" in throughput:
            postfix["MFU"] = f"{100 * throughput['mfu']:.1f}%"
        self.losses, self.records, self.tokens, self.flops = [], [], 0, 0.0
        self.restart_clock()
        return records, postfix

    def _throughput(self, global_tokens: float, flops: float, seconds: float) -> dict:
        """tokens_per_s (all data-parallel ranks together), tokens_per_s_per_gpu (over every rank); on GPU tflops (model FLOPs of this
        rank's work per second) and, with a known peak, mfu (tflops / peak)."""
        seconds = max(seconds, 1e-9)
        out = {"tokens_per_s": global_tokens / seconds, "tokens_per_s_per_gpu": global_tokens / seconds / self.ctx.world_size}
        if self.ctx.device.type == "cuda":
            out["tflops"] = flops / seconds / 1e12
            if self.peak_tflops:
                out["mfu"] = out["tflops"] / self.peak_tflops
        return {k: round(v, 4 if k == "mfu" else 3) for k, v in out.items()}

    def run_throughput(self) -> dict:
        """The mean throughput over every flushed window after ``count_after_step`` (evaluations and checkpoints
        left out)."""
        if self.total_seconds <= 0:
            return {}
        return self._throughput(self.total_tokens, self.total_flops, self.total_seconds)


__all__ = ["LogWindow", "Schedule", "StepResult"]

"""The training loop shared by retrieval and ranking."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from hstu.distributed import ParallelModel, parallelize
from hstu.distributed.agreement import run_agreed
from hstu.modules.hstu_layer import HSTULayer
from hstu.training import checkpoint as ckpt
from hstu.training.breakdown import format_breakdown
from hstu.training.config import AllArgs, OptimizerArgs
from hstu.training.distributed import ParallelContext, setup_parallelism, teardown
from hstu.training.flops import device_peak, input_projection_flops, train_step_flops
from hstu.training.memory import format_memory, memory_report
from hstu.training.policies import LogWindow, Schedule, StepResult
from hstu.training.precision import Precision
from hstu.training.profiling import StepProfiler
from hstu.training.run_logging import RunLogger, earlier_run_outputs, move_run_aside, write_json_atomic
from hstu.training.tasks import TASKS, Task, check_task_config, ensure_dataset


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    tokens: int = 0
    last_eval_step: int = -1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_multiplier(step: int, total_steps: int, args: OptimizerArgs) -> float:
    """Linear warmup over ``warmup_steps``, then constant / linear / cosine decay to ``min_lr_ratio``."""
    if args.warmup_steps > 0 and step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.decay == "constant":
        return 1.0
    span = max(1, total_steps - args.warmup_steps)
    progress = min(1.0, (step - args.warmup_steps) / span)
    if args.decay == "linear":
        shape = 1.0 - progress
    elif args.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"OptimizerArgs.decay must be constant, linear or cosine, got {args.decay!r}")
    return args.min_lr_ratio + (1.0 - args.min_lr_ratio) * shape


class Trainer:
    """One training run in ``args.trainer.run_dir``.

    ``resume``: continue from the newest checkpoint of the run directory that verifies (see
    :func:`hstu.training.checkpoint.choose_checkpoint`). ``fresh``: move an earlier run found in the run directory
    aside (``<run_dir>.old-<UTC time>``) and start anew. Without either, a run directory holding an earlier run is
    refused with a FileExistsError; nothing in it is deleted in any case.
    """

    def __init__(self, task_name: str, args: AllArgs, resume: bool = False, fresh: bool = False):
        self.ctx: Optional[ParallelContext] = None
        self.logger: Optional[RunLogger] = None
        try:
            self._setup(task_name, args, resume, fresh)
        except BaseException:
            self.close()  # process groups of a failed start (e.g. missing dataset)
            raise

    def _setup(self, task_name: str, args: AllArgs, resume: bool, fresh: bool) -> None:
        if resume and fresh:
            raise ValueError("resume and fresh exclude each other: --resume continues the run, --fresh starts anew")
        self.args = args
        t = args.trainer
        # The configuration against the task and the dataset's metadata, before any process group starts or a
        # --fresh run moves the old run directory aside.
        check_task_config(task_name, args)
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        # Same path for every world size (1 included): torch.distributed + Megatron parallel_state.
        self.ctx, self.parallel_settings = setup_parallelism(args.parallelism, args.optimizer, t.device, seed=t.seed)
        if t.deterministic:
            # cuBLAS picks reduction orders per workspace unless its workspace is pinned (read when its handle is
            # created, i.e. at the first matmul, which comes later).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Before anything is read or written: refuses a reused run directory, picks the checkpoint to resume from.
        resume_from, manifest = self._prepare_run_dir(t.run_dir, resume, fresh, args.dataset.dataset_dir)
        init_from, init_manifest = None, {}
        if resume_from is None and t.init_from is not None:
            # A run that resumes continues its own checkpoints; otherwise it starts from another run's state.
            init_from, init_manifest = self._decided_on_rank0(lambda: self._init_checkpoint(t.init_from))
        seed_everything(t.seed)  # identical initialisation on every rank (replicas and TP slices start equal)
        ensure_dataset(args, self.ctx)  # collective: rank 0 generates a missing synthetic dataset
        self.task: Task = TASKS[task_name](args, self.ctx)
        self.train_loader, self.eval_loader = self.task.loaders()  # sharded by the data-parallel rank
        self.model = self.task.build_model()  # on CPU; the tables are moved onto the device by sharding
        for name, child in self.model.named_children():
            if name != "embeddings":  # dense modules and parameter-free ones with buffers (loss weights)
                child.to(self.ctx.device)
        self._set_deterministic(t.deterministic)
        # Tables sharded in place (TorchRec, fused optimizer in backward), HSTU layers tensor-parallel when TP > 1,
        # the dense part wrapped (Megatron DDP + optimizer on CUDA, fp32 all-reduce + torch optimizer on CPU).
        self.parallel: ParallelModel = parallelize(self.model, self.ctx, self.parallel_settings, args.optimizer,
                                                   grad_clip_norm=t.grad_clip_norm)
        self._set_deterministic(t.deterministic)  # the tensor-parallel layers too
        self.precision = Precision(self.ctx.device, t.bf16, t.fp16, t.loss_scale_init, t.loss_scale_growth_interval)
        self.precision.check_model(self.parallel)
        self.steps = self._make_steps()
        if self.ctx.is_main:
            print(f"[hstu] {self.ctx.describe()}\n[hstu] {self.parallel.sparse.describe()}", flush=True)
        steps_per_epoch = len(self.train_loader)
        self.total_steps = t.max_epochs * steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps) if t.max_epochs else t.max_steps
        lr, sparse_lr = args.optimizer.learning_rate, args.parallelism.sparse_learning_rate
        self.base_lr, self.base_sparse_lr = lr, (lr if sparse_lr is None else sparse_lr)
        self.state = TrainState()
        self.pending_rng: Optional[dict] = None
        if resume_from is not None:
            self._load(resume_from, manifest)
        else:
            if init_from is not None:
                self._initialise_from(init_from, init_manifest)
            # Different dropout / negative samples per data-parallel rank, reproducible from the seed. The ranks of
            # one TP group share the stream: they must draw the same negatives and input dropout (the dropout
            # inside TP layers uses Megatron's per-TP-rank tracker).
            seed_everything(t.seed + 1_000_003 * self.ctx.dp_rank)
        self.logger = self._open_run_outputs(task_name, resume)
        self.peak_eval: dict = {}
        self.last_eval: dict = {}
        self.max_step_tokens = 0  # the largest training step's token count (memory report)
        self.profile_breakdown: Optional[dict] = None  # the profiled window's step breakdown (main rank)

    def _prepare_run_dir(self, run_dir: str, resume: bool, fresh: bool, dataset_dir: str) -> tuple[Optional[str], dict]:
        """Collective: rank 0 applies the run-directory rules and picks the checkpoint; every rank gets the outcome
        (the same error is raised on every rank). Returns (checkpoint path or None, its verified manifest)."""
        return self._decided_on_rank0(lambda: self._check_run_dir(run_dir, resume, fresh, dataset_dir))

    def _decided_on_rank0(self, decide: Callable[[], tuple]) -> tuple:
        """Collective: ``decide()`` on rank 0, its result (or its error, raised on every rank) on every rank."""
        outcome: tuple = ("error", RuntimeError("not decided"))
        if self.ctx.is_main:
            try:
                outcome = ("ok", *decide())
            except Exception as err:  # every failure reaches the other ranks, which would otherwise wait forever
                outcome = ("error", err)
        if self.ctx.world_size > 1:
            box = [outcome]
            torch.distributed.broadcast_object_list(box, src=0)
            outcome = box[0]
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1], outcome[2]

    def _init_checkpoint(self, directory: str) -> tuple[str, dict]:
        path, manifest, notes = ckpt.choose_init_checkpoint(directory)
        for note in notes:
            print(f"[hstu] TrainerArgs.init_from: {note}", flush=True)
        return path, manifest

    def _check_run_dir(self, run_dir: str, resume: bool, fresh: bool, dataset_dir: str) -> tuple[Optional[str], dict]:
        if resume:
            path, manifest, notes = ckpt.choose_checkpoint(run_dir)
            for note in notes:
                print(f"[hstu] --resume: {note}", flush=True)
            if path is None:
                print(f"[hstu] --resume: no checkpoint in {os.path.join(run_dir, ckpt.CHECKPOINT_DIR)}: starting from "
                      "scratch", flush=True)
                return None, {}
            ckpt.check_compatible(manifest, path, self.ctx)
            return path, manifest
        earlier = earlier_run_outputs(run_dir)
        if not earlier:
            return None, {}
        if not fresh:
            raise FileExistsError(
                f"run directory {run_dir} holds an earlier run ({', '.join(earlier)}): pass --resume to continue it, "
                f"or --fresh to move it aside (to {run_dir}.old-<UTC time>) and start anew; nothing was changed")
        moved = move_run_aside(run_dir, keep_clear_of=(dataset_dir,))
        print(f"[hstu] --fresh: moved the earlier run in {run_dir} to {moved}", flush=True)
        return None, {}

    def _open_run_outputs(self, task_name: str, resume: bool) -> RunLogger:
        """Collective: the run logger (its files on rank 0) and rank 0's ``config.json``, agreed on every rank."""
        t = self.args.trainer

        def open_outputs() -> RunLogger:
            # A --resume without any checkpoint restarts from step 0: what an earlier attempt logged is replayed.
            logger = RunLogger(t.run_dir, self.ctx.is_main, t.tensorboard,
                               resume_step=self.state.step if resume else None)
            try:
                if self.ctx.is_main:
                    write_json_atomic(os.path.join(t.run_dir, "config.json"),
                                      {"task": task_name, **self.args.to_dict()})
            except BaseException:
                logger.close()
                raise
            return logger

        return run_agreed(self.ctx, f"writing the logs and config.json of the run directory {t.run_dir}",
                          open_outputs)

    def _set_deterministic(self, deterministic: bool) -> None:
        for module in self.model.modules():
            if isinstance(module, HSTULayer) or hasattr(module, "deterministic"):
                module.deterministic = deterministic

    def learning_rates(self, step: int) -> tuple[float, float]:
        """(dense, sparse) learning rates of update ``step`` (0-based): warmup/decay applied to both."""
        m = lr_multiplier(step, self.total_steps, self.args.optimizer)
        return self.base_lr * m, self.base_sparse_lr * m

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _save(self) -> None:
        """Collective: tables + dense part + optimizers via hstu.distributed, plus this rank's trainer state."""
        t = self.args.trainer
        extra = {"train_state": asdict(self.state), "rng": ckpt.capture_rng_state(),
                 "train_loader": self.train_loader.state_dict(), "world_size": self.ctx.world_size,
                 **self.precision.state_dict()}
        ckpt.save_checkpoint(t.run_dir, self.state.step, self.parallel, extra, keep_last=t.keep_last_checkpoints)

    def _load(self, path: str, manifest: dict) -> None:
        extra = ckpt.load_checkpoint(path, self.parallel, manifest)
        self.state = TrainState(**extra["train_state"])
        self.train_loader.load_state_dict(extra["train_loader"])
        self.precision.load_state_dict(extra)
        # Restored once the loader's iterator exists: creating it may draw from the global RNG.
        self.pending_rng = extra["rng"]
        if self.ctx.is_main:
            print(f"[hstu] resumed from {path} at step {self.state.step} (epoch {self.state.epoch})", flush=True)

    def _initialise_from(self, path: str, manifest: dict) -> None:
        """Weights and optimizer states (dense and tables) of checkpoint ``path`` of another run; the step, data
        position and random streams start afresh, as the NVIDIA example's ckpt_load_dir does. Only reads ``path``."""
        try:
            ckpt.load_checkpoint(path, self.parallel, manifest)
        except (ckpt.CheckpointError, RuntimeError, KeyError) as err:  # RuntimeError: a model of other shapes
            raise ckpt.CheckpointError(f"TrainerArgs.init_from={self.args.trainer.init_from!r}: {err}") from None
        if self.ctx.is_main:
            print(f"[hstu] model and optimizer state from {path} (its step {manifest['step']}); this run starts at "
                  "step 0", flush=True)

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, with_baseline: bool = False) -> dict:
        rng = ckpt.capture_rng_state()  # evaluation must not shift the training random streams
        self.model.eval()
        started = time.perf_counter()
        try:
            with contextlib.nullcontext() if self.steps is None else self.steps.detached():
                metrics = self.task.evaluate(self.model, self.eval_loader, self.args.trainer.eval_max_batches,
                                             with_baseline)
        finally:
            self.model.train()
            ckpt.restore_rng_state(rng)
        record = {"step": self.state.step, "epoch": self.state.epoch, **metrics,
                  "eval_seconds": round(time.perf_counter() - started, 3)}
        self.logger.log_eval(record)
        self.logger.plot() if self.args.trainer.plot else None
        self.state.last_eval_step = self.state.step
        self.last_eval = record
        return record

    def _restore_pending_rng(self) -> None:
        if self.pending_rng is not None:
            ckpt.restore_rng_state(self.pending_rng)
            self.pending_rng = None

    # ---- training -----------------------------------------------------------------------------------------------
    def _make_steps(self):
        """The step loop of TrainerArgs.pipeline: None for our own step (:meth:`train_step`), else TorchRec's
        pipeline (hstu/training/pipeline.py) driving the same update."""
        kind = self.args.trainer.pipeline
        if kind == "none":
            return None
        from hstu.training.pipeline import StepUpdate, TorchRecSteps

        update = StepUpdate(self._begin_update, self._finish_update)
        return TorchRecSteps(kind, self.model, self.ctx.device, update, self.precision.autocast, self.precision.scaled,
                             pin_memory=self.ctx.device.type == "cuda", announce=self.ctx.is_main)

    def _begin_update(self) -> float:
        """Learning rates of the step and cleared gradients; returns the dense learning rate. Before the forward:
        the sharded tables' fused optimizer updates inside backward."""
        lr, sparse_lr = self.learning_rates(self.state.step)
        self.parallel.set_learning_rate(lr, sparse_lr)
        self.parallel.zero_grad()
        return lr

    def _finish_update(self) -> Any:
        """Gradient reduction and optimizer steps after backward; returns the clipped gradient norm (or None)."""
        self.parallel.finish_grad_sync()  # DP average of dense + replicated-table grads, TP partial sums
        return self.precision.step(self.parallel)  # dense optimizer (clipping inside), replicated tables

    def _step_done(self, out, batch, lr: float, grad_norm) -> StepResult:
        """Advances the step counters after the update of ``batch`` (on the device) with output ``out``."""
        self.state.step += 1
        self.state.tokens += out.num_tokens
        head = self.task.head_flops(out.extras.get("num_queries", out.extras.get("num_candidates", 0)))
        flops = train_step_flops(self.model.encoder.config, out.num_tokens, out.sum_squared_lengths, head,
                                 input_projection_flops(self.model, batch))
        self.max_step_tokens = max(self.max_step_tokens, out.num_tokens)
        return StepResult(out.loss.detach(), lr, out.num_tokens, flops, grad_norm, self.precision.loss_scale())

    def train_step(self, batch) -> StepResult:
        """Forward, backward and optimizer update of one batch; advances the step counters. Makes no device sync:
        the loss stays on the device for the log window."""
        batch = batch.to(self.ctx.device, non_blocking=True)  # pinned by the loader on CUDA
        lr = self._begin_update()
        with self.precision.autocast():
            out = self.model(batch)  # no wrapper: tables are sharded in place; per-rank mean loss
        self.precision.backward(out.loss)  # scaled by the loss scale in fp16
        grad_norm = self._finish_update()
        return self._step_done(out, batch, lr, grad_norm)

    def _run_steps(self, batches: Iterator) -> Iterator[StepResult]:
        """The step results of ``batches``, through TrainerArgs.pipeline; the pipeline is empty when it ends."""
        if self.steps is None:
            for batch in batches:
                yield self.train_step(batch)
            return
        for out, batch, lr, grad_norm in self.steps.run(batches):
            yield self._step_done(out, batch, lr, grad_norm)

    def _epoch_batches(self) -> Iterator:
        """The training loader's batches of the current epoch; a resumed run's random streams are restored once
        the loader's iterator exists (creating it may draw from the global RNG), before any step."""
        for batch in self.train_loader:
            self._restore_pending_rng()
            yield batch

    def train(self) -> dict:
        """Steps until ``total_steps`` (or ``stop_after_steps``), with the logging, evaluation and checkpoint
        cadences of :class:`~hstu.training.policies.Schedule`; then the final evaluation and summary."""
        t = self.args.trainer
        card, peak = device_peak(self.ctx.device, t.peak_tflops)
        if self.ctx.is_main and self.ctx.device.type == "cuda":
            print(f"[hstu] MFU against {card}'s dense bf16 peak of {peak:g} TFLOP/s per GPU" if peak else
                  f"[hstu] no dense bf16 peak known for {card}: TFLOP/s are logged without MFU "
                  "(set TrainerArgs.peak_tflops)", flush=True)
        schedule = Schedule.of(t, first_step=self.state.step)
        window = LogWindow(self.ctx, peak_tflops=peak, count_after_step=self.state.step + t.throughput_warmup_steps)
        progress = tqdm(total=self.total_steps, initial=self.state.step,
                        disable=not (t.progress_bar and self.ctx.is_main), desc=f"{self.task.name}", unit="step",
                        dynamic_ncols=True, file=sys.stdout, mininterval=0.1 if sys.stdout.isatty() else 5.0)
        profiler = StepProfiler.of(t.profile_steps, t.profile_range, t.run_dir, self.ctx.is_main, self.ctx.device,
                                   first_step=self.state.step)
        profiler.at_step(self.state.step)
        first_step, first_epoch, train_started = self.state.step, self.state.epoch, time.perf_counter()
        stopped = False
        self.model.train()
        while self.state.step < self.total_steps and not stopped:
            finished, stopped = self._train_epoch(schedule, window, progress, profiler)
            if not finished:
                break
            # The loader finished the epoch (a run resumed exactly at an epoch's end gets no batch in it).
            self._restore_pending_rng()
            self.state.epoch += 1
            if schedule.eval_due_at_epoch_end(self.state.step, self.state.epoch, self.state.last_eval_step,
                                              self.total_steps):
                self._periodic_eval(schedule, window, progress, stop=False)
        progress.close()
        profiler.finish()
        self.profile_breakdown = profiler.breakdown
        if stopped:
            return self._stop()
        return self._finish(time.perf_counter() - train_started, first_step, first_epoch, window.run_throughput())

    def _train_epoch(self, schedule: Schedule, window: LogWindow, progress, profiler) -> tuple[bool, bool]:
        """The steps of the current epoch, in segments that end where the model is next used outside the step loop
        (Schedule.steps_to_break); returns (whether the loader finished the epoch, whether the run stops)."""
        self.train_loader.set_epoch(self.state.epoch)
        batches = self._epoch_batches()
        while True:
            length, taken = schedule.steps_to_break(self.state.step, self.total_steps), 0
            for result in self._run_steps(itertools.islice(batches, length)):
                taken += 1
                window.add(result, self.state.step, self.state.epoch)
                progress.update(1)
                profiler.at_step(self.state.step)
                last_step = self.state.step >= self.total_steps
                stopped = self._after_step(schedule, window, progress, last_step)
                if stopped or (last_step and self.train_loader.batches_consumed < len(self.train_loader)):
                    return False, stopped  # (at an epoch's end the loop ends by itself: the epoch counts as finished)
            if taken < length:
                return True, False

    def _after_step(self, schedule: Schedule, window: LogWindow, progress, last_step: bool) -> bool:
        """Logging, evaluation and checkpoint of the step just taken, when due; returns whether the run stops now."""
        step = self.state.step
        stop = schedule.stop_due(step)
        if schedule.log_due(step, last_step, stop):
            records, postfix = window.flush()
            self.logger.log_train(records)
            progress.set_postfix(postfix, refresh=False)
        if schedule.eval_due_after_step(step, last_step):
            self._periodic_eval(schedule, window, progress, stop)
        if schedule.checkpoint_due_after_step(step, stop):
            self._save()
        return stop

    def _periodic_eval(self, schedule: Schedule, window: LogWindow, progress, stop: bool) -> None:
        self._report(self.evaluate(), progress)
        if schedule.checkpoint_due_after_eval(stop):
            self._save()
        window.restart_clock()

    def _stop(self) -> dict:
        """``stop_after_steps`` reached: checkpoint (for --resume) and return without the final evaluation."""
        self._save()
        if self.ctx.is_main:
            print(f"[hstu] stopped after step {self.state.step} (stop_after_steps); resume with --resume", flush=True)
        self.logger.close()
        return {"interrupted": True, "step": self.state.step}

    def _finish(self, train_seconds: float, first_step: int, first_epoch: int, throughput: dict) -> dict:
        """Final evaluation (with the baseline), final checkpoint and summary. ``train_seconds``: wall time of this
        run's training loop, periodic evaluations and checkpoints included; ``throughput``: the mean over the
        training steps (LogWindow.run_throughput), kept in the summary as train_<key>."""
        t = self.args.trainer
        final = self.evaluate(with_baseline=t.compute_baseline)
        final["train_seconds"] = round(train_seconds, 3)
        final.update({f"train_{k}": v for k, v in throughput.items()})
        memory = memory_report(self.ctx, self.model, self.parallel, self.model.encoder.config, self.max_step_tokens,
                               dtype_bytes=4 if self.precision.dtype is None else 2)
        final.update({f"memory_{k}": v for k, v in memory.items()})
        if self.profile_breakdown is not None:
            final["profile_breakdown"] = self.profile_breakdown
        epochs = self.state.epoch - first_epoch
        if self.ctx.is_main:
            per_epoch = f", {train_seconds / epochs:.2f} s per epoch" if epochs > 0 else ""
            print(f"[hstu] trained {self.state.step - first_step} steps ({epochs} epochs) in {train_seconds:.1f} s"
                  f"{per_epoch} (periodic evaluation and checkpoints included)", flush=True)
            if throughput:
                warmup = f" after {t.throughput_warmup_steps} warm-up steps" if t.throughput_warmup_steps else ""
                rate = f"[hstu] training steps{warmup}: {throughput['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU"
                if "tflops" in throughput:
                    rate += f", {throughput['tflops']:.1f} model TFLOP/s per GPU"
                if "mfu" in throughput:
                    rate += f", MFU {100 * throughput['mfu']:.1f}%"
                print(rate, flush=True)
            print(format_memory(memory), flush=True)
            if self.profile_breakdown is not None:
                print(format_breakdown(self.profile_breakdown), flush=True)
        if t.save_final_checkpoint:
            self._save()
        self._report(final, None, final_summary=True)
        self.logger.close()
        return final

    def _report(self, record: dict, progress, final_summary: bool = False) -> None:
        if not self.ctx.is_main:
            return
        keys = [k for k in record if k not in ("step", "epoch", "num_samples", "eval_seconds")
                and not k.startswith(("baseline/", "train_", "memory_"))]
        text = " ".join(f"{k}={record[k]:.4f}" for k in keys if isinstance(record[k], float))
        line = f"[eval] step {record['step']} epoch {record['epoch']}: {text}"
        if progress is not None:
            progress.write(line)
        else:
            print(line, flush=True)
        if final_summary:
            print(format_summary(record, self.task.headline_metrics or tuple(keys[:2])), flush=True)
            write_json_atomic(os.path.join(self.args.trainer.run_dir, "summary.json"), record)
            print(f"[hstu] run directory: {os.path.abspath(self.args.trainer.run_dir)} "
                  "(metrics.jsonl, train_log.jsonl, training_curves.png, tensorboard/, checkpoints/)", flush=True)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.ctx is not None:
            teardown(self.ctx)
            self.ctx = None


def _metric_cell(value) -> str:
    """A summary table cell: undefined metrics (left out of the record, or None) print as n/a, not as a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:>12.4f}"
    return f"{'n/a':>12}"


def format_summary(record: dict, metrics: tuple[str, ...]) -> str:
    lines = [f"final evaluation (step {record['step']}, epoch {record['epoch']}):"]
    header = f"  {'model':<12}" + "".join(f"{m:>12}" for m in metrics)
    lines.append(header)
    lines.append(f"  {'HSTU':<12}" + "".join(_metric_cell(record.get(m)) for m in metrics))
    if any(f"baseline/popularity/{m}" in record for m in metrics):
        lines.append(f"  {'popularity':<12}" + "".join(
            _metric_cell(record.get(f"baseline/popularity/{m}")) for m in metrics))
    return "\n".join(lines)


def run(task_name: str, args: AllArgs, resume: bool = False, fresh: bool = False) -> dict:
    trainer = Trainer(task_name, args, resume=resume, fresh=fresh)
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = ["Trainer", "TrainState", "lr_multiplier", "run", "seed_everything"]

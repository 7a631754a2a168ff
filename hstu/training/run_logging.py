"""Run-directory outputs (rank 0 only): metrics.jsonl, train_log.jsonl, TensorBoard events, a PNG plot."""

from __future__ import annotations

import json
import math
import os
from typing import Optional

METRICS_FILE = "metrics.jsonl"  # one JSON object per evaluation
TRAIN_LOG_FILE = "train_log.jsonl"  # one JSON object per training step (loss, lr)
PLOT_FILE = "training_curves.png"


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.run_dir, self.enabled = run_dir, enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        for name in (METRICS_FILE, TRAIN_LOG_FILE):
            path = os.path.join(run_dir, name)
            if resume_step is None:
                open(path, "w").close()
            else:
                # Drop what an interrupted run logged after its last checkpoint: it is replayed now.
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
                with open(path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step)

    def _append(self, name: str, records: list[dict]) -> None:
        with open(os.path.join(self.run_dir, name), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def log_train(self, records: list[dict]) -> None:
        if not self.enabled or not records:
            return
        self._append(TRAIN_LOG_FILE, records)
        if self.writer is not None:
            for r in records:
                for key, value in r.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.writer.add_scalar(f"train/{key}", value, r["step"])

    def log_eval(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(METRICS_FILE, [record])
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"eval/{key}", value, record["step"])
            self.writer.flush()

    def plot(self) -> Optional[str]:
        if not self.enabled:
            return None
        return plot_run(self.run_dir)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_run(run_dir: str) -> Optional[str]:
    """Loss (smoothed) on the left, every evaluation metric on the right; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = read_jsonl(os.path.join(run_dir, TRAIN_LOG_FILE))
    evals = read_jsonl(os.path.join(run_dir, METRICS_FILE))
    if not train and not evals:
        return None
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax_loss.plot(steps, losses, alpha=0.3, color="tab:blue", label="loss")
        window = max(1, len(losses) // 50)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax_loss.plot(steps, smooth, color="tab:blue", label=f"loss (mean of {window})")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
    if evals:
        skip = ("step", "epoch", "num_samples", "eval_loss", "eval_seconds")
        keys = [k for k in evals[-1] if k not in skip and isinstance(evals[-1][k], (int, float))
                and not k.startswith("baseline/")]
        for key in keys:
            points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if not points:
                continue
            (line,) = ax_metric.plot(*zip(*points), marker="o", label=key)
            baseline = evals[-1].get(f"baseline/popularity/{key}")
            if isinstance(baseline, (int, float)) and ("@10" in key or key.startswith("AUC/")):
                ax_metric.axhline(baseline, linestyle="--", color=line.get_color(), alpha=0.6,
                                  label=f"{key} popularity")
        ax_metric.set_xlabel("step")
        ax_metric.set_ylabel("evaluation metric")
        ax_metric.legend(fontsize=8)
        ax_metric.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(run_dir, PLOT_FILE)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Run-directory outputs (rank 0 only): metrics.jsonl, train_log.jsonl, TensorBoard events, a PNG plot; and the
rules for reusing a run directory (see docs/training.md, "Run directory").

A run directory that holds any output of an earlier run (:data:`RUN_OUTPUTS`) is continued only with ``--resume``
or moved aside with ``--fresh`` (renamed to ``<run_dir>.old-<UTC time>``); nothing in it is ever deleted.
Rewrites of existing files go through a temporary name, fsync and rename.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Optional

METRICS_FILE = "metrics.jsonl"  # one JSON object per evaluation
TRAIN_LOG_FILE = "train_log.jsonl"  # one JSON object per training step (loss, lr)
PLOT_FILE = "training_curves.png"
# What a run writes into its directory: the presence of any of them marks an earlier run.
RUN_OUTPUTS = ("checkpoints", METRICS_FILE, TRAIN_LOG_FILE, "summary.json", "config.json", "tensorboard", PLOT_FILE,
               "profile.txt", "profile_trace.json")


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def fsync_directory(path: str) -> None:
    """Persist the entries of ``path`` (renames, new files) where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the files themselves are synced
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``path`` through a temporary sibling: fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(path) or ".")


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file ([] when absent). A last line cut short by a killed writer (no final
    newline, not valid JSON) is dropped; any other bad line raises a ValueError naming the file and line."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # the unterminated tail of an interrupted append
                break
            raise ValueError(f"{path}, line {number}: not a JSON record ({err})") from None
    return records


def free_sibling_name(base: str) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first name that does not exist yet."""
    target, n = base, 1
    while os.path.lexists(target):
        n += 1
        target = f"{base}-{n}"
    return target


def earlier_run_outputs(run_dir: str) -> list[str]:
    """The outputs of an earlier run that ``run_dir`` holds (names from :data:`RUN_OUTPUTS`)."""
    if not os.path.isdir(run_dir):
        return []
    present = set(os.listdir(run_dir))
    return [name for name in RUN_OUTPUTS if name in present]


def written_by_a_run(run_dir: str) -> bool:
    """Whether ``run_dir`` carries the mark the trainer leaves: a ``config.json`` object naming the task, or a
    ``checkpoints/latest`` pointer. Generic names alone (a ``config.json`` of something else) do not count."""
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        return True
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and isinstance(config.get("task"), str)


def move_run_aside(run_dir: str, keep_clear_of: tuple[str, ...] = ()) -> str:
    """Rename ``run_dir`` to a free ``<run_dir>.old-<UTC time>[-n]`` sibling and return the new path.

    Refuses (ValueError) when ``run_dir`` is the working directory, the home directory or one of their ancestors,
    contains one of the ``keep_clear_of`` paths (e.g. the dataset), or does not carry the trainer's mark
    (:func:`written_by_a_run`): only a directory an earlier run wrote is moved.
    """
    real = os.path.realpath(run_dir)
    for other, what in ([(os.getcwd(), "the working directory"), (os.path.expanduser("~"), "the home directory")]
                        + [(p, p) for p in keep_clear_of]):
        other_real = os.path.realpath(other)
        if os.path.commonpath([real, other_real]) == real:
            raise ValueError(f"--fresh: the run directory {run_dir} contains {what}; it cannot be moved aside: "
                             "choose another --run-dir")
    if not written_by_a_run(run_dir):
        raise ValueError(f"--fresh: {run_dir} holds {', '.join(earlier_run_outputs(run_dir)) or 'files'} but no "
                         "config.json or checkpoints/latest written by an hstu run, so it is not moved aside: choose "
                         "another --run-dir, or move its contents yourself")
    path = os.path.abspath(run_dir).rstrip(os.sep)
    target = free_sibling_name(f"{path}.old-{utc_stamp()}")
    os.rename(path, target)
    fsync_directory(os.path.dirname(path))
    return target


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
                # Drop what an interrupted run logged after the step it resumes from: it is replayed now.
                kept = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step]
                write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
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
            self.writer = None


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

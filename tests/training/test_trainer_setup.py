"""Trainer set-up order and the final summary's treatment of undefined metrics."""

import contextlib
import io
import os

import pytest

from hstu.training.cli import main
from hstu.training.trainer import format_summary
from tests.launching import ROOT, write_tiny_datasets


def test_summary_prints_undefined_metrics_as_na():
    record = {"step": 3, "epoch": 1, "AUC/like": 0.75, "baseline/popularity/AUC/like": 0.5,
              "baseline/popularity/AUC/hate": None}
    text = format_summary(record, ("AUC/like", "AUC/hate"))
    hstu_row, baseline_row = text.splitlines()[2:4]
    assert hstu_row.split()[1:] == ["0.7500", "n/a"]
    assert baseline_row.split()[1:] == ["0.5000", "n/a"]


def test_config_mismatch_is_refused_before_fresh_moves_the_run_aside(tmp_path):
    """A ranking config that does not fit the data stops before --fresh touches the existing run directory."""
    data = write_tiny_datasets(tmp_path / "data", num_users=40, num_items=30, num_topics=2, mean_length=8,
                               min_length=4, max_length=12, seed=1)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    argv = ["--gin-config-file", os.path.join(ROOT, "configs", "synthetic_ranking.gin"), "--run-dir", str(run_dir),
            "--fresh", "--gin-param", f"DatasetArgs.dataset_dir='{data / 'rating'}'",
            "--gin-param", "RankingArgs.task_type='bitmask'"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main("ranking", argv)
    assert status == 1
    assert "task_type" in err.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # nothing moved aside
    assert (run_dir / "train_log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'

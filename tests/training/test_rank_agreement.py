"""Two-rank runs (CPU, gloo) where a write fails on one rank only: the set-up writes of rank 0 (config.json, the
synthetic dataset) and a checkpoint file of rank 1. Every rank must stop promptly with an ``error:`` line naming the
cause (none left waiting in a collective), and a failed checkpoint leaves the previous one the newest that verifies.

The faults are injected by ``faulty_run.py`` (the training command line with one write patched on one rank).
"""

import os
import re
import subprocess

import pytest

from hstu.training import checkpoint as ckpt
from tests.launching import ROOT, launch_env, torchrun_command, write_tiny_datasets
from tests.training.test_fault_injection import kill_9

FAULTY_RUN = os.path.join(ROOT, "tests", "training", "faulty_run.py")
TIMEOUT = 120  # seconds for a launch of 2 ranks that stops at set-up or after a few steps (~15 s on 2 idle cores)
TINY_DATA = dict(num_users=64, num_items=80, num_topics=2, mean_length=12, min_length=6, max_length=20, seed=5)
PARAMS = ["TrainerArgs.progress_bar=False", "TrainerArgs.log_interval_steps=1", "TrainerArgs.tensorboard=False",
          "TrainerArgs.plot=False", "TrainerArgs.num_threads=1", "TrainerArgs.eval_every_epochs=0",
          "TrainerArgs.eval_max_batches=1", "TrainerArgs.compute_baseline=False", "DatasetArgs.max_seqlen=8",
          "DatasetArgs.batch_size=4", "DatasetArgs.eval_batch_size=16", "NetworkArgs.hidden_dim=8",
          "NetworkArgs.qk_dim=8", "NetworkArgs.v_dim=8", "NetworkArgs.num_layers=1", "RetrievalArgs.num_negatives=8",
          "DatasetArgs.synthetic_options={'num_users': 64, 'num_items': 80, 'num_topics': 2, 'mean_length': 12}"]
ERROR_LINE = re.compile(r"^error(?: \(rank (\d+)\))?: (.*)$", re.M)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_datasets(tmp_path_factory.mktemp("data"), **TINY_DATA)


def run_with_fault(fault, faulty_rank, run_dir, dataset_dir, extra=()):
    """Retrieval on 2 ranks with ``fault`` injected on ``faulty_rank``: (exit status, {rank: its error line})."""
    argv = ["--gin-config-file", os.path.join(ROOT, "configs", "synthetic_retrieval.gin"), "--run-dir", str(run_dir)]
    for p in [f"DatasetArgs.dataset_dir='{dataset_dir}'", *PARAMS, *extra]:
        argv += ["--gin-param", p]
    proc = subprocess.Popen(torchrun_command(2, FAULTY_RUN, "retrieval", fault, str(faulty_rank), *argv), cwd=ROOT,
                            env=launch_env(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_9(proc)
        _, err = proc.communicate()
        pytest.fail(f"the ranks did not stop within {TIMEOUT} s (a rank waits for the failed one):\n{err[-3000:]}")
    # A rank's traceback would name the package's files (torchrun's own summary names only torch's).
    assert not re.search(r'File ".*/hstu/', err), err[-5000:]
    return proc.returncode, {int(rank or 0): message for rank, message in ERROR_LINE.findall(err)}, err


def test_config_json_write_failing_on_rank_0_stops_both_ranks(tiny_data, tmp_path):
    status, errors, err = run_with_fault("config_json", 0, tmp_path / "run", tiny_data / "rating")
    assert status != 0
    assert set(errors) == {0, 1}, err[-5000:]
    assert "No space left on device" in errors[0] and "config.json" in errors[0], errors
    assert "rank 0" in errors[1] and "No space left on device" in errors[1] and "config.json" in errors[1], errors
    assert not (tmp_path / "run" / "config.json").exists()


def test_synthetic_dataset_write_failing_on_rank_0_stops_both_ranks(tmp_path):
    dataset_dir = tmp_path / "synthetic"
    status, errors, err = run_with_fault("synthetic", 0, tmp_path / "run", dataset_dir)
    assert status != 0
    assert set(errors) == {0, 1}, err[-5000:]
    assert "Permission denied" in errors[0] and str(dataset_dir) in errors[0], errors
    assert "rank 0" in errors[1] and "Permission denied" in errors[1] and str(dataset_dir) in errors[1], errors
    assert not dataset_dir.exists()


def test_checkpoint_write_failing_on_rank_1_only_stops_both_and_keeps_the_previous_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    status, errors, err = run_with_fault("rank_file:6", 1, run_dir, tiny_data / "rating",
                                         ["TrainerArgs.checkpoint_interval_steps=3"])
    assert status != 0
    assert set(errors) == {0, 1}, err[-5000:]
    assert "No space left on device" in errors[1] and "rank1.pt" in errors[1], errors
    assert "rank 1" in errors[0] and "No space left on device" in errors[0] and "rank1.pt" in errors[0], errors
    assert all("untouched" in message for message in errors.values()), errors
    with open(run_dir / "train_log.jsonl") as f:
        assert f.read().count("\n") == 6  # the save of step 6 failed, not an earlier one
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert names == ["latest", "step_00000003"], names  # the failed save's partial directory was removed
    path, manifest, notes = ckpt.choose_checkpoint(str(run_dir))
    assert path == str(run_dir / "checkpoints" / "step_00000003") and manifest["step"] == 3 and not notes

"""Fault injection on training runs (CPU): kill -9 at a random step, damaged checkpoints, a full disk during a save,
reused run directories, resume on another world size or sharding.

Every scenario ends with a check against an uninterrupted run (losses bit for bit, same final metrics) or with a
named error and an unchanged run directory. One-rank runs other than the killed one run inside the test process
(``hstu.training.cli.main``: a private world of 1), which saves the ~8 s start of a launched process per run.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import stat
import time

import numpy as np
import pytest
import torch

from hstu.training import checkpoint as ckpt
from hstu.training.cli import main
from tests.launching import ROOT, run_training_script, start_training_script, write_tiny_datasets

TINY_DATA = dict(num_users=200, num_items=150, num_topics=4, mean_length=20, min_length=8, max_length=40, seed=5)
COMMON = ["TrainerArgs.progress_bar=False", "TrainerArgs.log_interval_steps=1", "TrainerArgs.tensorboard=False",
          "TrainerArgs.plot=False", "TrainerArgs.num_threads=1", "TrainerArgs.deterministic=True",
          "TrainerArgs.eval_max_batches=1", "TrainerArgs.compute_baseline=False", "DatasetArgs.max_seqlen=16",
          "DatasetArgs.eval_batch_size=64", "NetworkArgs.hidden_dim=16", "NetworkArgs.qk_dim=8", "NetworkArgs.v_dim=8",
          "NetworkArgs.num_layers=1", "NetworkArgs.dropout=0.3"]
# 1 rank, retrieval: 13 steps an epoch, 40 steps (3 epoch ends), a checkpoint every 4 steps, the last 3 kept.
RETRIEVAL = ("retrieval", "synthetic_retrieval.gin", "rating", COMMON + [
    "DatasetArgs.batch_size=16", "TrainerArgs.max_epochs=4", "TrainerArgs.max_steps=40",
    "TrainerArgs.checkpoint_interval_steps=4", "TrainerArgs.keep_last_checkpoints=3", "RetrievalArgs.num_negatives=16"])
# 2 ranks (DP=2, item table row-wise), ranking: 8 samples per rank, 16 steps, a checkpoint every 3 steps.
RANKING_DP2 = ("ranking", "synthetic_ranking_dp2_sharded.gin", "bitmask", COMMON + [
    "DatasetArgs.batch_size=8", "DatasetArgs.num_candidates=3", "TrainerArgs.max_epochs=2", "TrainerArgs.max_steps=16",
    "TrainerArgs.checkpoint_interval_steps=3", "RankingArgs.head_hidden_dims=(16,)"])


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_datasets(tmp_path_factory.mktemp("data"), **TINY_DATA)


@pytest.fixture(autouse=True)
def _restore_process_state():
    """In-process runs set torch's thread count, deterministic mode and the global RNGs: put them back."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    states = (random.getstate(), np.random.get_state())
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    random.setstate(states[0])
    np.random.set_state(states[1])


def params_of(setup, data, extra=()):
    task, config, kind, params = setup
    return [f"DatasetArgs.dataset_dir='{data / kind}'", *params, *extra]


def train_here(setup, data, run_dir, *flags, extra=()):
    """The training CLI in this process: (exit status, stdout, stderr)."""
    task, config, _, _ = setup
    argv = ["--gin-config-file", os.path.join(ROOT, "configs", config), "--run-dir", str(run_dir), *flags]
    for p in params_of(setup, data, extra):
        argv += ["--gin-param", p]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(task, argv)
    return status, out.getvalue(), err.getvalue()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(run_dir, "train_log.jsonl"))]


def final_metrics(run_dir):
    record = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))[-1]
    return {k: v for k, v in record.items() if k != "eval_seconds"}


def assert_same_run(run_dir, reference):
    assert losses(run_dir) == losses(reference)
    assert final_metrics(run_dir) == final_metrics(reference)


def tree(path):
    """{relative path: sha256} of every file under ``path``: compared before and after to prove nothing changed."""
    found = {}
    for parent, _, files in os.walk(path):
        for name in files:
            full = os.path.join(parent, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return found


def step_dir(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def flip_a_bit(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(bytes(data))


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The uninterrupted 1-rank run (checkpoints 32, 36, 40 kept)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir)
    assert status == 0, out[-2000:] + err[-3000:]
    assert sorted(n for n in os.listdir(run_dir / "checkpoints") if n.startswith("step_")) == \
        ["step_00000032", "step_00000036", "step_00000040"]
    return run_dir


def copy_run(reference, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(reference, target)
    return target


def process_tree(pid):
    """``pid`` and all its descendants (torchrun starts its ranks in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_9(proc):
    """SIGKILL the launcher and every rank; returns once all of them are dead."""
    pids = process_tree(proc.pid)
    assert len(pids) > 1, "the launcher has no rank process"
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(gone(pid) for pid in pids)
    return len(pids)


def kill_9_at_step(proc, run_dir, step, timeout=300):
    """kill -9 every process of the run once ``train_log.jsonl`` shows ``step``; returns the last step logged."""
    log = os.path.join(run_dir, "train_log.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(log):
            with open(log) as f:
                logged = f.read().count("\n")
            if logged >= step:
                kill_9(proc)
                return logged
        time.sleep(0.005)
    output = open(f"{run_dir}.out").read()
    if proc.poll() is None:
        kill_9(proc)
    pytest.fail(f"the run ended or stalled before step {step} (status {proc.returncode}):\n{output[-3000:]}")


# ---- kill -9 -------------------------------------------------------------------------------------------------------
def test_kill_9_one_rank_at_a_random_step_then_resume_matches_uninterrupted(tiny_data, reference, tmp_path):
    run_dir = tmp_path / "killed"
    step = random.Random(2024).randint(5, 30)
    proc = start_training_script(1, "pretrain_gr_retrieval.py", RETRIEVAL[1], run_dir, params_of(RETRIEVAL, tiny_data),
                                 OMP_NUM_THREADS="1")
    logged = kill_9_at_step(proc, run_dir, step)
    assert logged < 40 and not (run_dir / "summary.json").exists()
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir, "--resume")
    assert status == 0, out[-2000:] + err[-3000:]
    assert "[hstu] resumed from" in out
    assert_same_run(run_dir, reference)


def test_kill_9_two_ranks_at_a_random_step_then_resume_matches_uninterrupted(tiny_data, tmp_path):
    task, config, _, _ = RANKING_DP2
    script, params = f"pretrain_gr_{task}.py", params_of(RANKING_DP2, tiny_data)
    env = dict(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_training_script(2, script, config, full, params, timeout=300, **env)
    step = random.Random(7).randint(4, 11)
    logged = kill_9_at_step(start_training_script(2, script, config, killed, params, **env), killed, step)
    assert logged < 16 and not (killed / "summary.json").exists()
    before = tree(killed)
    # Another world size is refused by name, before anything changes.
    status, _, err = train_here(RANKING_DP2, tiny_data, killed, "--resume")
    assert status == 1 and "world size 2 (tp 1, dp 2)" in err and "world size 1 (tp 1, dp 1)" in err, err
    assert tree(killed) == before
    out = run_training_script(2, script, config, killed, params, resume=True, timeout=300, **env)
    assert "[hstu] resumed from" in out
    assert len(losses(full)) == 16
    assert_same_run(killed, full)


# ---- damaged checkpoints --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flipped,truncated", [("sparse/__0_0.distcp", "rank0.pt"), ("dense_tp0.pt", "manifest.json")])
def test_damaged_newest_checkpoints_fall_back_to_the_previous_one(tiny_data, reference, tmp_path, flipped, truncated):
    run_dir = copy_run(reference, tmp_path)
    flip_a_bit(os.path.join(step_dir(run_dir, 40), flipped))
    truncate(os.path.join(step_dir(run_dir, 36), truncated))
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir, "--resume")
    assert status == 0, out[-2000:] + err[-3000:]
    assert f"skipped {step_dir(run_dir, 40)}" in out and f"skipped {step_dir(run_dir, 36)}" in out
    assert f"resumed from {step_dir(run_dir, 32)} at step 32" in out
    assert_same_run(run_dir, reference)
    # The damaged checkpoints were not deleted: rewritten steps moved them aside.
    assert len([n for n in os.listdir(run_dir / "checkpoints") if ".invalid-" in n]) == 2


def test_latest_naming_a_missing_step_falls_back_and_deletes_nothing(tiny_data, reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    shutil.move(step_dir(run_dir, 40), tmp_path / "elsewhere")
    kept = tree(step_dir(run_dir, 32))
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir, "--resume")
    assert status == 0, out[-2000:] + err[-3000:]
    assert "names step_00000040, which does not exist" in out
    assert f"resumed from {step_dir(run_dir, 36)} at step 36" in out
    assert_same_run(run_dir, reference)
    assert tree(step_dir(run_dir, 32)) == kept  # keep_last=3: 32, 36, 40 again


def test_resume_when_no_checkpoint_verifies_stops_and_changes_nothing(tiny_data, reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    truncate(os.path.join(step_dir(run_dir, 40), "sparse", "__0_0.distcp"))
    flip_a_bit(os.path.join(step_dir(run_dir, 36), "rank0.pt"))
    truncate(os.path.join(step_dir(run_dir, 32), "meta.pt"))
    before = tree(run_dir)
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir, "--resume")
    assert status == 1 and "Traceback" not in err
    assert "error: --resume: no checkpoint in" in err and "verifies" in err and "--fresh" in err, err
    for step in (40, 36, 32):
        assert f"step_{step:08d}" in err
    assert tree(run_dir) == before


def test_truncated_file_loaded_directly_raises_a_named_error(tiny_data, reference, tmp_path):
    from hstu.distributed import load_checkpoint as load_parallel
    from hstu.training.config import parse_gin
    from hstu.training.trainer import Trainer

    damaged = tmp_path / "step_00000040"
    shutil.copytree(step_dir(reference, 40), damaged)
    truncate(damaged / "rank0.pt")
    args = parse_gin([os.path.join(ROOT, "configs", RETRIEVAL[1])],
                     params_of(RETRIEVAL, tiny_data, [f"TrainerArgs.run_dir='{tmp_path / 'run'}'"]))
    trainer = Trainer("retrieval", args)
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"rank0\.pt: unreadable checkpoint file"):
            load_parallel(str(damaged), trainer.parallel)
        with pytest.raises(ckpt.CheckpointError, match=r"rank0\.pt: \d+ bytes, the manifest says \d+"):
            ckpt.load_checkpoint(str(damaged), trainer.parallel)
    finally:
        trainer.close()


# ---- full disk ------------------------------------------------------------------------------------------------------
# File fsyncs of the save at step 8 (1 rank): 1 DCP data file, 2 DCP .metadata, 3 dense_tp0.pt, 4 rank0.pt,
# 5 meta.pt, 6 manifest.json, 7 latest (after the step directory is in place).
@pytest.mark.parametrize("failing_write", [1, 4, 6, 7])
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tiny_data, reference, tmp_path, monkeypatch,
                                                               failing_write):
    run_dir = tmp_path / "run"
    real_fsync, real_save = os.fsync, ckpt.save_checkpoint
    writes = []

    def fsync_until_full(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            writes.append(fd)
            if len(writes) == failing_write:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    def save_with_full_disk(run_dir_, step, *args, **kwargs):
        if step != 8:
            return real_save(run_dir_, step, *args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", fsync_until_full)
            return real_save(run_dir_, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_with_full_disk)
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir)
    assert status == 1 and "Traceback" not in err, err
    assert "error: [Errno 28]" in err and "No space left on device" in err and "untouched" in err, err
    monkeypatch.undo()
    names = os.listdir(run_dir / "checkpoints")
    assert not [n for n in names if n.startswith(".")], names  # the partial directory was removed
    ckpt.verify_checkpoint(step_dir(run_dir, 4))
    # A failure in the last write (``latest``) comes after the step directory is complete: it is valid then.
    newest = 8 if failing_write == 7 else 4
    assert ckpt.choose_checkpoint(str(run_dir))[0] == step_dir(run_dir, newest)
    # Rotation deletes only what a manifest of ours lists: a note added to step 4 and a directory without a
    # manifest survive it.
    (run_dir / "checkpoints" / "step_00000004" / "note.txt").write_text("mine")
    os.makedirs(step_dir(run_dir, 2))
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir, "--resume")
    assert status == 0, out[-2000:] + err[-3000:]
    assert f"resumed from {step_dir(run_dir, newest)} at step {newest}" in out
    assert_same_run(run_dir, reference)
    assert sorted(os.listdir(run_dir / "checkpoints")) == [
        "latest", "step_00000002", "step_00000004", "step_00000032", "step_00000036", "step_00000040"]
    assert os.listdir(step_dir(run_dir, 4)) == ["note.txt"]


def test_kill_between_the_renames_of_a_resave_keeps_that_step(tiny_data, reference, tmp_path):
    """A re-save of step 40 killed after it moved the old copy aside (.step_N.replaced) and before the new one's
    rename: resume takes the moved copy, and the next save of that step puts step_N back and removes it."""
    run_dir = copy_run(reference, tmp_path)
    root = run_dir / "checkpoints"
    shutil.copytree(step_dir(run_dir, 40), root / ".step_00000040.partial")  # the complete, unrenamed new copy
    os.rename(step_dir(run_dir, 40), root / ".step_00000040.replaced")
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir, "--resume")
    assert status == 0, out[-2000:] + err[-3000:]
    assert f"resumed from {root / '.step_00000040.replaced'} at step 40" in out
    assert_same_run(run_dir, reference)
    assert sorted(n for n in os.listdir(root) if "step_" in n) == ["step_00000032", "step_00000036", "step_00000040"]
    ckpt.verify_checkpoint(step_dir(run_dir, 40))


# ---- run directories and sharding ----------------------------------------------------------------------------------
def test_second_run_into_a_used_run_dir_is_refused_and_fresh_moves_it_aside(tiny_data, reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before = tree(run_dir)
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir)
    assert status == 1 and "Traceback" not in err
    assert f"error: run directory {run_dir} holds an earlier run" in err and "--resume" in err and "--fresh" in err
    assert tree(run_dir) == before
    status, out, err = train_here(RETRIEVAL, tiny_data, run_dir, "--fresh")
    assert status == 0, out[-2000:] + err[-3000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and tree(moved[0]) == before
    assert_same_run(run_dir, reference)


def test_resume_without_any_checkpoint_starts_from_scratch(tiny_data, reference, tmp_path):
    status, out, err = train_here(RETRIEVAL, tiny_data, tmp_path / "new", "--resume")
    assert status == 0, out[-2000:] + err[-3000:]
    assert "no checkpoint in" in out and "starting from scratch" in out
    assert_same_run(tmp_path / "new", reference)


def test_resume_with_another_sharding_plan_is_refused_by_name(tiny_data, reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before = tree(run_dir)
    status, _, err = train_here(RETRIEVAL, tiny_data, run_dir, "--resume", extra=[
        "ParallelismArgs.shard_single_process=True", "ParallelismArgs.sparse_optimizer='rowwise_adagrad'",
        "ParallelismArgs.embedding_sharding={'item': 'row_wise'}"])
    assert status == 1 and "Traceback" not in err
    assert "another table sharding plan" in err and "'item': replicated in the checkpoint, row_wise in this run" in err
    assert tree(run_dir) == before


def test_debug_switch_shows_the_traceback(tiny_data, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HSTU_DEBUG", "1")
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        train_here(RETRIEVAL, tiny_data, copy_run(reference, tmp_path))


def test_fresh_refuses_to_move_the_working_directory(tmp_path, monkeypatch):
    from hstu.training.run_logging import move_run_aside

    (tmp_path / "train_log.jsonl").write_text("")
    (tmp_path / "config.json").write_text('{"task": "retrieval"}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="contains the working directory"):
        move_run_aside(".")
    with pytest.raises(ValueError, match="contains the working directory"):
        move_run_aside(str(tmp_path.parent))
    assert (tmp_path / "train_log.jsonl").exists()


def test_fresh_moves_only_a_directory_a_run_wrote(tmp_path, monkeypatch):
    """Generic output names alone (e.g. a home directory with a config.json) are no run: --fresh leaves it."""
    from hstu.training.run_logging import move_run_aside

    home = tmp_path / "home"
    (home / "projects").mkdir(parents=True)
    (home / "config.json").write_text('{"editor": "vim"}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="not moved aside"):
        move_run_aside(str(home))
    monkeypatch.setenv("HOME", str(home / "projects"))  # a run dir above the home directory
    (home / "config.json").write_text('{"task": "retrieval"}')
    with pytest.raises(ValueError, match="contains the home directory"):
        move_run_aside(str(home))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_config_error_prints_one_line_without_traceback(capsys):
    status = main("retrieval", ["--gin-config-file", os.path.join(ROOT, "configs", RETRIEVAL[1]),
                                "--gin-param", "TrainerArgs.max_epoch=3"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: ") and "max_epoch" in err and "Traceback" not in err, err

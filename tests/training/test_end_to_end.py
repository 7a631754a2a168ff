"""Tiny retrieval and ranking trainings through ``torchrun --nproc_per_node 1``, and exact resume."""

import json
import os
import subprocess
import sys

import pytest

from hstu.training.checkpoint import verify_checkpoint
from tests.launching import free_port, launch_env, run_training_script, write_tiny_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

TINY_DATA = dict(num_users=600, num_items=300, num_topics=6, mean_length=40, min_length=12, max_length=120, seed=3)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_datasets(tmp_path_factory.mktemp("data"), **TINY_DATA)


def torchrun(script, config, run_dir, params, resume=False):
    return run_training_script(1, script, config, run_dir, params, resume, OMP_NUM_THREADS="2")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


COMMON = ["TrainerArgs.progress_bar=False", "TrainerArgs.log_interval_steps=1", "DatasetArgs.batch_size=32",
          "DatasetArgs.eval_batch_size=128", "TrainerArgs.num_threads=2"]


def assert_loss_falls(run_dir):
    losses = [r["loss"] for r in read_jsonl(os.path.join(run_dir, "train_log.jsonl"))]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def assert_run_outputs(run_dir):
    for name in ("metrics.jsonl", "train_log.jsonl", "training_curves.png", "summary.json", "config.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(run_dir, "tensorboard")))
    latest = os.path.join(run_dir, "checkpoints", (run_dir / "checkpoints" / "latest").read_text().strip())
    assert verify_checkpoint(latest)["step"] == json.loads((run_dir / "summary.json").read_text())["step"]


def test_tiny_retrieval_beats_popularity(tiny_data, tmp_path):
    run_dir = tmp_path / "retrieval"
    out = torchrun("pretrain_gr_retrieval.py", "synthetic_retrieval.gin", run_dir, COMMON + [
        f"DatasetArgs.dataset_dir='{tiny_data / 'rating'}'", "DatasetArgs.max_seqlen=30", "TrainerArgs.max_epochs=5",
        "TrainerArgs.eval_every_epochs=3", "NetworkArgs.hidden_dim=32", "NetworkArgs.qk_dim=32",
        "NetworkArgs.v_dim=32", "RetrievalArgs.num_negatives=64",
    ])
    assert "popularity" in out and "HR@10" in out
    assert "trained" in out and "(5 epochs)" in out and "s per epoch" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_seconds"] > 0 and summary["train_tokens_per_s_per_gpu"] > 0
    assert "tokens/s per GPU" in out
    assert_run_outputs(run_dir)
    assert_loss_falls(run_dir)
    evals = read_jsonl(run_dir / "metrics.jsonl")
    assert len(evals) == 2 and {"step", "epoch", "HR@10", "NDCG@10", "MRR"} <= set(evals[-1])
    final = evals[-1]
    assert final["HR@10"] > final["baseline/popularity/HR@10"] + 0.05, final
    assert final["NDCG@10"] > final["baseline/popularity/NDCG@10"], final


def test_tiny_ranking_beats_popularity(tiny_data, tmp_path):
    run_dir = tmp_path / "ranking"
    torchrun("pretrain_gr_ranking.py", "synthetic_ranking.gin", run_dir, COMMON + [
        f"DatasetArgs.dataset_dir='{tiny_data / 'bitmask'}'", "DatasetArgs.max_seqlen=30", "DatasetArgs.num_candidates=5",
        "TrainerArgs.max_epochs=8", "TrainerArgs.eval_every_epochs=0", "NetworkArgs.contextual_features=['activity_level']",
    ])
    assert_run_outputs(run_dir)
    assert_loss_falls(run_dir)
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert {"AUC/click", "GAUC/click", "AUC/long_view"} <= set(final)
    assert final["AUC/click"] > final["baseline/popularity/AUC/click"], final


@pytest.mark.parametrize("task", ["retrieval", "ranking"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_data, tmp_path, task):
    script = f"pretrain_gr_{task}.py"
    config = f"synthetic_{task}.gin"
    data = tiny_data / ("rating" if task == "retrieval" else "bitmask")
    params = COMMON + [
        f"DatasetArgs.dataset_dir='{data}'", "DatasetArgs.max_seqlen=20", "TrainerArgs.deterministic=True",
        "TrainerArgs.max_epochs=2", "TrainerArgs.max_steps=12", "TrainerArgs.eval_interval_steps=5",
        "TrainerArgs.eval_max_batches=1",
        "NetworkArgs.dropout=0.3",
    ]
    if task == "ranking":
        params.append("DatasetArgs.num_candidates=3")
    # 600 users / 32 per batch = 19 steps an epoch: stop after step 7 (past an evaluation, mid-epoch) and resume.
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(script, config, full, params)
    torchrun(script, config, part, params + ["TrainerArgs.stop_after_steps=7"])
    assert len(read_jsonl(part / "train_log.jsonl")) == 7
    torchrun(script, config, part, params, resume=True)
    expected = [(r["step"], r["loss"]) for r in read_jsonl(full / "train_log.jsonl")]
    resumed = [(r["step"], r["loss"]) for r in read_jsonl(part / "train_log.jsonl")]
    assert resumed == expected
    assert read_jsonl(full / "metrics.jsonl")[-1]["step"] == read_jsonl(part / "metrics.jsonl")[-1]["step"]


def test_rating_ranking_smoke(tiny_data, tmp_path):
    run_dir = tmp_path / "rating"
    torchrun("pretrain_gr_ranking.py", "ml1m_ranking.gin", run_dir, COMMON + [
        f"DatasetArgs.dataset_dir='{tiny_data / 'rating'}'", "DatasetArgs.max_seqlen=20", "DatasetArgs.num_candidates=3",
        "DatasetArgs.num_workers=0", "TrainerArgs.max_steps=6", "NetworkArgs.contextual_features=['activity_level']",
        "NetworkArgs.hidden_dim=16", "NetworkArgs.qk_dim=8", "NetworkArgs.v_dim=8", "TrainerArgs.eval_max_batches=2",
    ])
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert {"AUC/rating_positive", "GAUC/rating_positive", "eval_loss"} <= set(final)


@pytest.mark.parametrize("script,config,dataset", [("pretrain_gr_retrieval.py", "movielen_retrieval.gin", "ml-20m"),
                                                   ("pretrain_gr_ranking.py", "movielen_ranking.gin", "ml-20m")])
def test_seed_command_without_data_says_how_to_prepare_it(tmp_path, script, config, dataset):
    # The seed's exact launch command, from a directory without data/.
    cmd = [TORCHRUN, "--nproc_per_node", "1", "--master_addr", "localhost", "--master_port", str(free_port()),
           os.path.join(ROOT, "training", script), "--gin-config-file", os.path.join(ROOT, "configs", config)]
    result = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"python -m hstu.data prepare {dataset}" in result.stdout + result.stderr

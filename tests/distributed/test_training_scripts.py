"""Both training scripts under ``torchrun --nproc_per_node 2`` on CPU (gloo): DP=2 with TorchRec-sharded tables.

The gin files are the CI configs ``configs/synthetic_{retrieval,ranking}_dp2_sharded.gin`` (item table row-wise,
fused row-wise Adagrad); the ranking run also shards the action table column-wise and the contextual table
table-wise, so the three sharding types go through the real trainer. The exact resume of a 2-rank sharded run
(after kill -9 at a random step) is tested in tests/training/test_fault_injection.py. Tiny synthetic data and small
overrides keep the two launches short.
"""

import json
import os

import pytest

from hstu.training.checkpoint import verify_checkpoint
from tests.launching import run_training_script, write_tiny_datasets

TINY_DATA = dict(num_users=400, num_items=300, num_topics=6, mean_length=30, min_length=12, max_length=80, seed=3)
COMMON = ["TrainerArgs.progress_bar=False", "TrainerArgs.log_interval_steps=1", "TrainerArgs.tensorboard=False",
          "TrainerArgs.num_threads=1", "DatasetArgs.max_seqlen=20", "DatasetArgs.batch_size=16",
          "DatasetArgs.eval_batch_size=64", "DatasetArgs.balance_workload=True", "TrainerArgs.max_epochs=2",
          "TrainerArgs.eval_every_epochs=1", "TrainerArgs.save_final_checkpoint=True"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_datasets(tmp_path_factory.mktemp("data"), **TINY_DATA)


def torchrun2(script, config, run_dir, params, resume=False):
    return run_training_script(2, script, config, run_dir, params, resume, timeout=300, OMP_NUM_THREADS="1",
                               OMP_WAIT_POLICY="PASSIVE")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_run(run_dir, out, tables):
    # gloo on CPU (CI), nccl on the GPU machine.
    assert "rank 0/2 (gloo, cpu): tp 0/1, dp 0/2" in out or "rank 0/2 (nccl, cuda:0): tp 0/1, dp 0/2" in out
    for table, sharding in tables.items():
        assert any(line.split()[:1] == [table] and line.rstrip().endswith(f"-> {sharding}") for line in out.splitlines()), \
            (table, sharding, out[-2000:])
    logs = read_jsonl(os.path.join(run_dir, "train_log.jsonl"))
    losses = [r["loss"] for r in logs]
    assert len(losses) >= 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    evals = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert len(evals) == 2 and evals[-1]["step"] == logs[-1]["step"]
    checkpoint = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(checkpoint, "latest")) as f:
        latest = os.path.join(checkpoint, f.read().strip())
    assert {"meta.pt", "rank0.pt", "rank1.pt", "dense_tp0.pt", "sparse", "manifest.json"} <= set(os.listdir(latest))
    manifest = verify_checkpoint(latest)
    assert (manifest["world_size"], manifest["tp_size"], manifest["dp_size"]) == (2, 1, 2)
    assert {"rank0.pt", "rank1.pt", "sparse/.metadata"} <= set(manifest["files"])
    assert {table: entry["sharding"] for table, entry in manifest["sharding"].items()
            if table in tables} == tables
    return evals[-1]


def test_retrieval_script_two_ranks_sharded(tiny_data, tmp_path):
    run_dir = tmp_path / "retrieval"
    out = torchrun2("pretrain_gr_retrieval.py", "synthetic_retrieval_dp2_sharded.gin", run_dir, COMMON + [
        f"DatasetArgs.dataset_dir='{tiny_data / 'rating'}'", "NetworkArgs.hidden_dim=32", "NetworkArgs.qk_dim=32",
        "NetworkArgs.v_dim=32", "RetrievalArgs.num_negatives=32", "OptimizerArgs.warmup_steps=5",
    ])
    final = check_run(run_dir, out, {"item": "row_wise"})
    assert {"HR@10", "NDCG@10", "MRR", "baseline/popularity/HR@10"} <= set(final)
    assert final["num_samples"] == TINY_DATA["num_users"]  # the eval padding is not counted, nothing twice
    assert "popularity" in out and "HR@10" in out


def test_ranking_script_two_ranks_sharded(tiny_data, tmp_path):
    run_dir = tmp_path / "ranking"
    out = torchrun2("pretrain_gr_ranking.py", "synthetic_ranking_dp2_sharded.gin", run_dir, COMMON + [
        f"DatasetArgs.dataset_dir='{tiny_data / 'bitmask'}'", "DatasetArgs.num_candidates=3",
        "ParallelismArgs.embedding_sharding={'item': 'row_wise', 'action': 'column_wise', 'activity_level': 'table_wise'}",
        "TrainerArgs.grad_clip_norm=1.0",
    ])
    final = check_run(run_dir, out, {"item": "row_wise", "action": "column_wise", "activity_level": "table_wise"})
    assert {"AUC/click", "GAUC/click", "baseline/popularity/AUC/click"} <= set(final)


def test_ranking_script_two_ranks_pipelined_has_the_plain_losses(tiny_data, tmp_path):
    """TorchRec's TrainPipelineSparseDist (TrainerArgs.pipeline='sparse_dist') on 2 gloo ranks with the three sharding
    types: the input distribution of the next batch moves ahead of the step, the losses stay those of the plain
    step, bit for bit (a mid-run evaluation drains and detaches the pipeline)."""
    params = [f"DatasetArgs.dataset_dir='{tiny_data / 'bitmask'}'", "DatasetArgs.num_candidates=3",
              "DatasetArgs.max_seqlen=20", "DatasetArgs.batch_size=16", "DatasetArgs.eval_batch_size=64",
              "TrainerArgs.progress_bar=False", "TrainerArgs.log_interval_steps=1", "TrainerArgs.tensorboard=False",
              "TrainerArgs.num_threads=1", "TrainerArgs.max_steps=6", "TrainerArgs.eval_interval_steps=3",
              "TrainerArgs.eval_max_batches=1", "TrainerArgs.compute_baseline=False", "TrainerArgs.plot=False",
              "ParallelismArgs.embedding_sharding={'item': 'row_wise', 'action': 'column_wise', "
              "'activity_level': 'table_wise'}"]
    losses = {}
    for pipeline in ("none", "sparse_dist"):
        run_dir = tmp_path / pipeline
        out = torchrun2("pretrain_gr_ranking.py", "synthetic_ranking_dp2_sharded.gin", run_dir,
                        params + [f"TrainerArgs.pipeline='{pipeline}'"])
        losses[pipeline] = [r["loss"] for r in read_jsonl(os.path.join(run_dir, "train_log.jsonl"))]
    assert "(TorchRec TrainPipelineSparseDist): input distribution of ['embeddings.collection']" in out
    assert len(losses["none"]) == 6 and losses["sparse_dist"] == losses["none"]

"""A checkpoint written by a 2-rank CPU (gloo) run with a row-wise sharded item table loads for inference in one
process, scores like the full recompute, and ``python -m hstu.inference bench`` runs on it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from hstu.inference import UserEvents, load_inference_model
from hstu.inference.bench import main
from hstu.training.checkpoint import choose_checkpoint
from tests.launching import ROOT, launch_env, run_training_script

TRAIN = ["TrainerArgs.progress_bar=False", "TrainerArgs.tensorboard=False", "TrainerArgs.num_threads=1",
         "DatasetArgs.max_seqlen=12", "DatasetArgs.batch_size=16", "DatasetArgs.eval_batch_size=32",
         "TrainerArgs.max_epochs=1", "TrainerArgs.save_final_checkpoint=True", "NetworkArgs.hidden_dim=16",
         "NetworkArgs.qk_dim=8", "NetworkArgs.v_dim=8", "NetworkArgs.num_heads=2", "RetrievalArgs.num_negatives=8"]


@pytest.fixture(scope="module")
def two_rank_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "retrieval_dp2"
    run_training_script(2, "pretrain_gr_retrieval.py", "synthetic_retrieval_dp2_sharded.gin", run_dir,
                        TRAIN + [f"DatasetArgs.dataset_dir='{tiny_data / 'rating'}'"], timeout=300,
                        OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return run_dir


def test_two_rank_checkpoint_loads_in_one_process(two_rank_run, tmp_path):
    path, manifest, _ = choose_checkpoint(str(two_rank_run))
    assert manifest["world_size"] == 2 and manifest["sharding"]["item"]["sharding"] == "row_wise"
    model = load_inference_model(str(two_rank_run))
    # The whole table, assembled from both ranks' shards by DCP's own converter, and the dense file.
    dcp_to_torch_save(os.path.join(path, "sparse"), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=False)["tables"]
    table = model.model.embeddings.state_dict()["collection.embeddings.item.weight"]
    assert torch.equal(table, full["collection.embeddings.item.weight"])
    dense = torch.load(os.path.join(path, "dense_tp0.pt"), weights_only=False)["dense"]
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in dense.items())
    assert not model.model.training and not any(p.requires_grad for p in model.model.parameters())
    model.append([UserEvents("u", torch.tensor([3, 4, 5]), torch.tensor([10, 20, 30]))])
    model.append([UserEvents("u", torch.tensor([6]), torch.tensor([40]))])
    scores, ids = model.retrieve(["u"], k=5)
    full_scores, full_ids = model.retrieve_full(["u"], k=5)
    torch.testing.assert_close(scores, full_scores, rtol=1e-5, atol=1e-6)


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "hstu.inference", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=launch_env(OMP_NUM_THREADS="1"))


def test_bench_smoke(two_rank_run, tmp_path):
    out = tmp_path / "bench.json"
    result = _bench("--checkpoint", str(two_rank_run), "--history", "8", "--batch-users", "3", "--batch-history", "4",
                    "--iterations", "2", "--warmup", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[bench] (a) one user" in result.stdout and "speed-up" in result.stdout
    results = json.loads(out.read_text())
    for key in ("a_one_user", "b_batch"):
        for label in ("cached", "full_recompute"):
            assert results[key][label]["p50_ms"] > 0 and results[key][label]["p99_ms"] >= results[key][label]["p50_ms"]
    assert results["b_batch"]["users"] == 3 and results["a_one_user"]["history_events"] == 8


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent/run"], "/nonexistent/run"),
    (["--checkpoint", ".", "--iterations", "0"], "--iterations"),
])
def test_bench_errors_are_one_named_line(args, message, capsys):
    assert main(["bench", *args]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err

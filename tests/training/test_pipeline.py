"""TorchRec's train pipelines in the trainer (TrainerArgs.pipeline; the NVIDIA example's pipeline_type) on CPU.

The pipelines change when a batch's copy and input distribution run, not what a step computes: a pipelined run has
the losses of the plain one, bit for bit (checked with sharded tables on one process here, and on two gloo ranks in
tests/distributed/test_training_scripts.py). On CPU there are no streams, so nothing overlaps; the prefetch pipeline,
whose prefetch stage needs CUDA streams, runs as TrainPipelineSparseDist there (logged). The GPU side (overlap on
CUDA streams, the prefetch pipeline itself, device syncs) is tests/training/test_pipeline_cuda.py."""

import json
import os

import gin
import pytest
from torchrec.distributed.train_pipeline.utils import PipelinedForward

from hstu.training.config import parse_gin
from tests.training.test_example_features import _example_args, bitmask_data  # noqa: F401 (fixture)

SHARDED = ("ParallelismArgs.shard_single_process=True", "ParallelismArgs.sparse_optimizer='rowwise_adagrad'",
           "OptimizerArgs.optimizer_str='sgd'")
EXAMPLE_REQUIRED = ["DatasetArgs.dataset_name='ml-1m'", "DatasetArgs.max_history_seqlen=20"]


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


@pytest.mark.parametrize("example, ours", [("'none'", "none"), ("'native'", "sparse_dist"),
                                           ("'prefetch'", "prefetch_sparse_dist")])
def test_the_example_s_pipeline_type_maps_onto_ours(example, ours):
    args = parse_gin([], [f"TrainerArgs.pipeline_type={example}", *EXAMPLE_REQUIRED])
    assert args.trainer.pipeline == ours


def test_pipeline_defaults_and_bad_values_are_named():
    assert parse_gin([], []).trainer.pipeline == "none"  # our default: the plain step
    gin.clear_config()
    assert parse_gin([], EXAMPLE_REQUIRED).trainer.pipeline == "sparse_dist"  # the example's default: 'native'
    gin.clear_config()
    with pytest.raises(ValueError, match=r"TrainerArgs\.pipeline\b.*'async'"):
        parse_gin([], ["TrainerArgs.pipeline='async'"])
    gin.clear_config()
    with pytest.raises(ValueError, match=r"TrainerArgs\.pipeline_type .*TrainerArgs\.pipeline \(ours\)"):
        parse_gin([], ["TrainerArgs.pipeline_type='native'", "TrainerArgs.pipeline='none'", *EXAMPLE_REQUIRED])


def _train(args, task="ranking", resume=False):
    """Losses of a short run and its evaluations."""
    from hstu.training.trainer import Trainer

    trainer = Trainer(task, args, resume=resume)
    try:
        trainer.train()
    finally:
        trainer.close()
    run_dir = args.trainer.run_dir
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evaluations = [json.loads(line) for line in f if line.strip()]
    return losses, [{k: v for k, v in e.items() if k != "eval_seconds"} for e in evaluations]


def _ranking(data, run_dir, *bindings, resume=False):
    """Six example-style ranking steps with sharded tables, evaluated after step 3 and at the end."""
    return _train(_example_args(data, run_dir, "TrainerArgs.max_train_iters=6", "TrainerArgs.eval_interval=3",
                                *SHARDED, *bindings), resume=resume)


def _retrieval(data, run_dir, *bindings):
    """Six own-style retrieval steps with the item table sharded and 8 uniform negatives per position."""
    gin.clear_config()
    return _train(parse_gin([], [
        f"DatasetArgs.dataset_dir={data!r}", "DatasetArgs.max_seqlen=16", "DatasetArgs.batch_size=16",
        "TrainerArgs.max_steps=6", "TrainerArgs.eval_interval_steps=3", "TrainerArgs.eval_max_batches=1",
        "TrainerArgs.log_interval_steps=1", "NetworkArgs.hidden_dim=16", "NetworkArgs.qk_dim=8", "NetworkArgs.v_dim=8",
        "NetworkArgs.num_heads=2", "NetworkArgs.num_layers=1", "RetrievalArgs.num_negatives=8",
        "ParallelismArgs.shard_single_process=True", "ParallelismArgs.sparse_optimizer='rowwise_adagrad'",
        f"TrainerArgs.run_dir={str(run_dir)!r}", "TrainerArgs.device='cpu'", "TrainerArgs.progress_bar=False",
        "TrainerArgs.tensorboard=False", "TrainerArgs.plot=False", "TrainerArgs.compute_baseline=False", *bindings]),
        task="retrieval")


@pytest.fixture
def pipelined_lookups(monkeypatch):
    """Counts the lookups answered from the input TorchRec distributed ahead (its PipelinedForward)."""
    calls = []
    original = PipelinedForward.__call__

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PipelinedForward, "__call__", counted)
    return calls


@pytest.mark.parametrize("pipeline", ["'native'", "'prefetch'"])
def test_pipelined_ranking_with_sharded_tables_has_the_plain_losses(bitmask_data, tmp_path, pipelined_lookups,
                                                                    capsys, pipeline):
    # Six steps with an evaluation after step 3 (the pipeline is drained and detached for it) and the final one.
    plain = _ranking(bitmask_data, tmp_path / "plain", "TrainerArgs.pipeline_type='none'")
    assert not pipelined_lookups
    pipelined = _ranking(bitmask_data, tmp_path / "pipelined", f"TrainerArgs.pipeline_type={pipeline}")
    assert pipelined == plain and len(plain[0]) == 6 and len(plain[1]) == 2
    assert pipelined_lookups == ["model.embeddings.collection"] * 6  # every step's lookup came through the pipeline
    out = capsys.readouterr().out
    assert "(TorchRec TrainPipelineSparseDist): input distribution of ['embeddings.collection']" in out
    if pipeline == "'prefetch'":
        assert "TrainPipelineSparseDist stands in for the prefetch pipeline" in out


def test_pipelined_run_resumes_at_the_trained_batch(bitmask_data, tmp_path):
    """A pipeline draws batches ahead; a checkpoint (here: the stop after step 4) holds the position of the trained
    ones, so the resumed run sees the batches of the uninterrupted one."""
    whole = _ranking(bitmask_data, tmp_path / "whole", "TrainerArgs.pipeline_type='native'")
    _ranking(bitmask_data, tmp_path / "split", "TrainerArgs.pipeline_type='native'", "TrainerArgs.stop_after_steps=4")
    assert _ranking(bitmask_data, tmp_path / "split", "TrainerArgs.pipeline_type='native'", resume=True)[0] == whole[0]


def test_retrieval_with_uniform_negatives_keeps_the_item_lookup_out_of_the_pipeline(bitmask_data, tmp_path, capsys,
                                                                                   pipelined_lookups):
    """The item table is looked up again for the negatives drawn in the forward: its collection is not pipelined
    (said in the log), and the run still has the plain losses."""
    plain = _retrieval(bitmask_data, tmp_path / "plain")
    pipelined = _retrieval(bitmask_data, tmp_path / "pipelined", "TrainerArgs.pipeline='sparse_dist'")
    assert pipelined == plain and len(plain[0]) == 6
    assert not pipelined_lookups
    assert "embeddings.collection (tables ['item']) keeps its own input distribution: item: looked up again" in \
        capsys.readouterr().out

"""TorchRec's train pipelines on a GPU (skipped without CUDA): one process with its tables sharded through
TorchRec's DistributedModelParallel (ParallelismArgs.shard_single_process), pipeline 'native'
(TrainPipelineSparseDist) and 'prefetch' (PrefetchTrainPipelineSparseDist) against 'none' for 5 steps, and the
device-to-host syncs inside a pipelined step counted with torch.cuda.set_sync_debug_mode.

The pipelines only move the copy and the input distribution of later batches onto side streams: the losses are the
plain step's (deterministic mode, so that the kernels' reduction orders are fixed). The CPU side is
tests/training/test_pipeline.py."""

import json
import os

import gin
import pytest
import torch

from tests.training.test_example_features import _example_args, bitmask_data  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams: needs a GPU")

SHARDED = ("ParallelismArgs.shard_single_process=True", "ParallelismArgs.sparse_optimizer='rowwise_adagrad'",
           "OptimizerArgs.optimizer_str='sgd'", "TrainerArgs.device='cuda'", "TrainerArgs.deterministic=True",
           "TrainerArgs.max_train_iters=5", "TrainerArgs.eval_interval=5")


@pytest.fixture(autouse=True)
def _clear_gin():
    yield
    gin.clear_config()


def _trainer(data, run_dir, pipeline):
    from hstu.training.trainer import Trainer

    return Trainer("ranking", _example_args(data, run_dir, *SHARDED, f"TrainerArgs.pipeline_type={pipeline!r}"))


def _losses(data, run_dir, pipeline):
    trainer = _trainer(data, run_dir, pipeline)
    try:
        trainer.train()
        kinds = {d.sharding for d in trainer.parallel.sparse.decisions}
        used = None if trainer.steps is None else type(trainer.steps.pipeline).__name__
    finally:
        trainer.close()
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()], kinds, used


@pytest.mark.parametrize("pipeline, used", [("native", "TrainPipelineSparseDist"),
                                            ("prefetch", "PrefetchTrainPipelineSparseDist")])
def test_pipelined_steps_have_the_plain_losses_on_a_gpu(bitmask_data, tmp_path, pipeline, used):
    plain, kinds, _ = _losses(bitmask_data, tmp_path / "plain", "none")
    assert "replicated" not in kinds  # the tables are sharded (DistributedModelParallel), not kept local
    pipelined, _, used_here = _losses(bitmask_data, tmp_path / pipeline, pipeline)
    assert used_here == used
    assert len(plain) == 5 and pipelined == plain


def test_sync_count_of_a_pipelined_step(bitmask_data, tmp_path, record_property):
    """The device-to-host syncs inside one steady-state pipelined step (its progress(): the input distribution of
    the next batch included) are counted and recorded; the pipeline adds none to those of the plain step."""
    from tests.ops.test_jagged_syncs_cuda import counted_syncs

    counts = {}
    for pipeline in ("none", "native"):
        trainer = _trainer(bitmask_data, tmp_path / pipeline, pipeline)
        try:
            trainer.model.train()
            trainer.train_loader.set_epoch(0)
            batches = iter(trainer.train_loader)
            steps = trainer._run_steps(batches)
            next(steps), next(steps)  # warm-up: the pipeline is filled and traced
            torch.cuda.synchronize()
            with counted_syncs() as log:
                next(steps)
            counts[pipeline] = len(log())
        finally:
            trainer.close()
    record_property("syncs", counts)
    print(f"device-to-host syncs in one step: {counts}")
    assert counts["native"] <= counts["none"], counts

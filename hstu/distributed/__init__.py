"""Distributed training: TorchRec-sharded embedding tables + Megatron-core data/tensor/sequence parallel dense part.

Entry points (see docs/distributed.md for the trainer integration):

* :func:`init_parallelism` -> :class:`ParallelContext` (process groups, device, TP/DP ranks).
* :func:`parallelize` -> :class:`ParallelModel`: all of the below on a model, with zero_grad / finish_grad_sync / step.
* :func:`shard_sparse` -> :class:`ShardedSparse` (TorchRec ``DistributedModelParallel`` with a fused optimizer).
* :func:`wrap_dense` -> :class:`DenseParallel` (Megatron-core DDP + optimizer on CUDA; fp32 all-reduce on CPU).
* :func:`tensor_parallel_hstu`: HSTU stacks -> Megatron column/row-parallel layers with sequence parallelism.
* :func:`save_checkpoint` / :func:`load_checkpoint`.
* :func:`workload_imbalance`: Σ L² spread of a plan of rank batches (balanced batching evidence).
"""

from hstu.distributed.balance import rank_workloads, workload_imbalance
from hstu.distributed.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from hstu.distributed.context import (
    ParallelContext,
    ParallelismSettings,
    destroy_parallelism,
    init_parallelism,
)
from hstu.distributed.dense import DenseOptimizerSettings, DenseParallel, dense_modules, wrap_dense
from hstu.distributed.parallel_model import ParallelModel, parallelize
from hstu.distributed.sparse import ShardedSparse, copy_full_tables_into_shards, shard_sparse
from hstu.distributed.tensor_parallel import (
    TensorParallelHSTULayer,
    TensorParallelHSTUStack,
    TensorParallelLayerNorm,
    tensor_parallel_hstu,
)

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "DenseOptimizerSettings",
    "DenseParallel",
    "ParallelContext",
    "ParallelModel",
    "ParallelismSettings",
    "ShardedSparse",
    "TensorParallelHSTULayer",
    "TensorParallelHSTUStack",
    "TensorParallelLayerNorm",
    "copy_full_tables_into_shards",
    "dense_modules",
    "destroy_parallelism",
    "init_parallelism",
    "load_checkpoint",
    "parallelize",
    "rank_workloads",
    "save_checkpoint",
    "shard_sparse",
    "tensor_parallel_hstu",
    "workload_imbalance",
    "wrap_dense",
]

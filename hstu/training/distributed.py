"""The trainer's side of the parallel layer: gin args -> ``hstu.distributed`` settings, device choice, setup.

Every world size (1 rank included) takes the same path: ``init_parallelism`` (torch.distributed + Megatron-core
``parallel_state``), then ``hstu.distributed.parallelize`` on the model (TorchRec-sharded tables, Megatron DDP /
fp32 all-reduce for the dense part). There is no wrapper module: the trainer calls the model directly.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hstu.distributed import ParallelContext, ParallelismSettings, destroy_parallelism, init_parallelism
from hstu.training.config import OptimizerArgs, ParallelismArgs

__all__ = ["ParallelContext", "parallelism_settings", "pick_device", "setup_parallelism", "teardown"]


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"TrainerArgs.device must be auto, cpu or cuda, got {preference!r}")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("TrainerArgs.device='cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def parallelism_settings(args: ParallelismArgs, optimizer: OptimizerArgs) -> ParallelismSettings:
    """``ParallelismSettings`` from the gin group; None sparse-optimizer fields follow the dense optimizer."""
    overrides: dict[str, Any] = {}
    if args.sparse_optimizer is None:
        name = optimizer.optimizer.lower()
        overrides["sparse_optimizer"] = "sgd" if name == "sgd" else "adam"
    if args.sparse_eps is None:
        overrides["sparse_eps"] = float(optimizer.eps)
    betas = tuple(optimizer.betas)
    if args.sparse_beta1 is None and len(betas) > 0:
        overrides["sparse_beta1"] = float(betas[0])
    if args.sparse_beta2 is None and len(betas) > 1:
        overrides["sparse_beta2"] = float(betas[1])
    if args.sparse_weight_decay is None:
        overrides["sparse_weight_decay"] = float(optimizer.weight_decay)
    return ParallelismSettings.from_args(args, **overrides)


def setup_parallelism(args: ParallelismArgs, optimizer: OptimizerArgs, device_preference: str = "auto",
                      seed: int | None = None) -> tuple[ParallelContext, ParallelismSettings]:
    """Process groups for this run (torchrun env:// rendezvous, or a private world of 1 without torchrun)."""
    settings = parallelism_settings(args, optimizer)
    device = pick_device(device_preference, int(os.environ.get("LOCAL_RANK", "0")))
    return init_parallelism(settings, device=device, seed=seed), settings


def teardown(ctx: ParallelContext | None) -> None:
    destroy_parallelism(ctx)

"""Process-group and parallelism setup: the one place the distributed issue extends.

Today: torch.distributed when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU) and plain DDP over the whole model.
Extension points (issue 6): ``setup_parallelism`` initialises Megatron ``parallel_state`` (TP/SP/DP groups) and
records the data-parallel group in ``ParallelContext.data_parallel_group``; ``wrap_model`` shards
``model.embeddings.collection`` with TorchRec DMP and wraps the dense modules (``model.encoder``, ``model.head``)
in Megatron DDP; ``unwrap_model`` returns the bare model whose methods (evaluation) the trainer calls.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from hstu.training.config import ParallelismArgs


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    data_parallel_group: Optional[dist.ProcessGroup] = None  # None: the default (world) group

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel_rank(self) -> int:
        return dist.get_rank(self.data_parallel_group) if self.is_distributed else 0

    @property
    def data_parallel_size(self) -> int:
        return dist.get_world_size(self.data_parallel_group) if self.is_distributed else 1

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def pick_device(preference: str, local_rank: int) -> torch.device:
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"TrainerArgs.device must be auto, cpu or cuda, got {preference!r}")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("TrainerArgs.device='cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_parallelism(args: ParallelismArgs, device_preference: str = "auto") -> ParallelContext:
    """Read the torchrun environment, pick the device and initialise the process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if args.tensor_model_parallel_size != 1 or args.sequence_parallel:
        raise NotImplementedError("tensor/sequence parallelism arrives with the distributed training issue")
    if args.data_parallel != "ddp":
        raise NotImplementedError(f"ParallelismArgs.data_parallel={args.data_parallel!r}: only 'ddp' exists yet")
    backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                           backend=backend if world_size > 1 else None)


def wrap_model(model: nn.Module, ctx: ParallelContext, args: ParallelismArgs) -> nn.Module:
    """The module the training step calls. Single process: the model itself; else DDP over all parameters."""
    if not ctx.is_distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=args.find_unused_parameters,
        process_group=ctx.data_parallel_group,
    )  # fmt: skip


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def teardown(ctx: ParallelContext) -> None:
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()

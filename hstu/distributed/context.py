"""Process groups for HSTU training: torch.distributed + Megatron-core ``parallel_state``.

Layout (Megatron's default order, pipeline and context parallelism fixed to 1): the ``tensor_model_parallel_size``
ranks of one tensor-parallel (TP) group are consecutive, so ``tp_rank = rank % tp`` and ``dp_rank = rank // tp``.
The data-parallel (DP) group joins the ranks with the same ``tp_rank``. The ranks of one TP group work on the same
samples; the dataloader must therefore be sharded by ``dp_rank`` / ``dp_size``, never by the global rank.

TorchRec shards the embedding tables over the *whole* world (every rank holds a slice of each sharded table).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
from typing import Any, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHARDING_TYPES = ("row_wise", "table_wise", "column_wise", "data_parallel")
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")


@dataclasses.dataclass
class ParallelismSettings:
    """Everything the parallel layer reads from the gin ``parallelism`` group (field names are the gin names).

    ``from_args`` copies the same-named attributes of any argument object, so the trainer's gin class can simply
    use these field names.
    """

    # Dense side (Megatron-core).
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = True  # only meaningful with tensor_model_parallel_size > 1
    use_distributed_optimizer: bool = False
    grad_reduce_in_fp32: bool = True
    # Sparse side (TorchRec). Sharding per table name; tables not listed get ``default_embedding_sharding``
    # ("auto": the planner chooses among row/table/column-wise), or data_parallel when they have at most
    # ``data_parallel_max_rows`` rows (0 disables that rule).
    embedding_sharding: dict = dataclasses.field(default_factory=dict)
    default_embedding_sharding: str = "auto"
    data_parallel_max_rows: int = 0
    # Fused (in-backward) optimizer of the sharded tables; None values fall back to the dense optimizer's.
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_learning_rate: Optional[float] = None
    sparse_eps: float = 1e-8
    sparse_beta1: float = 0.9
    sparse_beta2: float = 0.999
    sparse_weight_decay: float = 0.0
    # One process has nothing to shard: by default its tables stay plain (dense optimizer), which keeps a single-GPU
    # run identical to the unsharded model. True shards them anyway (the 1-rank side of equivalence tests).
    shard_single_process: bool = False
    # Process group backend: "auto" = nccl with CUDA, gloo without.
    backend: str = "auto"
    timeout_minutes: int = 30

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if int(self.tensor_model_parallel_size) < 1:
            raise ValueError(f"tensor_model_parallel_size must be >= 1, got {self.tensor_model_parallel_size}")
        for table, kind in dict(self.embedding_sharding).items():
            if kind not in SHARDING_TYPES:
                raise ValueError(f"embedding_sharding[{table!r}]={kind!r}; choose one of {SHARDING_TYPES}")
        if self.default_embedding_sharding not in SHARDING_TYPES + ("auto",):
            raise ValueError(
                f"default_embedding_sharding={self.default_embedding_sharding!r}; choose 'auto' or one of {SHARDING_TYPES}"
            )
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"sparse_optimizer={self.sparse_optimizer!r}; choose one of {SPARSE_OPTIMIZERS}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"backend={self.backend!r}; choose auto, nccl or gloo")

    @classmethod
    def from_args(cls, args: Any = None, **overrides) -> "ParallelismSettings":
        """Settings from an argument object (e.g. the gin parallelism group): same-named attributes are copied."""
        if isinstance(args, cls) and not overrides:
            return args
        values = {}
        for field in dataclasses.fields(cls):
            # None in the argument object means "the default" (e.g. ParallelismArgs.backend = None).
            if args is not None and getattr(args, field.name, None) is not None:
                values[field.name] = getattr(args, field.name)
        values.update(overrides)
        if "embedding_sharding" in values:
            values["embedding_sharding"] = dict(values["embedding_sharding"] or {})
        return cls(**values)


@dataclasses.dataclass
class ParallelContext:
    """Ranks, groups and device of this process. ``dp_*`` refer to the data-parallel group of dense replicas."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    sequence_parallel: bool
    owns_process_group: bool = False

    @property
    def world_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_cuda(self) -> bool:
        return self.device.type == "cuda"

    def barrier(self) -> None:
        if self.uses_cuda:
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} ({self.backend}, {self.device}): tp {self.tp_rank}/{self.tp_size}"
                f"{' +SP' if self.sequence_parallel else ''}, dp {self.dp_rank}/{self.dp_size}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallelism(settings: Any = None, *, device: Optional[str | torch.device] = None,
                     seed: Optional[int] = None) -> ParallelContext:
    """Initialise torch.distributed (if needed) and Megatron-core's parallel state; returns the context.

    Works under ``torchrun`` (env:// rendezvous) and in a plain single process (a private TCP store on a free
    port, world size 1), so one code path serves 1 and N ranks. ``device``: None picks ``cuda:LOCAL_RANK`` when CUDA
    is available, else CPU. ``seed`` (optional) seeds Megatron's tensor-parallel RNG tracker on CUDA, which makes
    dropout masks differ between the TP ranks where they hold different features or tokens.
    """
    settings = ParallelismSettings.from_args(settings)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    tp = int(settings.tensor_model_parallel_size)
    if tp > 1 and device.type != "cuda" and settings.sequence_parallel:
        # Megatron's sequence-parallel gathers use a CUDA buffer; plain TP (all-reduces) runs on gloo.
        raise ValueError(
            f"sequence_parallel=True with tensor_model_parallel_size={tp} needs CUDA: set "
            "ParallelismArgs.sequence_parallel = False to run tensor parallelism on CPU (gloo)."
        )
    backend = settings.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"

    owns = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=int(settings.timeout_minutes))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout,
                                    device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
        owns = True
    world_size, rank = dist.get_world_size(), dist.get_rank()

    if world_size % tp != 0:
        raise ValueError(f"world size {world_size} is not a multiple of tensor_model_parallel_size={tp}")

    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() != tp:
            raise RuntimeError("Megatron parallel_state is already initialised with another tensor-parallel size")
    else:
        # Megatron also builds gloo twins of its groups (used by its distributed optimizer's CPU paths).
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                 distributed_timeout_minutes=int(settings.timeout_minutes))
    if device.type == "cuda" and seed is not None:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(int(seed))

    ctx = ParallelContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp_size=tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        sequence_parallel=bool(settings.sequence_parallel) and tp > 1,
        owns_process_group=owns,
    )
    if rank == 0:
        logger.info("parallelism: world %d = tp %d x dp %d on %s (%s)", world_size, tp, ctx.dp_size, device.type, backend)
    return ctx


def destroy_parallelism(ctx: Optional[ParallelContext] = None) -> None:
    """Tear down Megatron's groups and, if ``init_parallelism`` created it, the default process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized() and (ctx is None or ctx.owns_process_group):
        dist.destroy_process_group()

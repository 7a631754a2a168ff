"""Sparse side: TorchRec sharding of the embedding tables with a fused (in-backward) optimizer.

``shard_sparse`` shards every ``EmbeddingCollection`` found in the given module *in place* (the module keeps
working as before: its collections are replaced by TorchRec's sharded modules) and returns a
:class:`ShardedSparse` handle with the ``DistributedModelParallel``, the plan and the optimizers.

Per table, the sharding type comes from :class:`~hstu.distributed.context.ParallelismSettings` (gin):

* ``row_wise`` / ``table_wise`` / ``column_wise``: sharded over the whole world; updated by FBGEMM's fused
  optimizer inside the backward (``sparse_optimizer``: exact row-wise Adagrad, Adagrad, Adam, SGD).
* ``data_parallel``: a full replica on every rank. On CUDA it uses TorchRec's data-parallel sharding; on CPU/gloo
  TorchRec's data-parallel lookup is broken (the output split fails), so there a collection whose tables are all
  data-parallel is left unsharded, and a data-parallel table sharing a collection with sharded tables is sharded
  table-wise instead (logged). Replicated tables are updated by a regular torch optimizer after their gradients are
  averaged over the data-parallel group (:meth:`ShardedSparse.finish_grad_sync`).

FBGEMM's CPU kernels have no fused Adam: with ``sparse_optimizer="adam"`` on CPU every collection stays unsharded
(replicated, dense Adam), logged.

Gradient semantics: TorchRec divides the gradients of sharded tables by the world size in the backward all-to-all
(``torchrec.distributed.comm_ops`` gradient division, on by default and checked here), so with a per-rank *mean*
loss a sharded table receives the gradient of the global mean loss, exactly like the DDP-averaged dense part. The
ranks of one tensor-parallel group look up the same samples; their identical gradients are summed and divided by
the world size, which again gives the global mean (see docs/distributed.md).

Initial values: the tables' values at the time of sharding (as built by the model on every rank from the same
seed) are copied into the shards, so a run starts from the same tables whatever the world size and sharding.
Build the collections on the ``meta`` device to skip that for tables too large to materialise on one rank.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm_ops import get_gradient_division
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingCollection

from hstu.distributed.context import ParallelContext, ParallelismSettings
from hstu.distributed.dense import fused_if_cuda
from hstu.distributed.grad_sync import GradientAllReduce

logger = logging.getLogger(__name__)

SHARDED_TYPES = ("row_wise", "table_wise", "column_wise")

# sparse_optimizer name -> FBGEMM fused optimizer name (EmbOptimType member).
_FUSED_OPTIMIZERS = {
    "rowwise_adagrad": "EXACT_ROWWISE_ADAGRAD",
    "adagrad": "EXACT_ADAGRAD",
    "adam": "ADAM",
    "sgd": "EXACT_SGD",
}
_CPU_FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclasses.dataclass
class TableDecision:
    table: str
    collection: str  # module path of its EmbeddingCollection inside the sharded module
    requested: str  # "auto" or a sharding type
    sharding: str  # what it got: a sharding type, or "replicated" (left unsharded)
    reason: str = ""


class ShardedSparse:
    """Handle on the sharded sparse module: plan, fused optimizer, replicated tables and their optimizer."""

    def __init__(self, dmp: DistributedModelParallel, decisions: list[TableDecision], ctx: ParallelContext,
                 replicated: list[tuple[str, nn.Parameter]], replicated_optimizer: Optional[torch.optim.Optimizer],
                 settings: ParallelismSettings):
        self.dmp = dmp
        self.decisions = decisions
        self.ctx = ctx
        self.settings = settings
        self.replicated_parameters = replicated
        self.replicated_optimizer = replicated_optimizer
        # TP ranks of one group hold identical replicated-table gradients: averaging over DP is enough.
        self._grad_sync = GradientAllReduce([p for _, p in replicated], ctx.dp_group)

    @property
    def module(self) -> nn.Module:
        """The (in-place sharded) module that was passed to :func:`shard_sparse`."""
        return self.dmp.module

    @property
    def plan(self) -> ShardingPlan:
        return self.dmp.plan

    @property
    def fused_optimizer(self):
        """TorchRec's KeyedOptimizer of the sharded tables (updates happen inside backward)."""
        return self.dmp.fused_optimizer

    def finish_grad_sync(self) -> None:
        """Average the replicated tables' gradients over the data-parallel group (call after backward)."""
        self._grad_sync.finish_grad_sync()

    def step(self, step_optimizer: Optional[Callable[[torch.optim.Optimizer], Any]] = None) -> None:
        """Step the replicated tables' optimizer (the sharded tables were already updated in backward);
        ``step_optimizer`` as in :meth:`DenseParallel.step`."""
        if self.replicated_optimizer is not None:
            if step_optimizer is None:
                self.replicated_optimizer.step()
            else:
                step_optimizer(self.replicated_optimizer)

    @property
    def updates_in_backward(self) -> bool:
        """Whether some tables are sharded with an optimizer fused into backward (updated before any step())."""
        return any(True for _ in self.fused_optimizer.params)

    def zero_grad(self) -> None:
        for _, p in self.replicated_parameters:
            p.grad = None

    def set_learning_rate(self, lr: float) -> None:
        if self.replicated_optimizer is not None:
            for group in self.replicated_optimizer.param_groups:
                group["lr"] = lr
        for group in self.fused_optimizer.param_groups:
            group["lr"] = lr
        # FBGEMM's fused kernels read the learning rate from param_groups only in the fused optimizer's step() /
        # zero_grad() (which do nothing else: the update happens in backward). Without this call a new learning
        # rate (warmup, decay) never reaches the sharded tables.
        self.fused_optimizer.step()

    def describe(self) -> str:
        rows = [f"  {d.table:<20} {d.requested:>13} -> {d.sharding}{'  (' + d.reason + ')' if d.reason else ''}"
                for d in self.decisions]
        return "embedding tables (requested -> used):\n" + "\n".join(rows)


def _collections(module: nn.Module) -> dict[str, EmbeddingCollection]:
    found = {name: m for name, m in module.named_modules() if isinstance(m, EmbeddingCollection)}
    if not found:
        raise ValueError(f"no torchrec EmbeddingCollection inside {type(module).__name__}: nothing to shard")
    return found


def _requested_sharding(table_name: str, num_rows: int, settings: ParallelismSettings) -> str:
    explicit = dict(settings.embedding_sharding)
    if table_name in explicit:
        return explicit[table_name]
    if settings.data_parallel_max_rows > 0 and num_rows <= settings.data_parallel_max_rows:
        return "data_parallel"
    return settings.default_embedding_sharding


def _decide(collections: dict[str, EmbeddingCollection], settings: ParallelismSettings,
            ctx: ParallelContext) -> list[TableDecision]:
    on_cpu = not ctx.uses_cuda
    decisions = []
    for path, ec in collections.items():
        configs = ec.embedding_configs()
        requested = {c.name: _requested_sharding(c.name, c.num_embeddings, settings) for c in configs}
        if ctx.world_size == 1 and not settings.shard_single_process:
            reason = "single process: kept unsharded, dense optimizer (shard_single_process=False)"
            decisions += [TableDecision(c.name, path, requested[c.name], "replicated", reason) for c in configs]
            continue
        if on_cpu and settings.sparse_optimizer not in _CPU_FUSED_OPTIMIZERS:
            reason = f"FBGEMM has no fused {settings.sparse_optimizer} on CPU: kept unsharded, dense optimizer"
            decisions += [TableDecision(c.name, path, requested[c.name], "replicated", reason) for c in configs]
            continue
        all_replicated = all(kind == "data_parallel" for kind in requested.values())
        for c in configs:
            kind = requested[c.name]
            if kind != "data_parallel":
                decisions.append(TableDecision(c.name, path, kind, kind))
            elif not on_cpu:
                decisions.append(TableDecision(c.name, path, kind, "data_parallel"))
            elif all_replicated:
                decisions.append(TableDecision(c.name, path, kind, "replicated",
                                               "TorchRec data_parallel fails on CPU/gloo: collection kept unsharded"))
            else:
                decisions.append(TableDecision(c.name, path, kind, "table_wise",
                                               "TorchRec data_parallel fails on CPU/gloo: sharded table-wise instead"))
    return decisions


def _fused_params(settings: ParallelismSettings, learning_rate: float) -> dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return {
        "optimizer": getattr(EmbOptimType, _FUSED_OPTIMIZERS[settings.sparse_optimizer]),
        "learning_rate": float(learning_rate),
        "eps": float(settings.sparse_eps),
        "beta1": float(settings.sparse_beta1),
        "beta2": float(settings.sparse_beta2),
        "weight_decay": float(settings.sparse_weight_decay),
    }


def _replicated_optimizer(params: list[nn.Parameter], settings: ParallelismSettings, lr: float):
    if not params:
        return None
    name = settings.sparse_optimizer
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(settings.sparse_beta1, settings.sparse_beta2),
                                eps=settings.sparse_eps, weight_decay=settings.sparse_weight_decay,
                                **fused_if_cuda(params))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=settings.sparse_weight_decay, **fused_if_cuda(params))
    # Row-wise Adagrad has no torch twin; element-wise Adagrad is its closest replicated stand-in.
    return torch.optim.Adagrad(params, lr=lr, eps=settings.sparse_eps, weight_decay=settings.sparse_weight_decay)


def copy_full_tables_into_shards(dmp: DistributedModelParallel, full_state: dict[str, torch.Tensor]) -> int:
    """Copy full (unsharded) table tensors into this rank's shards; returns the number of tensors copied."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    copied = 0
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            if key not in full_state:
                continue
            full = full_state[key]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                                  shard.metadata.shard_sizes))
                    shard.tensor.copy_(full[index].to(shard.tensor.device, shard.tensor.dtype))
            else:
                value.copy_(full.to(value.device, value.dtype))
            copied += 1
    return copied


def shard_sparse(sparse_module: nn.Module, settings: Any, ctx: ParallelContext, *,
                 learning_rate: Optional[float] = None) -> ShardedSparse:
    """Shard the EmbeddingCollections of ``sparse_module`` in place over all ranks; see the module docstring.

    ``learning_rate``: the sparse learning rate when ``settings.sparse_learning_rate`` is None (pass the dense
    optimizer's). Call after :func:`~hstu.distributed.init_parallelism`, with the module built identically on
    every rank (same seed).
    """
    settings = ParallelismSettings.from_args(settings)
    lr = settings.sparse_learning_rate if settings.sparse_learning_rate is not None else learning_rate
    if lr is None:
        raise ValueError("no sparse learning rate: set sparse_learning_rate or pass learning_rate")
    if not get_gradient_division():
        raise RuntimeError("torchrec gradient division is off: sharded-table gradients would be world_size x too "
                           "large (torchrec.distributed.comm_ops.set_gradient_division(True))")

    collections = _collections(sparse_module)
    decisions = _decide(collections, settings, ctx)
    by_collection: dict[str, list[TableDecision]] = {}
    for d in decisions:
        by_collection.setdefault(d.collection, []).append(d)
    unsharded_paths = [p for p, ds in by_collection.items() if all(d.sharding == "replicated" for d in ds)]

    constraints = {}
    for d in decisions:
        if d.sharding == "replicated":
            continue
        kinds = list(SHARDED_TYPES) if d.sharding == "auto" else [d.sharding]
        constraints[d.table] = ParameterConstraints(sharding_types=kinds)

    # Full values of the tables to shard, to seed the shards (see the module docstring).
    sharded_prefixes = tuple(_join(p, "") for p in collections if p not in unsharded_paths)
    full_state = {}
    for key, value in sparse_module.state_dict().items():
        if not value.is_meta and any(key.startswith(prefix) or prefix == "" for prefix in sharded_prefixes):
            full_state[key] = value.detach().clone()

    sharder = EmbeddingCollectionSharder(fused_params=_fused_params(settings, lr))
    world = dist.group.WORLD
    topology = Topology(world_size=ctx.world_size, compute_device=ctx.device.type,
                        local_world_size=torch.cuda.device_count() if ctx.uses_cuda else ctx.world_size)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(sparse_module, [sharder], world)
    for path in unsharded_paths:
        plan.plan.pop(path, None)
        collections[path].to(ctx.device)
    for d in decisions:
        if d.reason and ctx.is_main:
            logger.warning("embedding table %r: %s", d.table, d.reason)

    dmp = DistributedModelParallel(sparse_module, env=ShardingEnv.from_process_group(world), device=ctx.device,
                                   plan=plan, sharders=[sharder], init_data_parallel=False)
    copy_full_tables_into_shards(dmp, full_state)

    # Record what the planner chose for "auto" tables.
    for d in decisions:
        module_plan = plan.plan.get(d.collection)
        if module_plan is not None and d.table in module_plan:
            d.sharding = module_plan[d.table].sharding_type

    replicated_names = set()
    for d in decisions:
        if d.sharding in ("replicated", "data_parallel"):
            replicated_names.add(_join(d.collection, f"embeddings.{d.table}.weight"))
    replicated = [(n, p) for n, p in dmp.named_parameters() if n in replicated_names]
    missing = replicated_names - {n for n, _ in replicated}
    if missing:
        raise RuntimeError(f"replicated embedding parameters not found after sharding: {sorted(missing)}")
    handle = ShardedSparse(dmp, decisions, ctx, replicated,
                           _replicated_optimizer([p for _, p in replicated], settings, lr), settings)
    if ctx.is_main:
        logger.info("%s", handle.describe())
    return handle

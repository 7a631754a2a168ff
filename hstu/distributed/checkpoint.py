"""Checkpoints of a :class:`~hstu.distributed.parallel_model.ParallelModel`.

Layout of a checkpoint directory:

* ``sparse/``: torch.distributed.checkpoint (DCP) of the TorchRec state: every table (sharded tables as
  ShardedTensors, replicated ones written once) and the fused optimizer state. DCP stores each shard with its global
  offsets, so it loads into another world size or sharding plan (resharding on load).
* ``dense_tp{t}.pt``: per tensor-parallel rank ``t`` (written by data-parallel rank 0; the dense part is identical on
  every DP replica): dense parameters, dense optimizer state, replicated-table optimizer state. With Megatron's
  distributed optimizer the optimizer state is gathered from the DP group first.
* ``rank{r}.pt``: the caller's per-rank ``extra_state`` (data position, RNG states, step counters, ...).
* ``meta.pt``: world / TP / DP sizes, for checks and messages.

Same world size and plan: resume is exact. Other world sizes: the tables reshard; the dense files need the same
TP size (a TP-sharded dense file only fits the same split); everything in ``extra_state`` is the caller's business
(e.g. the dataloader refuses another world size). See docs/distributed.md.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from hstu.distributed.parallel_model import ParallelModel


def _sparse_state(parallel: ParallelModel) -> dict[str, Any]:
    return {"tables": parallel.sparse.dmp.state_dict(), "fused_optimizer": parallel.sparse.fused_optimizer.state_dict()}


def _optimizers_of(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _dense_state(parallel: ParallelModel) -> dict[str, Any]:
    dense = parallel.dense
    state: dict[str, Any] = {"dense": dense.module.state_dict(), "optimizer": dense.optimizer.state_dict()}
    if dense.uses_megatron and dense.megatron_ddp.ddp_config.use_distributed_optimizer:
        # Collective over the DP group; the full state lands on DP rank 0.
        state["distributed_optimizer"] = [opt.get_parameter_state_dp_zero() for opt in _optimizers_of(dense.optimizer)]
    if parallel.sparse.replicated_optimizer is not None:
        state["replicated_optimizer"] = parallel.sparse.replicated_optimizer.state_dict()
    return state


def save_checkpoint(directory: str, parallel: ParallelModel, extra_state: Optional[dict] = None) -> None:
    """Collective: every rank calls it with the same ``directory``."""
    ctx = parallel.ctx
    if ctx.is_main:
        os.makedirs(directory, exist_ok=True)
    ctx.barrier()
    dcp.save(_sparse_state(parallel), checkpoint_id=os.path.join(directory, "sparse"))
    dense_state = _dense_state(parallel)
    if ctx.dp_rank == 0:
        torch.save(dense_state, os.path.join(directory, f"dense_tp{ctx.tp_rank}.pt"))
    torch.save(extra_state or {}, os.path.join(directory, f"rank{ctx.rank}.pt"))
    if ctx.is_main:
        torch.save({"world_size": ctx.world_size, "tp_size": ctx.tp_size, "dp_size": ctx.dp_size},
                   os.path.join(directory, "meta.pt"))
    ctx.barrier()


def load_checkpoint(directory: str, parallel: ParallelModel) -> dict:
    """Collective: restore tables, fused optimizer, dense part and optimizers; returns this rank's extra_state.

    With another world size the extra state of ``rank{r}.pt`` may not exist: an empty dict is returned then.
    """
    ctx = parallel.ctx
    meta = torch.load(os.path.join(directory, "meta.pt"), weights_only=False)
    if meta["tp_size"] != ctx.tp_size:
        raise ValueError(f"checkpoint has tensor_model_parallel_size={meta['tp_size']}, this run {ctx.tp_size}: "
                         "the dense shards only fit the same split")
    state = _sparse_state(parallel)
    dcp.load(state, checkpoint_id=os.path.join(directory, "sparse"))
    parallel.sparse.dmp.load_state_dict(state["tables"])
    parallel.sparse.fused_optimizer.load_state_dict(state["fused_optimizer"])

    dense_state = torch.load(os.path.join(directory, f"dense_tp{ctx.tp_rank}.pt"), map_location="cpu",
                             weights_only=False)
    dense = parallel.dense
    dense.module.load_state_dict(dense_state["dense"])
    dense.optimizer.load_state_dict(dense_state["optimizer"])
    if "distributed_optimizer" in dense_state:
        for opt, param_state in zip(_optimizers_of(dense.optimizer), dense_state["distributed_optimizer"]):
            opt.load_parameter_state_from_dp_zero(param_state if ctx.dp_rank == 0 else None)
    if parallel.sparse.replicated_optimizer is not None:
        parallel.sparse.replicated_optimizer.load_state_dict(dense_state["replicated_optimizer"])
    path = os.path.join(directory, f"rank{ctx.rank}.pt")
    extra = torch.load(path, weights_only=False) if os.path.exists(path) else {}
    dist.barrier()
    return extra

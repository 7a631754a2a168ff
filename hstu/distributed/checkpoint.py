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

Every file is fsynced before the call returns. A rank that fails to write or read its part does not leave the
other ranks waiting in a collective: the ranks agree on success after each phase and every rank raises
(:class:`CheckpointWriteError` when writing, :class:`CheckpointError` when reading), with the path in the message.
"""

from __future__ import annotations

import errno as errno_codes
import os
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from hstu.distributed.agreement import describe_error
from hstu.distributed.agreement import raise_if_any_rank_failed as agree
from hstu.distributed.context import ParallelContext
from hstu.distributed.parallel_model import ParallelModel


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or written for another setup. The message names
    the file or directory."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. ENOSPC) on this or another rank; ``errno`` is the failing write's."""


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


def _root_cause(err: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException, else ``err`` itself."""
    if isinstance(err, CheckpointException) and err.failures:
        first = err.failures[min(err.failures)]
        return first[0] if isinstance(first, tuple) else first
    return err


def write_error(where: str, err: BaseException) -> CheckpointWriteError:
    cause = _root_cause(err)
    code = getattr(cause, "errno", None) or errno_codes.EIO
    return CheckpointWriteError(code, f"could not write the checkpoint {where}: {describe_error(cause)}")


def raise_if_any_rank_failed(ctx: ParallelContext, error: Optional[BaseException], where: str,
                             kind: type = CheckpointWriteError) -> None:
    """Collective: every rank raises ``kind`` when one of them failed on the checkpoint ``where`` (a failed rank its
    own error, the others one naming the failed ranks and their errors)."""
    if kind is CheckpointWriteError:
        agree(ctx, error, f"writing the checkpoint {where}",
              own_error=lambda err: err if isinstance(err, kind) else write_error(where, err),
              other_error=lambda message: CheckpointWriteError(errno_codes.EIO, message))
    else:
        agree(ctx, error, f"reading the checkpoint {where}",
              own_error=lambda err: err if isinstance(err, kind) else CheckpointError(
                  f"{where}: {describe_error(err)}"), other_error=CheckpointError)


def save_synced(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read_file(path: str, map_location: str = "cpu") -> Any:
    """``torch.load`` of a checkpoint file; a missing, truncated or corrupt file raises :class:`CheckpointError`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file missing")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # zip, pickle, EOF or errno errors of a damaged file: all mean "unreadable"
        raise CheckpointError(f"{path}: unreadable checkpoint file (truncated or corrupt?): "
                              f"{type(err).__name__}: {err}") from err


def save_checkpoint(directory: str, parallel: ParallelModel, extra_state: Optional[dict] = None) -> None:
    """Collective: every rank calls it with the same ``directory``."""
    ctx = parallel.ctx
    error = None
    if ctx.is_main:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            error = err
    raise_if_any_rank_failed(ctx, error, directory)
    try:
        # DCP fsyncs its files and reports a failure of any rank on every rank.
        dcp.save(_sparse_state(parallel), checkpoint_id=os.path.join(directory, "sparse"))
    except (CheckpointException, OSError) as err:
        raise write_error(os.path.join(directory, "sparse"), err) from None
    dense_state = _dense_state(parallel)
    error = None
    try:
        if ctx.dp_rank == 0:
            save_synced(dense_state, os.path.join(directory, f"dense_tp{ctx.tp_rank}.pt"))
        save_synced(extra_state or {}, os.path.join(directory, f"rank{ctx.rank}.pt"))
        if ctx.is_main:
            save_synced({"world_size": ctx.world_size, "tp_size": ctx.tp_size, "dp_size": ctx.dp_size},
                        os.path.join(directory, "meta.pt"))
    except Exception as err:  # any failure must reach the other ranks, which would otherwise wait forever
        error = err
    raise_if_any_rank_failed(ctx, error, directory)


def load_checkpoint(directory: str, parallel: ParallelModel) -> dict:
    """Collective: restore tables, fused optimizer, dense part and optimizers; returns this rank's extra_state.

    With another world size the extra state of ``rank{r}.pt`` may not exist: an empty dict is returned then. An
    unreadable file raises :class:`CheckpointError` on every rank before anything is restored.
    """
    ctx = parallel.ctx
    error, meta, dense_state, extra = None, None, None, {}
    dense_path = os.path.join(directory, f"dense_tp{ctx.tp_rank}.pt")
    try:
        meta = read_file(os.path.join(directory, "meta.pt"))
        if meta["tp_size"] == ctx.tp_size:
            dense_state = read_file(dense_path)
        rank_path = os.path.join(directory, f"rank{ctx.rank}.pt")
        if os.path.exists(rank_path):
            extra = read_file(rank_path)
    except CheckpointError as err:
        error = err
    raise_if_any_rank_failed(ctx, error, directory, kind=CheckpointError)
    if meta["tp_size"] != ctx.tp_size:
        raise CheckpointError(f"{directory}: checkpoint has tensor_model_parallel_size={meta['tp_size']}, this run "
                              f"{ctx.tp_size}: the dense shards only fit the same split")
    needs_replicated = parallel.sparse.replicated_optimizer is not None
    if needs_replicated != ("replicated_optimizer" in dense_state):
        raise CheckpointError(
            f"{dense_path}: the checkpoint {'has no' if needs_replicated else 'has a'} replicated-table optimizer "
            f"state and this run {'keeps' if needs_replicated else 'has no'} replicated tables: it was written with "
            "another table sharding")
    state = _sparse_state(parallel)
    try:
        dcp.load(state, checkpoint_id=os.path.join(directory, "sparse"))
    except (CheckpointException, OSError, RuntimeError, KeyError, ValueError) as err:
        cause = _root_cause(err)
        raise CheckpointError(f"{os.path.join(directory, 'sparse')}: cannot load the tables: "
                              f"{type(cause).__name__}: {cause}") from None
    parallel.sparse.dmp.load_state_dict(state["tables"])
    parallel.sparse.fused_optimizer.load_state_dict(state["fused_optimizer"])

    dense = parallel.dense
    dense.module.load_state_dict(dense_state["dense"])
    dense.optimizer.load_state_dict(dense_state["optimizer"])
    if "distributed_optimizer" in dense_state:
        for opt, param_state in zip(_optimizers_of(dense.optimizer), dense_state["distributed_optimizer"]):
            opt.load_parameter_state_from_dp_zero(param_state if ctx.dp_rank == 0 else None)
    if needs_replicated:
        parallel.sparse.replicated_optimizer.load_state_dict(dense_state["replicated_optimizer"])
    dist.barrier()
    return extra

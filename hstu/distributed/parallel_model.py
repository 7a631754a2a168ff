"""One handle for the trainer: TP conversion + sharded sparse part + wrapped dense part of a model.

    ctx = init_parallelism(args.parallelism, seed=args.trainer.seed)
    model = build_model(...)                       # same seed on every rank
    parallel = parallelize(model, ctx, args.parallelism, args.optimizer, grad_clip_norm=...)
    for batch in loader:                           # loader sharded by ctx.dp_rank / ctx.dp_size
        parallel.zero_grad()
        loss = model(batch.to(ctx.device)).loss    # per-rank mean loss
        loss.backward()                            # sharded tables are updated here (fused optimizer)
        parallel.finish_grad_sync()                # DP average (dense + replicated tables), TP partial sums
        parallel.step()                            # dense optimizer (+ clipping), replicated-table optimizer
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from hstu.distributed.context import ParallelContext, ParallelismSettings
from hstu.distributed.dense import DenseOptimizerSettings, DenseParallel, dense_modules, wrap_dense
from hstu.distributed.sparse import ShardedSparse, shard_sparse
from hstu.distributed.tensor_parallel import tensor_parallel_hstu


class ParallelModel:
    def __init__(self, model: nn.Module, ctx: ParallelContext, sparse: ShardedSparse, dense: DenseParallel):
        self.model, self.ctx, self.sparse, self.dense = model, ctx, sparse, dense

    def zero_grad(self) -> None:
        self.dense.zero_grad()
        self.sparse.zero_grad()

    def finish_grad_sync(self) -> None:
        self.dense.finish_grad_sync()
        self.sparse.finish_grad_sync()

    def step(self, step_optimizer: Optional[Callable[[torch.optim.Optimizer], Any]] = None):
        """Dense + replicated-table optimizer steps; returns the dense gradient norm when clipping computed it
        (a float from Megatron's optimizer, a 0-dim tensor from the torch path), else None. ``step_optimizer``:
        called with each torch optimizer instead of its ``step()`` (see :meth:`DenseParallel.step`)."""
        grad_norm = self.dense.step(step_optimizer)
        self.sparse.step(step_optimizer)
        return grad_norm

    def torch_optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers that ``step()`` steps: the dense one (unless Megatron's) and the replicated tables'."""
        out = [] if self.dense.uses_megatron else [self.dense.optimizer]
        return out + ([self.sparse.replicated_optimizer] if self.sparse.replicated_optimizer is not None else [])

    def set_learning_rate(self, lr: float, sparse_lr: Optional[float] = None) -> None:
        """Learning rate of the next update; call it before the forward/backward (the sharded tables are updated
        inside backward). ``sparse_lr``: the tables' rate when it differs from the dense one."""
        self.dense.set_learning_rate(lr)
        self.sparse.set_learning_rate(lr if sparse_lr is None else sparse_lr)


def _sparse_child(model: nn.Module, attribute: Optional[str]) -> nn.Module:
    if attribute is not None:
        return getattr(model, attribute)
    from torchrec.modules.embedding_modules import EmbeddingCollection

    holders = [name for name, child in model.named_children()
               if any(isinstance(m, EmbeddingCollection) for m in child.modules())]
    if len(holders) != 1:
        raise ValueError(f"expected one child holding the EmbeddingCollection(s), found {holders}: pass sparse_attribute")
    return getattr(model, holders[0])


def parallelize(model: nn.Module, ctx: ParallelContext, settings: Any = None, optimizer: Any = None, *,
                grad_clip_norm: Optional[float] = None, sparse_attribute: Optional[str] = None) -> ParallelModel:
    """Make ``model`` distributed in place (TP layers, sharded tables, dense DP) and return the step handle.

    ``settings``: parallelism settings (gin parallelism group); ``optimizer``: dense optimizer settings
    (``OptimizerArgs``-like: optimizer, learning_rate, betas, eps, weight_decay). The sparse learning rate defaults
    to the dense one. ``sparse_attribute`` names the child with the tables (default: the only such child).
    """
    settings = ParallelismSettings.from_args(settings)
    opt = DenseOptimizerSettings.from_args(optimizer, **({"grad_clip_norm": grad_clip_norm} if grad_clip_norm else {}))
    tensor_parallel_hstu(model, ctx)
    sparse_child = _sparse_child(model, sparse_attribute)
    sparse = shard_sparse(sparse_child, settings, ctx, learning_rate=opt.learning_rate)
    dense = wrap_dense(dense_modules(model, exclude=[sparse_child]), ctx, settings, opt)
    return ParallelModel(model, ctx, sparse, dense)

"""Dense side: data-parallel gradient reduction and the optimizer of the dense parameters.

On CUDA the dense parameters are wrapped in Megatron-core's ``DistributedDataParallel`` (contiguous gradient
buffers, reduction in fp32 with ``grad_reduce_in_fp32``, optional distributed optimizer that shards the optimizer
state over the data-parallel group) and stepped by Megatron's optimizer (``get_megatron_optimizer``), which also
clips the gradient norm across tensor-parallel shards.

On CPU Megatron-core's DDP cannot run (it allocates its buffers with ``torch.cuda.current_device()`` and streams),
so the fallback averages ``.grad`` over the data-parallel group in fp32 after backward
(:class:`~hstu.distributed.grad_sync.GradientAllReduce`) and steps a torch optimizer. Both paths reduce the same
thing: the mean over data-parallel ranks of each rank's gradient.

The wrapped module is only a container of the dense submodules: the model keeps calling them directly, Megatron's
DDP works through parameter hooks, and the CPU fallback reduces after backward, so no forward needs to go through a
wrapper. Sharded embedding parameters must not be inside it (pass e.g. ``dense_modules(model)``).

Tensor/sequence parallelism leaves two kinds of replicated parameters whose gradient is only partial on each TP
rank: LayerNorm weights in sequence-parallel regions (each rank saw a slice of the tokens) and the relative
attention bias (each rank used it for its own heads). They carry the attribute ``hstu_tp_partial_grad`` (set by
:mod:`hstu.distributed.tensor_parallel`) and are summed over the TP group in :meth:`DenseParallel.finish_grad_sync`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from hstu.distributed.context import ParallelContext, ParallelismSettings
from hstu.distributed.grad_sync import GradientAllReduce

logger = logging.getLogger(__name__)

TP_PARTIAL_GRAD = "hstu_tp_partial_grad"


@dataclasses.dataclass
class DenseOptimizerSettings:
    """The dense optimizer (field names follow the trainer's ``OptimizerArgs``)."""

    optimizer: str = "adamw"  # adam | adamw | sgd
    learning_rate: float = 1e-3
    betas: Sequence[float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: Optional[float] = None

    @classmethod
    def from_args(cls, args: Any = None, **overrides) -> "DenseOptimizerSettings":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)


def dense_modules(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> nn.ModuleDict:
    """The model's top-level children that hold no EmbeddingCollection (and are not in ``exclude``), as a container.

    Raises if a child mixes embedding collections with other parameters: split such a child in the model.
    """
    from torchrec.modules.embedding_modules import EmbeddingCollection

    excluded = {id(m) for m in exclude}
    container = nn.ModuleDict()
    for name, child in model.named_children():
        if id(child) in excluded:
            continue
        has_tables = any(isinstance(m, EmbeddingCollection) or type(m).__name__.startswith("Sharded")
                         for m in child.modules())
        if not has_tables:
            if any(True for _ in child.parameters()):
                container[name] = child
            continue
        table_params = set()
        for m in child.modules():
            if isinstance(m, EmbeddingCollection) or type(m).__name__.startswith("Sharded"):
                table_params |= {id(p) for p in m.parameters()}
        if any(id(p) not in table_params for p in child.parameters()):
            raise ValueError(f"child {name!r} mixes embedding tables and dense parameters; split it")
    return container


class DenseParallel:
    """The dense container with its gradient reduction and optimizer."""

    def __init__(self, module: nn.Module, ctx: ParallelContext, optimizer, grad_clip_norm: Optional[float],
                 megatron_ddp: Optional[nn.Module] = None, grad_sync: Optional[GradientAllReduce] = None):
        self.module = module
        self.ctx = ctx
        self.optimizer = optimizer
        self.grad_clip_norm = grad_clip_norm
        self.megatron_ddp = megatron_ddp
        self._grad_sync = grad_sync
        self._tp_partial = [p for p in module.parameters() if getattr(p, TP_PARTIAL_GRAD, False)]

    @property
    def uses_megatron(self) -> bool:
        return self.megatron_ddp is not None

    def zero_grad(self) -> None:
        if self.megatron_ddp is not None:
            self.megatron_ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def finish_grad_sync(self) -> None:
        """After backward: reduce over data parallel, then sum the TP-partial gradients over the TP group."""
        if self.megatron_ddp is not None:
            self.megatron_ddp.finish_grad_sync()
        else:
            self._grad_sync.finish_grad_sync()
        if self.ctx.tp_size > 1 and self._tp_partial:
            grads = [self._grad_of(p) for p in self._tp_partial]
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat, group=self.ctx.tp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def _grad_of(self, p: torch.Tensor) -> torch.Tensor:
        if self.megatron_ddp is not None:
            return p.main_grad
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return p.grad

    def step(self, step_optimizer: Optional[Callable[[torch.optim.Optimizer], Any]] = None
             ) -> Optional[float | torch.Tensor]:
        """Optimizer step (with gradient clipping when configured); returns the gradient norm if computed.

        Megatron's optimizer returns a float; the torch path returns a 0-dim tensor (no host sync per step).
        ``step_optimizer``: called with the torch optimizer instead of its ``step()`` (a loss scaler's step, which
        skips the update when the gradients are not finite); the Megatron path takes none."""
        if self.megatron_ddp is not None:
            if step_optimizer is not None:
                raise ValueError("a custom optimizer step (loss scaling) needs the torch optimizer path, not Megatron's")
            _, grad_norm, _ = self.optimizer.step()
            return None if grad_norm is None else float(grad_norm)
        grad_norm = None
        if self.grad_clip_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip_norm)
        if step_optimizer is None:
            self.optimizer.step()
        else:
            step_optimizer(self.optimizer)
        return grad_norm

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def fused_if_cuda(params) -> dict:
    """``fused=True`` for torch's Adam/AdamW/SGD when every parameter is on CUDA: one kernel per step instead of a
    launch per tensor group (small models are launch-bound: the ML-1M recipe's step is mostly CPU time)."""
    params = list(params)
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


def _torch_optimizer(params, opt: DenseOptimizerSettings) -> torch.optim.Optimizer:
    name = opt.optimizer.lower()
    if name in ("adam", "adamw"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(params, lr=opt.learning_rate, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                   **fused_if_cuda(params))
    if name == "sgd":
        return torch.optim.SGD(params, lr=opt.learning_rate, weight_decay=opt.weight_decay, **fused_if_cuda(params))
    raise ValueError(f"unknown dense optimizer {opt.optimizer!r}; choose adam, adamw or sgd")


def megatron_model_config(ctx: ParallelContext, params_dtype: torch.dtype = torch.float32):
    """The minimal TransformerConfig that Megatron's DDP and parallel linears read (sizes are placeholders)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=ctx.tp_size * 8, num_attention_heads=ctx.tp_size,
        tensor_model_parallel_size=ctx.tp_size, sequence_parallel=ctx.sequence_parallel,
        params_dtype=params_dtype, use_cpu_initialization=not ctx.uses_cuda, perform_initialization=False,
    )  # fmt: skip


def wrap_dense(dense: nn.Module, ctx: ParallelContext, settings: Any = None, optimizer: Any = None) -> DenseParallel:
    """Gradient reduction + optimizer for the dense parameters in ``dense`` (see the module docstring).

    ``settings``: the parallelism settings (``use_distributed_optimizer``, ``grad_reduce_in_fp32``);
    ``optimizer``: :class:`DenseOptimizerSettings` or an object with its field names (e.g. ``OptimizerArgs``; the
    trainer adds ``grad_clip_norm`` as an override).
    """
    settings = ParallelismSettings.from_args(settings)
    opt = optimizer if isinstance(optimizer, DenseOptimizerSettings) else DenseOptimizerSettings.from_args(optimizer)
    dense.to(ctx.device)
    if not ctx.uses_cuda or ctx.world_size == 1:
        # Megatron-core DDP needs CUDA, and a single process has no gradients to reduce: plain torch optimizer.
        if ctx.is_main and ctx.world_size > 1:
            logger.info("dense data parallelism on CPU: fp32 all-reduce of gradients over the DP group after "
                        "backward (Megatron-core DDP needs CUDA)")
        if settings.use_distributed_optimizer and ctx.is_main:
            logger.warning("use_distributed_optimizer is ignored on CPU (Megatron's distributed optimizer needs CUDA)")
        params = [p for p in dense.parameters() if p.requires_grad]
        return DenseParallel(dense, ctx, _torch_optimizer(params, opt), opt.grad_clip_norm,
                             grad_sync=GradientAllReduce(params, ctx.dp_group, settings.grad_reduce_in_fp32))

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = megatron_model_config(ctx)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=bool(settings.grad_reduce_in_fp32),
        use_distributed_optimizer=bool(settings.use_distributed_optimizer),
        overlap_grad_reduce=False,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=dense)
    name = opt.optimizer.lower()
    if name not in ("adam", "adamw", "sgd"):
        raise ValueError(f"unknown dense optimizer {opt.optimizer!r}; choose adam, adamw or sgd")
    opt_config = OptimizerConfig(
        optimizer="sgd" if name == "sgd" else "adam",
        lr=opt.learning_rate, weight_decay=opt.weight_decay,
        # Megatron's "adam" is AdamW (decoupled decay); plain Adam couples it, as torch.optim.Adam does.
        decoupled_weight_decay=(name != "adam"),
        adam_beta1=float(opt.betas[0]), adam_beta2=float(opt.betas[1]), adam_eps=opt.eps,
        clip_grad=float(opt.grad_clip_norm) if opt.grad_clip_norm else 0.0,
        use_distributed_optimizer=bool(settings.use_distributed_optimizer),
        params_dtype=torch.float32, bf16=False, fp16=False,
    )  # fmt: skip
    megatron_optimizer = get_megatron_optimizer(opt_config, [ddp])
    if ctx.is_main:
        logger.info("dense data parallelism: Megatron-core DDP (grad_reduce_in_fp32=%s, distributed optimizer=%s)",
                    ddp_config.grad_reduce_in_fp32, ddp_config.use_distributed_optimizer)
    return DenseParallel(dense, ctx, megatron_optimizer, opt.grad_clip_norm, megatron_ddp=ddp)

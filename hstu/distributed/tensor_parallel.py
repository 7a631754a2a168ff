"""Tensor (and sequence) parallel HSTU layers built from the single-device ``hstu.modules.HSTULayer``.

Per layer, with TP size ``t`` and ``H`` heads (``H % t == 0``), rank ``r`` holds heads ``[r H/t, (r+1) H/t)``:

* ``uvqk_proj`` -> Megatron ``ColumnParallelLinear``: the layer lays its output out head by head
  ([u_h | v_h | q_h | k_h] for every h), so a contiguous chunk of output features is a set of whole heads.
* attention runs on the local heads over all tokens (no communication).
* ``attention_norm`` (LayerNorm over all H*v features) -> :class:`TensorParallelLayerNorm`: weight/bias split like
  the heads, mean and variance all-reduced over the TP group, so the result equals the full LayerNorm.
* ``output_proj`` -> Megatron ``RowParallelLinear`` (input split by heads).

Sequence parallelism (``sequence_parallel``): between layers the residual stream ``x`` is split along tokens over
the TP group, so ``input_norm`` and the residual add run on T/t tokens per rank. The column-parallel linear
all-gathers tokens on entry and the row-parallel one reduce-scatters them on exit (Megatron's SP pattern). The
token count is padded to a multiple of ``t`` (padded rows are zeros and never reach the attention).
Without sequence parallelism ``x`` is replicated and the row-parallel output is all-reduced.

Gradients of replicated parameters that are only partial on each TP rank are marked for a TP all-reduce
(``hstu_tp_partial_grad``, done by :meth:`hstu.distributed.dense.DenseParallel.finish_grad_sync`): the SP
``input_norm`` (each rank saw some tokens) and the relative attention bias (each rank used it for its own heads).

The stack's interface is unchanged: it takes and returns the full (T, D) tokens, replicated over the TP group
(the gather at the end splits the gradient instead of reducing it, because everything after it is computed
identically on every TP rank).

Dropout inside the layer (after the gated attention) runs under Megatron's tensor-parallel RNG tracker on CUDA
(``init_parallelism(seed=...)``), so the TP ranks draw independent masks for their different features/tokens.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hstu.distributed.context import ParallelContext
from hstu.distributed.dense import TP_PARTIAL_GRAD, megatron_model_config
from hstu.modules.hstu_layer import layer_attention

logger = logging.getLogger(__name__)


def _no_init(weight: torch.Tensor) -> torch.Tensor:  # weights are copied from the single-device layer
    return weight


def _mark_tp_partial(module: Optional[nn.Module]) -> None:
    if module is None:
        return
    for p in module.parameters():
        setattr(p, TP_PARTIAL_GRAD, True)


def _dropout_rng(ctx: ParallelContext):
    if ctx.uses_cuda and ctx.tp_size > 1:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        if tracker.is_initialized():
            return tracker.fork()
        logger.warning("Megatron's TP RNG tracker is not seeded (init_parallelism(seed=...)): TP ranks share "
                       "dropout masks")
    return contextlib.nullcontext()


def _in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """Casts to the autocast dtype where Megatron's parallel linears would otherwise leak float32. Their inputs:
    the sequence-parallel backward buffers are sized from the input's dtype, so an fp32 input (LayerNorm output
    under autocast) makes that reduce-scatter mix dtypes. Their outputs: the bias is added outside autocast
    (bf16 product + fp32 bias = fp32), unlike nn.Linear, and fp32 q/k/v would send the attention to the slow
    PyTorch reference instead of the fused kernel."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):  # (the trainer uses autocast on CUDA only)
        return x.to(torch.get_autocast_dtype("cuda"))
    return x


class TensorParallelLayerNorm(nn.Module):
    """LayerNorm over a feature dimension split across the TP group (this rank holds ``local_dim`` features)."""

    def __init__(self, full: nn.LayerNorm, ctx: ParallelContext, start: int, local_dim: int):
        super().__init__()
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        self.ctx = ctx
        self.full_dim = int(full.normalized_shape[0])
        self.eps = float(full.eps)
        self.weight = nn.Parameter(full.weight.detach()[start : start + local_dim].clone().to(ctx.device))
        self.bias = nn.Parameter(full.bias.detach()[start : start + local_dim].clone().to(ctx.device))
        for p in (self.weight, self.bias):  # split like the heads: counted once per rank in the grad norm
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        # Autograd-aware all-reduce: its backward all-reduces the gradient of the statistics, which is exactly
        # the sum of every rank's contribution to d loss / d mean and d loss / d var.
        xf = x.float()
        mean = all_reduce(xf.sum(-1, keepdim=True), group=self.ctx.tp_group) / self.full_dim
        centered = xf - mean
        var = all_reduce((centered * centered).sum(-1, keepdim=True), group=self.ctx.tp_group) / self.full_dim
        y = centered * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)


class TensorParallelHSTULayer(nn.Module):
    """One HSTU layer split over the TP group (see the module docstring); built from a single-device layer."""

    def __init__(self, layer: nn.Module, ctx: ParallelContext, config=None):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        t, r = ctx.tp_size, ctx.tp_rank
        if layer.num_heads % t != 0:
            raise ValueError(f"{layer.num_heads} heads cannot be split over tensor_model_parallel_size={t}")
        config = config if config is not None else megatron_model_config(ctx)
        self.ctx = ctx
        self.sequence_parallel = ctx.sequence_parallel
        self.embedding_dim, self.qk_dim, self.v_dim = layer.embedding_dim, layer.qk_dim, layer.v_dim
        self.num_heads = layer.num_heads
        self.local_heads = layer.num_heads // t
        self.alpha, self.scaling_seqlen = layer.alpha, layer.scaling_seqlen
        self.target_group_size = layer.target_group_size
        self.dropout, self.attention_dropout = layer.dropout, layer.attention_dropout
        self.recompute = layer.recompute
        self.deterministic = bool(getattr(layer, "deterministic", False))  # reproducible attention backward

        self.input_norm = layer.input_norm.to(ctx.device)
        if self.sequence_parallel:
            _mark_tp_partial(self.input_norm)
        self.relative_attention_bias = layer.relative_attention_bias
        if self.relative_attention_bias is not None:
            self.relative_attention_bias.to(ctx.device)
            _mark_tp_partial(self.relative_attention_bias)

        head_width = 2 * self.v_dim + 2 * self.qk_dim
        rows = slice(r * self.local_heads * head_width, (r + 1) * self.local_heads * head_width)
        self.uvqk_proj = ColumnParallelLinear(
            self.embedding_dim, self.num_heads * head_width, config=config, init_method=_no_init, bias=True,
            gather_output=False, tp_group=ctx.tp_group,
        )  # fmt: skip
        features = slice(r * self.local_heads * self.v_dim, (r + 1) * self.local_heads * self.v_dim)
        self.attention_norm = TensorParallelLayerNorm(layer.attention_norm, ctx, features.start,
                                                      self.local_heads * self.v_dim)
        self.output_proj = RowParallelLinear(
            self.num_heads * self.v_dim, self.embedding_dim, config=config, init_method=_no_init, bias=False,
            input_is_parallel=True, skip_bias_add=False, tp_group=ctx.tp_group,
        )  # fmt: skip
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        with torch.no_grad():
            self.uvqk_proj.weight.copy_(layer.uvqk_proj.weight[rows])
            self.uvqk_proj.bias.copy_(layer.uvqk_proj.bias[rows])
            self.output_proj.weight.copy_(layer.output_proj.weight[:, features])
        # Megatron marks some of these itself (the bias always, the weights only when it initialises them);
        # its setter refuses to mark a tensor twice.
        for tensor, dim in ((self.uvqk_proj.weight, 0), (self.uvqk_proj.bias, 0), (self.output_proj.weight, 1)):
            if not getattr(tensor, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(tensor, is_parallel=True, dim=dim, stride=1)

    def _forward(self, x: torch.Tensor, inputs, num_tokens: int) -> torch.Tensor:
        # SP: the column-parallel projection all-gathers the tokens.
        projected, _ = self.uvqk_proj(_in_autocast_dtype(self.input_norm(x)).unsqueeze(1))
        projected = F.silu(_in_autocast_dtype(projected.squeeze(1)))
        padded_tokens = projected.shape[0]
        per_head = projected[:num_tokens].view(num_tokens, self.local_heads, -1)
        u, v, q, k = per_head.split([self.v_dim, self.v_dim, self.qk_dim, self.qk_dim], dim=-1)
        u = u.reshape(num_tokens, self.local_heads * self.v_dim)
        attn = layer_attention(self, q, k, v, inputs)
        gated = self.attention_norm(attn.reshape(num_tokens, -1)) * u
        if self.dropout > 0 and self.training:
            with _dropout_rng(self.ctx):
                gated = F.dropout(gated, p=self.dropout, training=True)
        if padded_tokens > num_tokens:
            gated = F.pad(gated, (0, 0, 0, padded_tokens - num_tokens))
        # SP: the row-parallel projection reduce-scatters back to this rank's tokens.
        out, _ = self.output_proj(_in_autocast_dtype(gated).unsqueeze(1))
        return x + out.squeeze(1)

    def forward(self, x: torch.Tensor, inputs, num_tokens: int) -> torch.Tensor:
        if self.recompute and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, inputs, num_tokens, use_reentrant=False)
        return self._forward(x, inputs, num_tokens)


class TensorParallelHSTUStack(nn.Module):
    """Drop-in replacement of ``hstu.modules.HSTUStack``: full (T, D) tokens in and out on every TP rank."""

    def __init__(self, stack: nn.Module, ctx: ParallelContext, config=None):
        super().__init__()
        config = config if config is not None else megatron_model_config(ctx)
        self.ctx = ctx
        self.layers = nn.ModuleList([TensorParallelHSTULayer(layer, ctx, config) for layer in stack.layers])

    def forward(self, x: torch.Tensor, inputs) -> torch.Tensor:
        from megatron.core.tensor_parallel import (
            gather_from_sequence_parallel_region,
            scatter_to_sequence_parallel_region,
        )

        num_tokens = x.shape[0]
        if self.ctx.sequence_parallel:
            pad = (-num_tokens) % self.ctx.tp_size
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
            x = scatter_to_sequence_parallel_region(x, group=self.ctx.tp_group)
        for layer in self.layers:
            x = layer(x, inputs, num_tokens)
        if self.ctx.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.ctx.tp_group)
            x = x[:num_tokens]
        return x


def tensor_parallel_hstu(model: nn.Module, ctx: ParallelContext) -> int:
    """Replace every ``HSTUStack`` inside ``model`` by its tensor-parallel twin (in place); returns how many.

    No-op with ``tensor_model_parallel_size == 1``. Call on the model built identically on every rank (same
    seed) and before :func:`~hstu.distributed.wrap_dense`, so the TP shards are slices of the same weights.
    """
    if ctx.tp_size == 1:
        return 0
    from hstu.modules.hstu_layer import HSTUStack

    config = megatron_model_config(ctx)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, HSTUStack)]
    for name, stack in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, TensorParallelHSTUStack(stack, ctx, config))
    if not targets:
        raise ValueError("tensor_model_parallel_size > 1 but the model has no HSTUStack to split")
    return len(targets)

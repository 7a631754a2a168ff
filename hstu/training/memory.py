"""The run summary's memory report: each rank's peak allocated GPU memory on CUDA; everywhere, this rank's bytes of
parameters (and buffers), of optimizer state, and an estimate of the activations that the HSTU layers keep for
backward in the largest training step of the run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hstu.modules.encoder import EncoderConfig


def _local_bytes(value: Any) -> int:
    """Bytes this rank holds for a tensor, a ShardedTensor / DTensor (its local part) or a nested container."""
    if isinstance(value, dict):
        return sum(_local_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_local_bytes(v) for v in value)
    local_shards = getattr(value, "local_shards", None)
    if callable(local_shards):
        return sum(_local_bytes(shard.tensor) for shard in local_shards())
    to_local = getattr(value, "to_local", None)
    if callable(to_local):
        return _local_bytes(to_local())
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return 0


def optimizer_state_bytes(parallel) -> int:
    """Bytes of every optimizer's state on this rank: dense, replicated tables and the tables' fused optimizer."""
    optimizers = [parallel.dense.optimizer, parallel.sparse.fused_optimizer]
    if parallel.sparse.replicated_optimizer is not None:
        optimizers.append(parallel.sparse.replicated_optimizer)
    total = 0
    for optimizer in optimizers:
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            total += sum(_local_bytes(state) for state in inner.state.values())
    return total


def activation_bytes_estimate(config: EncoderConfig, num_tokens: int, dtype_bytes: int) -> int:
    """Activations the HSTU layers save for backward over ``num_tokens`` tokens: per token, a layer that is not
    recomputed keeps its input and LayerNorm (2·D), the u/v/q/k projection before and after SiLU
    (2·H·(2·dqk + 2·dv)), the attention output, its LayerNorm and the gated product (3·H·dv) and the output
    projection's result (D); a recomputed layer keeps its input (D). ``recompute_input_norm`` drops the LayerNorm
    (D) and ``recompute_silu`` the projection after SiLU (H·(2·dqk + 2·dv)) from a layer that is not recomputed
    whole. Attention scores are not stored (the fused kernels recompute them)."""
    c = config
    full = 3 * c.embedding_dim + 2 * c.num_heads * (2 * c.qk_dim + 2 * c.v_dim) + 3 * c.num_heads * c.v_dim
    full -= c.embedding_dim if c.recompute_input_norm else 0
    full -= c.num_heads * (2 * c.qk_dim + 2 * c.v_dim) if c.recompute_silu else 0
    recomputed = len(set(c.recompute_layers))
    per_token = (c.num_layers - recomputed) * full + recomputed * c.embedding_dim
    return int(num_tokens) * per_token * dtype_bytes


def memory_report(ctx, model: nn.Module, parallel, config: EncoderConfig, max_step_tokens: int,
                  dtype_bytes: int) -> dict:
    """Collective on CUDA (every rank's peak is gathered). Keys: ``parameter_bytes``, ``optimizer_state_bytes``,
    ``activation_bytes_estimate`` (this rank), and on CUDA ``peak_allocated_bytes_per_rank`` (a list by rank)."""
    report = {
        "parameter_bytes": _local_bytes(model.state_dict()),
        "optimizer_state_bytes": optimizer_state_bytes(parallel),
        "activation_bytes_estimate": activation_bytes_estimate(config, max_step_tokens, dtype_bytes),
    }
    if ctx.device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(ctx.device))
        peaks = [peak]
        if ctx.world_size > 1:
            peaks = [None] * ctx.world_size
            torch.distributed.all_gather_object(peaks, peak)
        report["peak_allocated_bytes_per_rank"] = peaks
    return report


def format_memory(report: dict) -> str:
    gib = 2.0 ** 30
    text = (f"[hstu] memory (this rank): parameters {report['parameter_bytes'] / gib:.3f} GiB, optimizer state "
            f"{report['optimizer_state_bytes'] / gib:.3f} GiB, activations of the largest step ~"
            f"{report['activation_bytes_estimate'] / gib:.3f} GiB (estimate)")
    if "peak_allocated_bytes_per_rank" in report:
        text += "; peak allocated per rank: " + ", ".join(
            f"{p / gib:.2f} GiB" for p in report["peak_allocated_bytes_per_rank"])
    return text


__all__ = ["activation_bytes_estimate", "format_memory", "memory_report", "optimizer_state_bytes"]

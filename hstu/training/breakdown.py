"""Where the time of a profiled window of training steps goes: attention, GEMMs, embeddings, optimizer, collectives,
other work and idle, per step and as shares of the window.

Input: the events of a finished ``torch.profiler.profile`` (``profile.events()``) and the window's wall time.

* On CUDA the busy time is device time: every kernel, memcpy and memset on the GPU (the device's annotation ranges
  are left out), each counted with its own duration. A kernel is classified by its own name and by the names of the
  host op that launched it and that op's enclosing ops (``record_function`` ranges included).
* On CPU the busy time is host time: every profiled host op counted with its self time (its duration less its
  child ops'), classified by its own name and the names of its enclosing ops.

``idle`` is the window's wall time less the union of the busy intervals (time in which no kernel runs, or on CPU no
profiled op). Streams or threads that run concurrently make the category times add up to more than that union;
the excess is reported as ``overlap_ms``, and the shares are taken of categories + idle so that they sum to 1.

:data:`CATEGORY_RULES` is the rule table, tried in order; the first category with a pattern matching any of the
event's names (its own, then its enclosing ops' from the innermost out) wins, else ``other``.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from torch.autograd import DeviceType

OTHER = "other"  # jagged ops, elementwise, normalisation, copies, host work: everything the rules leave over
IDLE = "idle"

# (category, pattern), tried in order: the first category whose pattern matches (re.search) one of an event's
# names wins. Attention comes first so that the GEMMs of the reference attention count as attention; the
# embeddings before the collectives so that TorchRec's all-to-alls (input / output distribution) count as
# embedding work.
CATEGORY_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("attention", re.compile(
        r"hstu::hstu_attention|hstu::cached_attention|_HstuAttention|HstuCachedAttention"  # our ops and autograd
        r"|\bhstu_(fwd|bwd|dq|dropout|cached)\w*kernel"  # our extension's kernels (csrc/hstu_attention)
        r"|scaled_dot_product|flash_fwd|flash_bwd|fmha|efficient_attention", re.IGNORECASE)),
    ("embeddings", re.compile(
        r"embedding"  # aten::embedding(_dense_backward), EmbeddingBackward0, fbgemm TBE ops and split_embedding_*
        r"|\btbe\b|bounds_check_indices|linearize_cache_indices|lxu_cache|block_bucketize_sparse|permute_2D_sparse"
        r"|permute_1D_sparse|permute_sparse_features|sparse_data_dist|input_dist|output_dist|all2all|all_?to_?all"
        r"|alltoall|SendRecv", re.IGNORECASE)),
    ("collectives", re.compile(
        r"nccl|c10d::|gloo|all_?reduce|all_?gather|reduce_?scatter", re.IGNORECASE)),
    ("optimizer", re.compile(
        r"^Optimizer\.(step|zero_grad)#|^## (optimizer|zero_grad)\b"  # torch.optim and TorchRec pipeline ranges
        r"|multi_tensor_apply|FusedAdam|fused_adam|_fused_adamw?_|_foreach_|Adam\w*Functor|LAMBStage|SGDFunctor",
        re.IGNORECASE)),
    ("gemm", re.compile(
        r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|_scaled_mm|_addmm_activation|addmv|mv|dot|linear)$"
        r"|gemm|gemv|cutlass|cublas|nvjet|xmma|splitKreduce", re.IGNORECASE)),
)

CATEGORIES = tuple(name for name, _ in CATEGORY_RULES) + (OTHER,)


def classify(names: Sequence[str]) -> str:
    """The category of an event whose own name is ``names[0]`` and whose enclosing ops are ``names[1:]``."""
    for category, pattern in CATEGORY_RULES:
        if any(pattern.search(name) for name in names):
            return category
    return OTHER


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def _names(event, launcher) -> list[str]:
    names = [event.name]
    parent = launcher if launcher is not None else event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def step_breakdown(events: Iterable, wall_seconds: float, steps: int, device_type: str) -> dict:
    """The breakdown of a profiled window of ``steps`` steps lasting ``wall_seconds`` (see the module docstring).

    ``device_type``: "cuda" summarises the GPU's kernels (device time), anything else the host ops (CPU time).
    Returns ``{"time": "device" | "cpu", "steps", "window_ms", "busy_ms", "overlap_ms", "ms_per_step": {category:
    ms}, "share": {category: fraction}}`` over :data:`CATEGORIES` and ``idle``; the shares sum to 1."""
    if steps < 1:
        raise ValueError(f"steps={steps}: a profiled window has at least one step")
    if not wall_seconds > 0:
        raise ValueError(f"wall_seconds={wall_seconds}: a profiled window lasts a positive time")
    events = list(events)
    on_device = device_type == "cuda"
    by_correlation = {e.id: e for e in events
                      if e.device_type == DeviceType.CPU and not e.is_async and e.linked_correlation_id == 0}
    totals_us = {name: 0.0 for name in CATEGORIES}
    intervals: list[tuple[float, float]] = []
    for event in events:
        if on_device:
            if event.device_type != DeviceType.CUDA or event.is_user_annotation:
                continue
            duration = event.time_range.end - event.time_range.start
            names = _names(event, by_correlation.get(event.linked_correlation_id))
        else:
            if event.device_type != DeviceType.CPU or event.is_async:
                continue
            duration = event.self_cpu_time_total
            names = _names(event, None)
        if duration <= 0:
            continue
        totals_us[classify(names)] += duration
        intervals.append((event.time_range.start, event.time_range.end))
    window_us = 1e6 * wall_seconds
    busy_us = _union_length(intervals)
    totals_us[IDLE] = max(window_us - busy_us, 0.0)
    accounted = sum(totals_us.values())
    return {
        "time": "device" if on_device else "cpu",
        "steps": steps,
        "window_ms": round(window_us / 1e3, 3),
        "busy_ms": round(busy_us / 1e3, 3),
        "overlap_ms": round(max(sum(totals_us.values()) - totals_us[IDLE] - busy_us, 0.0) / 1e3, 3),
        "ms_per_step": {name: round(us / 1e3 / steps, 4) for name, us in totals_us.items()},
        "share": {name: (us / accounted if accounted > 0 else 0.0) for name, us in totals_us.items()},
    }


def format_breakdown(breakdown: Optional[dict]) -> str:
    """One line per category: ms per step and share of the window; the first line says which time it is."""
    if not breakdown:
        return ""
    kind = "GPU device time" if breakdown["time"] == "device" else "CPU time (no GPU: host ops)"
    lines = [f"[hstu] step breakdown over {breakdown['steps']} profiled steps ({kind}; "
             f"{breakdown['window_ms'] / breakdown['steps']:.2f} ms per step wall):"]
    for name, ms in breakdown["ms_per_step"].items():
        lines.append(f"  {name:<12}{ms:>12.3f} ms/step {100 * breakdown['share'][name]:>7.1f}%")
    return "\n".join(lines)

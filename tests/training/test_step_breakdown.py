"""The per-category breakdown of a profiled window (hstu/training/breakdown.py): the rule table on the kernel and op
names the training step produces, and the arithmetic on device and host timelines built from torch.profiler's own
event type."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from hstu.training.breakdown import CATEGORIES, IDLE, classify, format_breakdown, step_breakdown


@pytest.mark.parametrize("names, category", [
    # our extension's kernels and ops (csrc/hstu_attention, hstu.ops.hstu_attention) and the CPU reference under them
    (["void hstu_fwd_sm90_ws_kernel<Traits<128, 64, 256> >(AttnParams)"], "attention"),
    (["void hstu_bwd_dkdv_kernel<BwdTraits>(AttnParams)"], "attention"),
    (["hstu_dq_convert_kernel"], "attention"),
    (["aten::bmm", "hstu::hstu_attention_forward", "_HstuAttention"], "attention"),
    (["aten::mul", "autograd::engine::evaluate_function: _HstuAttentionBackward"], "attention"),
    # cuBLAS / cuBLASLt / CUTLASS GEMMs, and the host matmul ops
    (["sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off"], "gemm"),
    (["nvjet_tst_128x256_64x4_2x1_v_bz_coopA_NNT"], "gemm"),
    (["void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_256x128_32x3_tn_align8>(Params)"], "gemm"),
    (["ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_64x4_tn"], "gemm"),
    (["aten::addmm", "aten::linear"], "gemm"),
    (["aten::mm", "autograd::engine::evaluate_function: MmBackward0"], "gemm"),
    # FBGEMM's TBE and TorchRec's input / output distribution
    (["void fbgemm_gpu::split_embedding_codegen_forward_unweighted_kernel<float, c10::BFloat16>()"], "embeddings"),
    (["split_embedding_backward_codegen_adam_unweighted_kernel_cta_per_row_1"], "embeddings"),
    (["bounds_check_indices_kernel_v2"], "embeddings"),
    (["ncclDevKernel_SendRecv(ncclDevComm*, unsigned long, ncclWork*)", "c10d::alltoall_base_",
      "## all2all_data:kjt lengths ##"], "embeddings"),
    (["aten::index_select", "aten::embedding"], "embeddings"),
    (["aten::embedding_dense_backward", "autograd::engine::evaluate_function: EmbeddingBackward0"], "embeddings"),
    # dense gradient reduction
    (["ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevComm*, unsigned long, ncclWork*)"], "collectives"),
    (["aten::div_", "c10d::allreduce_"], "collectives"),
    # optimizers: torch.optim's ranges and foreach / fused kernels, TorchRec's pipeline ranges
    (["void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, "
      "FusedAdamMathFunctor<float, 4, ADAM_MODE::ADAMW, false>>()"], "optimizer"),
    (["aten::lerp_", "aten::_foreach_lerp_"], "optimizer"),
    (["aten::addcdiv_", "Optimizer.step#AdamW.step"], "optimizer"),
    (["aten::zero_", "Optimizer.zero_grad#Adam.zero_grad"], "optimizer"),
    (["aten::sqrt", "## optimizer 3 ##"], "optimizer"),
    # what is left: jagged ops, elementwise, normalisation, copies
    (["void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>()"], "other"),
    (["aten::native_layer_norm", "aten::layer_norm"], "other"),
    (["Memcpy HtoD (Pinned -> Device)", "aten::copy_", "## copy_batch_to_gpu 2 ##"], "other"),
    (["norm_kernel", "hstu_layer::uvqk_forward", "## forward ##"], "other"),
    (["aten::broadcast_tensors"], "other"),
])
def test_rule_table(names, category):
    assert classify(names) == category


def _event(name, start, end, device=DeviceType.CPU, correlation=0, linked=0, annotation=False, parent=None):
    event = FunctionEvent(id=correlation, name=name, thread=1, start_us=start, end_us=end, device_type=device,
                          linked_correlation_id=linked, is_user_annotation=annotation)
    if parent is not None:
        event.set_cpu_parent(parent)
        parent.append_cpu_child(event)
    return event


def test_device_time_by_launching_op_with_idle_and_overlap():
    """2 steps in a 1 ms window; a kernel is classified by the host ops that launched it; kernels of two streams
    overlap by 50 us; the device's annotation ranges are left out."""
    forward = _event("## forward ##", 0, 900, annotation=True)
    attention = _event("hstu::hstu_attention_forward", 10, 100, correlation=7, parent=forward)
    gemm = _event("aten::mm", 110, 150, correlation=8, parent=forward)
    optim = _event("Optimizer.step#Adam.step", 500, 600)
    foreach = _event("aten::_foreach_add_", 510, 520, correlation=9, parent=optim)
    device = [
        _event("at::native::elementwise_kernel", 100, 200, DeviceType.CUDA, linked=7),  # under the attention op
        _event("nvjet_tst_64x8_64x16_4x1_v_bz_TNT", 200, 350, DeviceType.CUDA, linked=8),
        _event("split_embedding_codegen_forward_unweighted_kernel", 300, 400, DeviceType.CUDA, linked=999),
        _event("multi_tensor_apply_kernel", 600, 700, DeviceType.CUDA, linked=9),
        _event("## forward ##", 0, 900, DeviceType.CUDA, annotation=True),  # gpu_user_annotation: not a kernel
    ]
    got = step_breakdown([forward, attention, gemm, optim, foreach] + device, wall_seconds=1e-3, steps=2,
                         device_type="cuda")
    assert got["time"] == "device" and got["steps"] == 2
    assert got["busy_ms"] == pytest.approx(0.4) and got["overlap_ms"] == pytest.approx(0.05)
    per_step = got["ms_per_step"]
    assert per_step == pytest.approx({"attention": 0.05, "embeddings": 0.05, "collectives": 0.0, "optimizer": 0.05,
                                      "gemm": 0.075, "other": 0.0, IDLE: 0.3})
    assert sum(got["share"].values()) == pytest.approx(1.0)
    assert got["share"][IDLE] == pytest.approx(0.6 / 1.05)
    assert "GPU device time" in format_breakdown(got)


def test_cpu_time_counts_self_time_of_nested_ops():
    outer = _event("aten::linear", 0, 100)
    _event("aten::addmm", 10, 90, parent=outer)
    layer_norm = _event("aten::layer_norm", 200, 300)
    got = step_breakdown([outer, outer.cpu_children[0], layer_norm], wall_seconds=4e-4, steps=1, device_type="cpu")
    assert got["time"] == "cpu" and got["busy_ms"] == pytest.approx(0.2) and got["overlap_ms"] == 0
    # aten::linear's own 20 us outside addmm and addmm's 80 us are GEMM time; layer_norm is "other"
    assert got["ms_per_step"] == pytest.approx({**{c: 0.0 for c in CATEGORIES}, "gemm": 0.1, "other": 0.1,
                                                IDLE: 0.2})
    assert "CPU time" in format_breakdown(got)


@pytest.mark.parametrize("kwargs, field", [(dict(wall_seconds=0.0, steps=1), "wall_seconds"),
                                           (dict(wall_seconds=1.0, steps=0), "steps")])
def test_an_empty_window_is_a_named_error(kwargs, field):
    with pytest.raises(ValueError, match=field):
        step_breakdown([], device_type="cpu", **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_kernels_are_classified():
    """torch.profiler on the GPU: a cuBLAS GEMM, an embedding lookup and a fused Adam step land in their categories."""
    import time

    device = torch.device("cuda")
    table = torch.nn.Embedding(1000, 64).to(device)
    weight = torch.nn.Parameter(torch.randn(64, 64, device=device))
    optimizer = torch.optim.Adam([weight, *table.parameters()], fused=True)
    ids = torch.randint(0, 1000, (4096,), device=device)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        (table(ids) @ weight).square().mean().backward()
        optimizer.step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    got = step_breakdown(prof.events(), elapsed, 1, "cuda")
    assert got["time"] == "device"
    for category in ("gemm", "embeddings", "optimizer"):
        assert got["ms_per_step"][category] > 0, (category, got)
    assert got["ms_per_step"]["attention"] == 0 and sum(got["share"].values()) == pytest.approx(1.0)

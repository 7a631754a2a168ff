"""Microbenchmark of the fused HSTU attention kernels (forward, backward, forward+backward TFLOP/s).

FLOPs follow the FlashAttention convention: fwd = 4 * sum_b L_b^2 * H * D (x 1/2 when causal), bwd = 2.5 x fwd.
Times are triton.testing.do_bench medians (CUDA events); the kernels' fwd, bwd and fwd+bwd are timed round-robin, three
rounds, median round. The same run measures the bf16 GEMM peak (8192^3) and,
where it fits in memory, the PyTorch reference. Writes benchmarks/results/attention_<gpu>.json and a PNG.

    python benchmarks/bench_attention.py [--out DIR] [--quick] [--no-reference] [--profile] [--sweep]
                                         [--triton-baseline]

--triton-baseline times Meta's Triton kernel (`triton_hstu_mha` from generative-recommenders, which must be
importable: pip install it or put a checkout on PYTHONPATH) side by side with these kernels on the shapes without
contexts, targets or rab, round-robin in the same rounds, and checks that both forwards agree;
--profile adds a per-kernel breakdown (torch.profiler: forward, backward, the dq workspace's fill and conversion);
--sweep adds kernel fwd / bwd over sequence lengths at a fixed token count (JSON key "length_sweep");
--rab-tables adds, for the five shapes and 128x200x1x64, fwd+bwd through the public op and its peak memory with no
bias, with the dense (B, 1, L, L) rab gathered from weight tables (the models' former path) and with the tables
themselves (hstu_attention(rab_tables=...); JSON key "rab_tables"; each row names the path that ran).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import re
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hstu.ops import hstu_attention  # noqa: E402
from hstu.ops.hstu_attention import cuda as hstu_cuda  # noqa: E402
from hstu.ops.hstu_attention.args import AttentionArgs  # noqa: E402
from hstu.ops.hstu_attention.reference import hstu_attention_reference  # noqa: E402

# name, B, L, H, D, jagged, extra kwargs
SHAPES = [
    ("32x4096x4x256", 32, 4096, 4, 256, False, {}),
    ("32x4096x4x128", 32, 4096, 4, 128, False, {}),
    ("16x8192x4x128", 16, 8192, 4, 128, False, {}),
    ("64x1024x4x128", 64, 1024, 4, 128, False, {}),
    ("jagged 32x4096x4x128", 32, 4096, 4, 128, True, {}),
    ("128x200x1x64", 128, 200, 1, 64, False, {}),
    ("32x4096x4x128 ctx+tgt", 32, 4096, 4, 128, False, {"contexts": 16, "targets": 256}),
    ("32x4096x4x128 rab", 32, 4096, 4, 128, False, {"rab_heads": 1}),  # HSTU's relative attention bias, 1 head
]


def do_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def do_bench_interleaved(fns, rounds: int = 3) -> list[float]:
    """do_bench of each callable, round-robin for `rounds` rounds; the median round of each. The card's clock drifts
    between measurements a few seconds apart, so times meant to be compared (fwd, bwd, fwd+bwd) are taken side by side
    rather than one after the other."""
    times = [[] for _ in fns]
    for _ in range(rounds):
        for t, fn in zip(times, fns):
            t.append(do_bench(fn))
    return [sorted(t)[len(t) // 2] for t in times]


def make_inputs(B, L, H, D, jagged, extra, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if jagged:
        lengths = torch.randint(L // 4, L + 1, (B,), generator=g, device="cuda")
    else:
        lengths = torch.full((B,), L, device="cuda")
    offsets = torch.zeros(B + 1, dtype=torch.int32, device="cuda")
    offsets[1:] = torch.cumsum(lengths, 0)
    T = int(offsets[-1])
    q, k, v = (torch.randn(T, H, D, device="cuda", dtype=dtype, generator=g) * 0.5 for _ in range(3))
    kwargs = {"alpha": 1.0 / math.sqrt(D), "causal": True}
    if "contexts" in extra:
        kwargs["num_contexts"] = torch.full((B,), extra["contexts"], dtype=torch.int32, device="cuda")
    if "targets" in extra:
        kwargs["num_targets"] = torch.full((B,), extra["targets"], dtype=torch.int32, device="cuda")
    if "rab_heads" in extra:
        kwargs["rab"] = torch.randn(B, extra["rab_heads"], L, L, device="cuda", dtype=dtype, generator=g) * 0.5
    return q, k, v, offsets, lengths, kwargs


def kernel_args(q, k, v, offsets, L, kwargs, deterministic=False) -> AttentionArgs:
    """The arguments of hstu_cuda.forward / backward (window -1, group size 1, no dropout)."""
    return AttentionArgs(q, k, v, offsets, L, kwargs["alpha"], L, kwargs["causal"],
                         num_contexts=kwargs.get("num_contexts"), num_targets=kwargs.get("num_targets"),
                         rab=kwargs.get("rab"), deterministic=deterministic)  # fmt: skip


def flops_fwd(lengths, H, D, causal=True) -> float:
    total = float((lengths.double() ** 2).sum()) * 4 * H * D
    return total / 2 if causal else total


def time_impl(fn, q, k, v, offsets, L, kwargs):
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qg, kg, vg, offsets, L, **kwargs)
    dout = torch.randn_like(out)
    t_fwd = do_bench(lambda: fn(q, k, v, offsets, L, **kwargs))

    def fwd_bwd():
        o = fn(qg, kg, vg, offsets, L, **kwargs)
        torch.autograd.grad(o, (qg, kg, vg), dout)

    out = fn(qg, kg, vg, offsets, L, **kwargs)
    t_bwd = do_bench(lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True))
    t_fb = do_bench(fwd_bwd)
    return t_fwd, t_bwd, t_fb


def time_kernel(q, k, v, offsets, L, kwargs, others=()):
    """The fused kernels called directly (no autograd / argument validation in the timed region).

    Backward as the op runs it by default (deterministic=False: atomic dq); also returns the deterministic
    (split dk/dv + dq kernels) backward time, then the times of `others` (callables timed in the same rounds).
    """
    args = {det: kernel_args(q, k, v, offsets, L, kwargs, deterministic=det) for det in (False, True)}
    dout = torch.randn_like(q)

    def fwd():
        return hstu_cuda.forward(args[False])

    def bwd(deterministic=False):
        return hstu_cuda.backward(dout, args[deterministic])

    def fwd_bwd():
        fwd()
        bwd()

    return tuple(do_bench_interleaved([fwd, bwd, fwd_bwd, lambda: bwd(True), *others]))


def triton_baseline():
    """Meta's Triton HSTU attention (generative-recommenders), or exit with how to get it."""
    try:
        from generative_recommenders.ops.triton.triton_hstu_attention import triton_hstu_mha
    except ImportError as err:
        raise SystemExit(f"--triton-baseline needs generative-recommenders importable (pip install it, or a checkout "
                         f"on PYTHONPATH): {err}") from None
    return triton_hstu_mha


def triton_callables(mha, q, k, v, offsets, L, kwargs):
    """fwd, bwd and fwd+bwd of triton_hstu_mha (causal, no contexts / targets / rab) through its autograd function, as
    a model calls it; the first call autotunes both passes."""
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn_like(q)
    alpha = kwargs["alpha"]
    torch.autograd.grad(mha(L, alpha, qg, kg, vg, offsets), (qg, kg, vg), dout)
    kept = mha(L, alpha, qg, kg, vg, offsets)
    return (lambda: mha(L, alpha, q, k, v, offsets),
            lambda: torch.autograd.grad(kept, (qg, kg, vg), dout, retain_graph=True),
            lambda: torch.autograd.grad(mha(L, alpha, qg, kg, vg, offsets), (qg, kg, vg), dout))


def time_kernel_forward(q, k, v, offsets, L, kwargs, variant=None) -> float:
    """The kernel forward with an explicit KernelVariant (None: the default choice)."""
    args = kernel_args(q, k, v, offsets, L, kwargs)
    return do_bench(lambda: hstu_cuda.forward(args, variant=variant))


def time_kernel_atomic_backward(q, k, v, offsets, L, kwargs, variant=None) -> float:
    args = kernel_args(q, k, v, offsets, L, kwargs)
    dout = torch.randn_like(q)
    return do_bench(lambda: hstu_cuda.backward(dout, args, variant=variant))


def plan_of(direction: str, q, batch: int, L: int, kwargs, variant=None) -> dict:
    """hstu_cuda.kernel_plan of a benchmark shape: q (T, H, D), `batch` sequences of at most L tokens."""
    return hstu_cuda.kernel_plan(direction, head_dim=q.shape[-1], batch=batch, heads=q.shape[1], max_seqlen=L,
                                 dtype=q.dtype, rab=kwargs.get("rab") is not None, variant=variant)  # fmt: skip


def profile_breakdown() -> None:
    """Average CUDA time per kernel (forward, dk/dv, dq, the dq workspace's fill and conversion) for the two head dims
    of the headline shapes and the short-sequence shape."""
    from torch.profiler import ProfilerActivity, profile

    for B, L, H, D in ((32, 4096, 4, 128), (32, 4096, 4, 256), (64, 1024, 4, 128)):
        q, k, v, offsets, lengths, kwargs = make_inputs(B, L, H, D, False, {})
        args = {det: kernel_args(q, k, v, offsets, L, kwargs, deterministic=det) for det in (False, True)}
        dout = torch.randn_like(q)
        for det in (False, True):
            hstu_cuda.forward(args[det])
            hstu_cuda.backward(dout, args[det])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                hstu_cuda.forward(args[False])
                hstu_cuda.backward(dout, args[False])  # atomic dq
                hstu_cuda.backward(dout, args[True])  # split, deterministic
            torch.cuda.synchronize()
        fl = flops_fwd(lengths, H, D)
        for evt in prof.key_averages():
            if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA or "hstu" in evt.key:
                ms = evt.device_time / 1e3 if hasattr(evt, "device_time") else evt.cuda_time / 1e3
                name = re.sub(r"<.*|\(.*", "", evt.key.replace("void ", "").replace("hstu::", "").replace("at::native::", ""))
                last = re.search(r"(true|false)>\s*(\(|$)", evt.key)  # dkdv: <traits, pass, dropout, atomic dq>
                if "dkdv" in evt.key and last:
                    name += " atomic" if last.group(1) == "true" else " split"
                print(f"  profile {B}x{L}x{H}x{D} {name:28s} {ms:7.3f} ms/call  ({evt.count} calls)"
                      f"  = {fl / ms / 1e9:6.1f} fwd-equivalent TFLOP/s", flush=True)
        del q, k, v, args
        torch.cuda.empty_cache()


SWEEP_TOKENS = 131072
SWEEP_LENGTHS = (256, 512, 1024, 2048, 4096)


def length_sweep(H: int = 4, D: int = 128) -> list[dict]:
    """Kernel fwd / bwd TFLOP/s over the sequence length at a fixed token count (B = SWEEP_TOKENS / L), causal and
    not. Per-block costs (load prologue, epilogue) and the causal diagonal tiles weigh more the shorter the sequence:
    fitting these times against the number of tile steps, blocks and diagonal tiles separates them."""
    rows = []
    for causal in (True, False):
        for L in SWEEP_LENGTHS:
            B = SWEEP_TOKENS // L
            q, k, v, offsets, lengths, kwargs = make_inputs(B, L, H, D, False, {})
            kwargs["causal"] = causal
            args = kernel_args(q, k, v, offsets, L, kwargs)
            dout = torch.randn_like(q)
            fns = [lambda: hstu_cuda.forward(args), lambda: hstu_cuda.backward(dout, args)]
            if plan_of("forward", q, B, L, kwargs)["kernel"] != "sm80" and D <= 128:
                # both warp-specialized forward shapes, forced
                variants = [hstu_cuda.KernelVariant(forward_two_per_sm=two) for two in (False, True)]
                fns += [lambda var=var: hstu_cuda.forward(args, variant=var) for var in variants]
            tf, tb, *tws = do_bench_interleaved(fns)
            fl = flops_fwd(lengths, H, D, causal)
            rows.append({"B": B, "L": L, "H": H, "D": D, "causal": causal, "fwd_ms": tf, "bwd_ms": tb,
                         "fwd_tflops": fl / tf / 1e9, "bwd_tflops": 2.5 * fl / tb / 1e9,
                         **({"fwd_ping_pong_tflops": fl / tws[0] / 1e9, "fwd_two_per_sm_tflops": fl / tws[1] / 1e9}
                            if tws else {})})  # fmt: skip
            print(f"  sweep {'causal' if causal else 'full  '} {B:4d}x{L:<5d} fwd {rows[-1]['fwd_tflops']:6.1f}"
                  f"  bwd {rows[-1]['bwd_tflops']:6.1f} TFLOP/s  (ms {tf:.3f}/{tb:.3f})"
                  + (f"  fwd ping-pong {fl / tws[0] / 1e9:6.1f}  two per SM {fl / tws[1] / 1e9:6.1f}" if tws else ""),
                  flush=True)  # fmt: skip
            del q, k, v, dout, args
            torch.cuda.empty_cache()
    return rows


RAB_TABLE_SHAPES = ("32x4096x4x256", "32x4096x4x128", "16x8192x4x128", "64x1024x4x128", "jagged 32x4096x4x128",
                    "128x200x1x64")  # fmt: skip


def _bias_tables(q, offsets, L: int, num_buckets: int = 128):
    """Position and time weight tables as the models hold them (float32, shared by the heads, requiring grad) and
    per-token timestamps one to 10^5 seconds apart."""
    from hstu.ops.hstu_attention import RelativeBiasTables

    g = torch.Generator(device="cpu").manual_seed(7)
    times = torch.cumsum(torch.randint(1, 10**5, (q.shape[0],), generator=g), 0).to(q.device)
    pos = (0.02 * torch.randn(2 * L - 1, generator=g)).to(q.device).requires_grad_()
    time = (0.02 * torch.randn(num_buckets + 1, generator=g)).to(q.device).requires_grad_()
    return RelativeBiasTables(pos, time, times)


def _dense_from_tables(tables, offsets, L: int):
    """The dense (B, 1, L, L) bias gathered from the tables (in q's dtype at the op), as the layers built it."""
    from hstu.modules.positional import RelativeAttentionBias, gather_weights

    buckets = RelativeAttentionBias.time_bucket_matrix(tables.timestamps, offsets, L, tables.time_weights.numel() - 1,
                                                       "query")  # fmt: skip
    i = torch.arange(L, device=buckets.device)
    index = (i.view(-1, 1) - i.view(1, -1)) + L - 1
    return (gather_weights(tables.time_weights, buckets) + gather_weights(tables.position_weights, index)).unsqueeze(1)


def rab_table_rows(shapes) -> list[dict]:
    """Issue 25's Speed (a): fwd+bwd of the public op (time, peak memory) without bias, with the dense rab and with
    the bias tables, per shape. A variant that does not fit in memory is recorded as such."""
    rows = []
    for name, B, L, H, D, jagged, extra in shapes:
        if name not in RAB_TABLE_SHAPES:
            continue
        q, k, v, offsets, lengths, kwargs = make_inputs(B, L, H, D, jagged, extra)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        tables = _bias_tables(q, offsets, L)
        variants = {
            "none": lambda: hstu_attention(q, k, v, offsets, L, **kwargs),
            "dense_rab": lambda: hstu_attention(q, k, v, offsets, L, rab=_dense_from_tables(tables, offsets, L).to(
                q.dtype), **kwargs),
            "tables": lambda: hstu_attention(q, k, v, offsets, L, rab_tables=tables, **kwargs),
        }
        row = {"shape": name, "B": B, "L": L, "H": H, "D": D, "jagged": jagged,
               "tables_path": "reference" if hstu_cuda.unsupported_reason(q, k, v, None, 0.0) is not None
               or not hstu_cuda.build_info().get("rab_tables", False) else "kernel"}  # fmt: skip
        for key, forward in variants.items():
            def step():
                forward().backward(dout)
            dout = torch.randn(q.shape[0], H, v.shape[-1], device=q.device, dtype=q.dtype)
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row[f"{key}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                row[f"{key}_fwdbwd_ms"] = do_bench(step)
            except torch.OutOfMemoryError:
                row[f"{key}_fwdbwd_ms"] = "out of memory"
            torch.cuda.empty_cache()
        if isinstance(row.get("tables_fwdbwd_ms"), float) and isinstance(row.get("none_fwdbwd_ms"), float):
            row["tables_overhead_vs_none"] = row["tables_fwdbwd_ms"] / row["none_fwdbwd_ms"] - 1.0
        print(f"{name:>24} rab tables ({row['tables_path']}): " + "  ".join(
            f"{key} {row.get(f'{key}_fwdbwd_ms')} ms / {row.get(f'{key}_peak_mib', float('nan')):.0f} MiB"
            if isinstance(row.get(f"{key}_fwdbwd_ms"), float) else f"{key} {row.get(f'{key}_fwdbwd_ms')}"
            for key in variants))  # fmt: skip
        rows.append(row)
    return rows


def gemm_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--quick", action="store_true", help="first three shapes only")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--profile", action="store_true", help="per-kernel time breakdown (torch.profiler) of three shapes")
    ap.add_argument("--sweep", action="store_true",
                    help=f"also kernel fwd / bwd over L = {SWEEP_LENGTHS} at {SWEEP_TOKENS} tokens, causal and not")
    ap.add_argument("--only", default="", help="regex: benchmark only the shapes whose name matches")
    ap.add_argument("--no-op", action="store_true", help="skip timing the public op (autograd + validation)")
    ap.add_argument("--single-role-forward", action="store_true",
                    help="also time the wgmma forward without warp specialization")
    ap.add_argument("--bench-variants", action="store_true",
                    help="also time the benchmark-only mma.sync backward variants (8-warp dk/dv at head dim 128, "
                         "two-pass head dim 256; needs a build with HSTU_BENCH_VARIANTS=1)")
    ap.add_argument("--triton-baseline", action="store_true",
                    help="also time Meta's Triton triton_hstu_mha (generative-recommenders) in the same rounds")
    ap.add_argument("--label", default=os.environ.get(
        "HSTU_BENCH_LABEL", "default kernels (csrc/hstu_attention/heuristics.h): warp-specialized wgmma forward (two "
        "per SM up to 256 tokens, persistent at head dims 64 / 128), wgmma backward"))
    ap.add_argument("--plot", metavar="JSON", help="only redraw the PNG of a saved results JSON (next to it)")
    ap.add_argument("--rab-tables", action="store_true",
                    help="also time the public op with no bias, the dense rab and the bias tables (issue 25, Speed a)")
    args = ap.parse_args()
    if args.plot:
        path = pathlib.Path(args.plot)
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py: needs a CUDA GPU (none is visible); nothing was measured")
    gpu = torch.cuda.get_device_name()
    mha = triton_baseline() if args.triton_baseline else None
    rows = []
    peak = gemm_peak()
    print(f"GPU {gpu}  torch {torch.__version__}  CUDA {torch.version.cuda}  bf16 GEMM 8192^3: {peak:.0f} TFLOP/s")
    shapes = SHAPES[:3] if args.quick else SHAPES
    if args.only:
        shapes = [s for s in shapes if re.search(args.only, s[0])]
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    result = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
              "label": args.label, "gemm_bf16_tflops": peak, "dtype": "bfloat16", "causal": True, "rows": rows}
    for name, B, L, H, D, jagged, extra in shapes:
        q, k, v, offsets, lengths, kwargs = make_inputs(B, L, H, D, jagged, extra)
        reason = hstu_cuda.unsupported_reason(q, k, v, kwargs.get("rab"), 0.0)
        fl = flops_fwd(lengths, H, D)
        row = {"shape": name, "B": B, "L": L, "H": H, "D": D, "jagged": jagged, **{k2: v2 for k2, v2 in extra.items()},
               "kernel": "hstu fused (cuda)" if reason is None else f"reference ({reason})"}  # fmt: skip
        if reason is None:
            triton_fns = ()
            if mha is not None and not extra:
                triton_fns = triton_callables(mha, q, k, v, offsets, L, kwargs)
                ours = hstu_cuda.forward(kernel_args(q, k, v, offsets, L, kwargs))
                row["triton_fwd_max_abs_diff"] = float((triton_fns[0]().float() - ours.float()).abs().max())
            tf, tb, tfb, tbd, *tt = time_kernel(q, k, v, offsets, L, kwargs, triton_fns)
            if tt:
                # The ratio uses fwd + bwd time of each (as the baseline numbers): Triton's timed fwd+bwd
                # callable also carries its Python launch path, which the GPU does not always hide.
                row.update(triton_fwd_ms=tt[0], triton_bwd_ms=tt[1], triton_fwdbwd_ms=tt[2],
                           triton_fwd_tflops=fl / tt[0] / 1e9, triton_bwd_tflops=2.5 * fl / tt[1] / 1e9,
                           triton_fwdbwd_tflops=3.5 * fl / tt[2] / 1e9,
                           speedup_vs_triton_fwdbwd=(tt[0] + tt[1]) / (tf + tb))  # fmt: skip
            fwd_plan, bwd_plan = plan_of("forward", q, B, L, kwargs), plan_of("backward", q, B, L, kwargs)
            row.update(bwd_det_ms=tbd, bwd_det_tflops=2.5 * fl / tbd / 1e9, fwd_kernel=fwd_plan["kernel"],
                       bwd_kernel=bwd_plan["kernel"], sm90_forward=fwd_plan["kernel"] != "sm80")  # fmt: skip
            if row["sm90_forward"]:  # the same run's mma.sync forward, for comparison
                t80 = time_kernel_forward(q, k, v, offsets, L, kwargs, hstu_cuda.KernelVariant(sm90_forward=False))
                row.update(fwd_sm80_ms=t80, fwd_sm80_tflops=fl / t80 / 1e9)
                if D <= 128:  # both warp-specialized shapes, whichever the launcher picks here
                    for key, two in (("ping_pong", False), ("two_per_sm", True)):
                        t1 = time_kernel_forward(q, k, v, offsets, L, kwargs,
                                                 hstu_cuda.KernelVariant(forward_two_per_sm=two))
                        row.update({f"fwd_{key}_ms": t1, f"fwd_{key}_tflops": fl / t1 / 1e9})
                if args.single_role_forward:  # the wgmma forward without warp specialization
                    t1 = time_kernel_forward(q, k, v, offsets, L, kwargs,
                                             hstu_cuda.KernelVariant(forward_warp_specialized=False))
                    row.update(fwd_single_role_ms=t1, fwd_single_role_tflops=fl / t1 / 1e9)
            row["sm90_backward"] = bwd_plan["kernel"] == "sm90"
            if row["sm90_backward"]:  # the same run's mma.sync atomic-dq backward, for comparison
                t80 = time_kernel_atomic_backward(q, k, v, offsets, L, kwargs,
                                                  hstu_cuda.KernelVariant(sm90_backward=False))
                row.update(bwd_sm80_ms=t80, bwd_sm80_tflops=2.5 * fl / t80 / 1e9)
            if args.bench_variants and D in (128, 256):  # the benchmark-only mma.sync backward variants
                bench = hstu_cuda.KernelVariant(sm90_backward=False, bench_bwd_warps=8, bench_d256_two_pass=True)
                t1 = time_kernel_atomic_backward(q, k, v, offsets, L, kwargs, bench)
                row.update(bwd_bench_variant=plan_of("backward", q, B, L, kwargs, bench)["dkdv"],
                           bwd_bench_variant_ms=t1, bwd_bench_variant_tflops=2.5 * fl / t1 / 1e9)  # fmt: skip
            if not args.no_op:
                _, _, ofb = time_impl(hstu_attention, q, k, v, offsets, L, kwargs)
                row["op_fwdbwd_tflops"] = 3.5 * fl / ofb / 1e9  # public op: validation + autograd included
        else:
            tf, tb, tfb = time_impl(hstu_attention, q, k, v, offsets, L, kwargs)
        row.update(fwd_ms=tf, bwd_ms=tb, fwdbwd_ms=tfb, fwd_tflops=fl / tf / 1e9, bwd_tflops=2.5 * fl / tb / 1e9,
                   fwdbwd_tflops=3.5 * fl / tfb / 1e9)  # fmt: skip
        # reference: padded (B, H, L, L) scores in fp32 chunks; only where it comfortably fits
        if not args.no_reference and B * H * L * L * 4 * 6 < 40e9:
            try:
                ref = lambda *a, **kw: hstu_attention_reference(*a, upcast=False, **kw)  # noqa: E731
                rf, rb, rfb = time_impl(ref, q, k, v, offsets, L, kwargs)
                row.update(ref_fwd_tflops=fl / rf / 1e9, ref_bwd_tflops=2.5 * fl / rb / 1e9,
                           ref_fwdbwd_tflops=3.5 * fl / rfb / 1e9)  # fmt: skip
            except torch.OutOfMemoryError:
                row["ref"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"{name:24s} fwd {row['fwd_tflops']:6.1f}  bwd {row['bwd_tflops']:6.1f}  fwd+bwd {row['fwdbwd_tflops']:6.1f}"
              f"  TFLOP/s  (ms {tf:.3f}/{tb:.3f}/{tfb:.3f})"
              + (f"  bwd(det) {row['bwd_det_tflops']:.1f}" if "bwd_det_tflops" in row else "")
              + (f"  fwd(sm80) {row['fwd_sm80_tflops']:.1f}" if "fwd_sm80_tflops" in row else "")
              + (f"  fwd(1-role) {row['fwd_single_role_tflops']:.1f}" if "fwd_single_role_tflops" in row else "")
              + (f"  fwd(ping-pong / two per SM) {row['fwd_ping_pong_tflops']:.1f} / {row['fwd_two_per_sm_tflops']:.1f}"
                 if "fwd_two_per_sm_tflops" in row else "")
              + (f"  bwd(sm80) {row['bwd_sm80_tflops']:.1f}" if "bwd_sm80_tflops" in row else "")
              + (f"  bwd(sm80 {row['bwd_bench_variant']}) {row['bwd_bench_variant_tflops']:.1f}"
                 if "bwd_bench_variant_tflops" in row else "")

              + (f"  op fwd+bwd {row['op_fwdbwd_tflops']:.1f}" if "op_fwdbwd_tflops" in row else "")
              + (f"  triton {row['triton_fwd_tflops']:.1f}/{row['triton_bwd_tflops']:.1f}/"
                 f"{row['triton_fwdbwd_tflops']:.1f} (fwd+bwd time x{row['speedup_vs_triton_fwdbwd']:.2f},"
                 f" fwd diff {row['triton_fwd_max_abs_diff']:.2g})" if "triton_fwd_tflops" in row else "")
              + (f"  ref {row['ref_fwd_tflops']:.1f}/{row['ref_bwd_tflops']:.1f}/{row['ref_fwdbwd_tflops']:.1f}"
                 if "ref_fwd_tflops" in row else ""), flush=True)  # fmt: skip
        del q, k, v
        torch.cuda.empty_cache()
        # written after every shape, so a run cut short by a time limit keeps the shapes it measured
        (out_dir / f"attention_{tag}.json").write_text(json.dumps(result, indent=2))
    if args.profile:
        profile_breakdown()
    if args.sweep:
        result["length_sweep"] = length_sweep()
    if args.rab_tables:
        result["rab_tables"] = rab_table_rows(SHAPES)
    (out_dir / f"attention_{tag}.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / f'attention_{tag}.json'}")
    plot(result, out_dir / f"attention_{tag}.png")


def plot(result: dict, path: pathlib.Path) -> None:
    """Bar chart of a results JSON (fwd, bwd, fwd+bwd per shape, the PyTorch reference or the Triton baseline, the
    GEMM peak): written by every run, and by `--plot JSON` for a saved one."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    rows, peak = result["rows"], result["gemm_bf16_tflops"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    names = [r["shape"] for r in rows]
    width = 0.14
    series = [("fwd_tflops", "fwd"), ("bwd_tflops", "bwd"), ("fwdbwd_tflops", "fwd+bwd"),
              ("ref_fwd_tflops", "torch ref fwd"), ("ref_fwdbwd_tflops", "torch ref fwd+bwd")]  # fmt: skip
    if any("triton_fwdbwd_tflops" in r for r in rows):
        series[3:] = [("triton_fwd_tflops", "Triton fwd"), ("triton_fwdbwd_tflops", "Triton fwd+bwd")]
    for s, (key, label) in enumerate(series):
        ax.bar([i + (s - 2) * width for i in range(len(rows))], [r.get(key, 0) for r in rows], width, label=label)
    ax.axhline(peak, color="k", ls="--", lw=1, label=f"bf16 GEMM {peak:.0f}")
    ax.set_xticks(range(len(rows)), names, rotation=15, fontsize=8)
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"HSTU attention, causal, bf16 — {result['gpu']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")

if __name__ == "__main__":
    main()

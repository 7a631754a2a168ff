"""Benchmark of one HSTU layer (issue 22): forward and forward+backward latency and peak memory, bf16, batch 32,
embedding 1024, 4 heads x 256, jagged lengths at max 1K / 2K / 4K / 8K, uniform (every sequence at the maximum) and
U[L/2, L]. Writes benchmarks/results/layer_<gpu>.json; the card, torch, CUDA and the extension build go with it.

    python benchmarks/bench_layer.py [--out DIR] [--lengths 1024,2048,4096,8192] [--stu-checkout PATH]
                                     [--rounds 3] [--label TEXT]

Variants timed in the same rounds (round-robin, median round; CUDA events, median of the repetitions):
  ours          HSTULayer as the models run it (fp32 parameters under bf16 autocast, the fused attention kernels)
  ours+fused    the same layer with its output side through layer_norm_mul_dropout (one kernel for
                LayerNorm(attn) * u * dropout) and the residual add in the projection's GEMM (torch.addmm)
  ours+uvqk     ours+fused with the input side through uvqk_projection as well (LayerNorm(x), the UVQK GEMM with
                bias and SiLU in its epilogue: hstu.ops.uvqk, switched on for these calls only)
  meta_stu      Meta's STULayer (generative-recommenders, its Triton kernels) when --stu-checkout points at a
                checkout (or the package is importable and --stu is given); note that its output projection also
                takes u and x (concat_u / concat_x), a 3x wider GEMM than ours
Projection rows (variant proj_torch / proj_fused, unless --no-projection): the layer's input side alone,
LayerNorm(x) -> UVQK projection -> SiLU, as torch ops (LayerNorm, Linear, SiLU under autocast) and as the fused op,
forward and forward+backward, with the GEMMs' TFLOP/s (2 T K N forward, 3x that forward+backward).
Training mode, output dropout 0.3 as Meta's default; fwd+bwd uses a fixed random output gradient. On a machine
without a CUDA GPU the script refuses with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import sys

import contextlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH, EMBEDDING, HEADS, HEAD_DIM = 32, 1024, 4, 256
DROPOUT = 0.3


def time_ms(fn, reps: int = 20, warmup: int = 5) -> float:
    """Median of `reps` CUDA-event timings of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_mib(fn) -> float:
    """Peak memory fn() allocates beyond what is allocated before it, MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def jagged_lengths(max_len: int, distribution: str, seed: int) -> torch.Tensor:
    if distribution == "uniform":
        return torch.full((BATCH,), max_len, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(max_len // 2, max_len + 1, (BATCH,), generator=gen)


def our_layer(fused: bool):
    from hstu.modules.hstu_layer import HSTULayer

    layer = HSTULayer(EMBEDDING, HEADS, HEAD_DIM, HEAD_DIM, dropout=DROPOUT).cuda().train()
    if fused:
        from hstu.ops.norm_mul_dropout import layer_norm_mul_dropout

        def combine(x, attn, u):
            gated = layer_norm_mul_dropout(
                attn.reshape(-1, layer.num_heads * layer.v_dim), u, layer.attention_norm.weight,
                layer.attention_norm.bias, eps=layer.attention_norm.eps, dropout_p=layer.dropout,
                training=layer.training,
            )  # fmt: skip
            return torch.addmm(x, gated, layer.output_proj.weight.t().to(gated.dtype))

        layer.combine = combine
    return layer


@contextlib.contextmanager
def uvqk_kernels(on: bool):
    """hstu.ops.uvqk's CUDA kernels switched on (or off) for the calls inside."""
    from hstu.ops.uvqk import op as uvqk_op

    before = uvqk_op.USE_CUDA_KERNELS
    uvqk_op.USE_CUDA_KERNELS = on
    try:
        yield
    finally:
        uvqk_op.USE_CUDA_KERNELS = before


def our_callables(layer, x, offsets, max_len, uvqk: bool = False):
    from hstu.modules.hstu_layer import AttentionInputs

    inputs = AttentionInputs(seq_offsets=offsets, max_seqlen=max_len)
    dy = torch.randn_like(x)

    def fwd():
        with uvqk_kernels(uvqk), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return layer(x, inputs)

    def fwd_bwd():
        xg = x.detach().requires_grad_(True)
        with uvqk_kernels(uvqk), torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(xg, inputs)
            out.backward(dy.to(out.dtype))

    return fwd, fwd_bwd


def projection_callables(layer, x, fused: bool):
    """The layer's input side alone (HSTULayer.project), fused op on or off, under bf16 autocast."""
    rows = x.shape[0]
    grads = None

    def fwd():
        with uvqk_kernels(fused), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return layer.project(x)

    def fwd_bwd():
        nonlocal grads
        xg = x.detach().requires_grad_(True)
        with uvqk_kernels(fused), torch.autocast("cuda", dtype=torch.bfloat16):
            parts = layer.project(xg)
            if grads is None:
                grads = [torch.randn_like(p) for p in parts]
            torch.autograd.backward(parts, grads)

    flops = 2.0 * rows * layer.embedding_dim * layer.uvqk_proj.out_features
    return fwd, fwd_bwd, flops


def meta_stu(checkout: str | None):
    """Meta's STULayer and its config class, from a generative-recommenders checkout or the installed package."""
    if checkout:
        path = pathlib.Path(checkout).resolve()
        if not (path / "generative_recommenders").is_dir():
            raise SystemExit(f"bench_layer: --stu-checkout {checkout} holds no generative_recommenders package")
        sys.path.insert(0, str(path))
    try:
        from generative_recommenders.modules.stu import STULayer, STULayerConfig
    except ImportError as err:
        raise SystemExit(f"bench_layer: Meta's STULayer is not importable (--stu-checkout PATH): {err}") from None
    return STULayer, STULayerConfig


def stu_callables(classes, x, lengths, offsets, max_len):
    STULayer, STULayerConfig = classes
    config = STULayerConfig(embedding_dim=EMBEDDING, num_heads=HEADS, hidden_dim=HEAD_DIM, attention_dim=HEAD_DIM,
                            output_dropout_ratio=DROPOUT, causal=True, target_aware=False)  # fmt: skip
    layer = STULayer(config).cuda().train()
    num_targets = torch.zeros_like(lengths)
    dy = torch.randn_like(x)

    def run(inp):
        return layer(x=inp, x_lengths=lengths, x_offsets=offsets, max_seq_len=max_len, num_targets=num_targets)

    def fwd():
        with torch.no_grad():
            return run(x)

    def fwd_bwd():
        xg = x.detach().requires_grad_(True)
        run(xg).backward(dy)

    return fwd, fwd_bwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="comma-separated maximum lengths")
    ap.add_argument("--distributions", default="uniform,half_to_full", help="uniform and/or half_to_full (U[L/2, L])")
    ap.add_argument("--stu-checkout", default=None, help="a generative-recommenders checkout: also time its STULayer")
    ap.add_argument("--stu", action="store_true", help="time Meta's STULayer from the installed package")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--no-projection", action="store_true", help="skip the projection-only rows")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_layer: needs a CUDA GPU, and none is visible on this machine", file=sys.stderr)
        raise SystemExit(2)
    try:
        lengths_list = [int(v) for v in args.lengths.split(",") if v]
    except ValueError:
        raise SystemExit(f"bench_layer: --lengths must be comma-separated integers, got {args.lengths!r}") from None
    distributions = [d for d in args.distributions.split(",") if d]
    for d in distributions:
        if d not in ("uniform", "half_to_full"):
            raise SystemExit(f"bench_layer: --distributions takes uniform and half_to_full, got {d!r}")

    from hstu.ops import lengths_to_offsets
    from hstu.ops._extension import load_extension
    from hstu.ops.norm_mul_dropout import cuda as nmd_cuda
    from hstu.ops.uvqk import cuda as uvqk_cuda

    ext = load_extension()
    gpu = torch.cuda.get_device_name()
    stu = meta_stu(args.stu_checkout) if (args.stu_checkout or args.stu) else None
    result = {
        "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "extension": ext.build_info() if ext is not None and hasattr(ext, "build_info") else None,
        "fused_output_kernel": nmd_cuda.available(torch.empty(0, device="cuda")),
        "fused_uvqk_gemm": uvqk_cuda.gemm_backend(),  # 'sm90' (CUTLASS epilogue), 'cublas', or None (not built)
        "label": args.label, "batch": BATCH, "embedding": EMBEDDING, "heads": HEADS, "head_dim": HEAD_DIM,
        "dtype": "bfloat16", "dropout": DROPOUT, "rows": [],
    }  # fmt: skip
    print(f"GPU {gpu}  torch {torch.__version__}  CUDA {torch.version.cuda}  fused output kernel: "
          f"{result['fused_output_kernel']}")
    variants = {"ours": (our_layer(False), False), "ours+fused": (our_layer(True), False)}
    if result["fused_uvqk_gemm"] is not None:
        variants["ours+uvqk"] = (variants["ours+fused"][0], True)
    for max_len in lengths_list:
        for dist in distributions:
            lengths = jagged_lengths(max_len, dist, seed=max_len)
            offsets = lengths_to_offsets(lengths).cuda()
            lengths_cuda = lengths.cuda()
            total = int(lengths.sum())
            x = torch.randn(total, EMBEDDING, device="cuda", dtype=torch.bfloat16)
            fns = {name: our_callables(layer, x, offsets, max_len, uvqk) for name, (layer, uvqk) in variants.items()}
            flops = {}
            if not args.no_projection:
                proj_variants = {"proj_torch": False}
                if result["fused_uvqk_gemm"] is not None:
                    proj_variants["proj_fused"] = True
                for name, fused in proj_variants.items():
                    *fns[name], flops[name] = projection_callables(variants["ours"][0], x, fused)
            if stu is not None:
                fns["meta_stu"] = stu_callables(stu, x, lengths_cuda, offsets, max_len)
            times = {name: {"fwd": [], "fwd_bwd": []} for name in fns}
            for _ in range(args.rounds):
                for name, (fwd, fwd_bwd) in fns.items():
                    times[name]["fwd"].append(time_ms(fwd))
                    times[name]["fwd_bwd"].append(time_ms(fwd_bwd))
            for name, (fwd, fwd_bwd) in fns.items():
                row = {
                    "variant": name, "max_len": max_len, "distribution": dist, "tokens": total,
                    "fwd_ms": sorted(times[name]["fwd"])[args.rounds // 2],
                    "fwd_bwd_ms": sorted(times[name]["fwd_bwd"])[args.rounds // 2],
                    "fwd_peak_mib": peak_mib(fwd), "fwd_bwd_peak_mib": peak_mib(fwd_bwd),
                }  # fmt: skip
                if name in flops:
                    row["fwd_tflops"] = flops[name] / (row["fwd_ms"] * 1e9)
                    row["fwd_bwd_tflops"] = 3 * flops[name] / (row["fwd_bwd_ms"] * 1e9)
                result["rows"].append(row)
                tflops = f"  {row['fwd_tflops']:6.1f} / {row['fwd_bwd_tflops']:6.1f} TFLOP/s" if name in flops else ""
                print(f"{name:11s} L={max_len:5d} {dist:12s} T={total:7d}  fwd {row['fwd_ms']:8.3f} ms  "
                      f"fwd+bwd {row['fwd_bwd_ms']:8.3f} ms  peak {row['fwd_peak_mib']:8.0f} / "
                      f"{row['fwd_bwd_peak_mib']:8.0f} MiB{tflops}")
            del x, fns
            torch.cuda.empty_cache()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    path = out_dir / f"layer_{tag}.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(result, indent=2))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Cached-attention forward benchmark (issue 26): the CUDA cached kernel against recomputing the whole sequence and
against the PyTorch reference, and Meta's Triton cached attention (generative-recommenders,
``triton_cached_hstu_mha``) when that package is importable, all timed in the same process on the same card.

Shapes: (a) one user with a 4096-token history and 128 M-FALCON candidates (targets that see the history and
themselves), (b) 64 such users. Per shape and path: median latency (ms) and TFLOP/s, counting 4 * D flops per
visible (query, key) pair and head (the two GEMMs; masked pairs not counted). Paths:

* ``cached_kernel``: ``hstu.ops.cached_attention.cuda.forward`` (the kernel, no argument checks);
* ``cached_op``: ``cached_hstu_attention`` (argument checks, dispatch, then the kernel);
* ``recompute``: ``hstu_attention`` over the whole sequences (history + candidates), what a model without a cache
  runs; its flops are those of the full causal sequence, its TFLOP/s column says how busy the card was;
* ``reference``: ``cached_attention_reference`` on the GPU (skipped above --reference-max-users users);
* ``meta_triton``: ``triton_cached_hstu_mha`` over the concatenated K/V (the concatenation not timed; Meta's kernel
  takes the whole sequences in one buffer and the same number of new rows per user).

``--paged P``: the cache is a pool of pages of P rows in a shuffled page order (as ``PagedKVCache`` leaves it after
interleaved appends); the cached paths read it through the page table, the others get the same rows gathered into
one contiguous buffer. ``--device``: the CUDA device to run on. Latencies: p50 and p99 of CUDA-event timings.

Prints one JSON object with the card name. Run: python benchmarks/bench_cached_attention.py [--heads 4 --dim 128]
[--paged 32] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from bench_layer import time_ms  # (benchmarks/ is on the path of a script run from it; puts the repo root on it)


def meta_cached_attention():
    """Meta's triton_cached_hstu_mha, or None when generative-recommenders is not importable."""
    try:
        from generative_recommenders.ops.triton.triton_hstu_attention import triton_cached_hstu_mha
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return triton_cached_hstu_mha


def percentiles_ms(fn, reps: int, warmup: int) -> tuple[float, float]:
    """(p50, p99) of ``reps`` CUDA-event timings of fn() after ``warmup`` calls."""
    time_ms(fn, reps=1, warmup=warmup)
    samples = sorted(time_ms(fn, reps=1, warmup=0) for _ in range(reps))
    return samples[len(samples) // 2], samples[min(reps - 1, round(0.99 * (reps - 1)))]


def run_shape(users: int, history: int, candidates: int, heads: int, dim: int, dtype, reference_max_users: int,
              dev: torch.device, page_size: int = 0):
    from hstu.ops import hstu_attention
    from hstu.ops.cached_attention import cached_attention_mask, cached_attention_reference, cached_hstu_attention
    from hstu.ops.cached_attention import cuda as cached_cuda
    from hstu.ops.cached_attention import gather_pages

    g = torch.Generator(device=dev).manual_seed(users)
    whole = history + candidates

    def rows(n):
        return torch.randn(n, heads, dim, device=dev, generator=g).to(dtype) * 0.5

    q, k, v = rows(users * candidates), rows(users * candidates), rows(users * candidates)
    ck, cv = rows(users * history), rows(users * history)
    delta_offsets = torch.arange(users + 1, device=dev, dtype=torch.int32) * candidates
    cache_offsets = torch.arange(users + 1, device=dev, dtype=torch.int32) * history
    targets = torch.full((users,), candidates, device=dev, dtype=torch.int32)
    alpha, scaling = 1.0 / math.sqrt(dim), whole
    kw = dict(alpha=alpha, scaling_seqlen=scaling, num_targets=targets)
    cached_kw, pool_k, pool_v = kw, ck, cv  # what the cached paths read
    if page_size:
        per_user = -(-history // page_size)
        pool_k, pool_v = rows(users * per_user * page_size), rows(users * per_user * page_size)
        order = torch.randperm(users * per_user, device=dev, generator=g).to(torch.int32)
        cached_kw = dict(kw, page_table=order.view(users, per_user), page_size=page_size)
        ck = gather_pages(pool_k, cached_kw["page_table"], cache_offsets, page_size)
        cv = gather_pages(pool_v, cached_kw["page_table"], cache_offsets, page_size)
    mask = cached_attention_mask(torch.full((1,), history), torch.full((1,), candidates), candidates, whole,
                                 num_targets=torch.full((1,), candidates))  # fmt: skip
    flops = 4.0 * dim * heads * users * float(mask.sum())
    # the whole sequences for the recompute path and Meta's kernel (history then candidates, per user)
    def cat(c, d):
        parts = [c.view(users, history, heads, dim), d.view(users, candidates, heads, dim)]
        return torch.cat(parts, dim=1).reshape(users * whole, heads, dim)

    fq, fk, fv = cat(torch.zeros_like(ck), q), cat(ck, k), cat(cv, v)
    full_offsets = torch.arange(users + 1, device=dev, dtype=torch.int32) * whole
    full_flops = 4.0 * dim * heads * users * (history * (history + 1) / 2 + candidates * (history + 1))

    paths = {
        "cached_kernel": (lambda: cached_cuda.forward(q, k, v, delta_offsets, pool_k, pool_v, cache_offsets,
                                                      **cached_kw), flops),
        "cached_op": (lambda: cached_hstu_attention(q, k, v, delta_offsets, pool_k, pool_v, cache_offsets,
                                                    **cached_kw), flops),
        "recompute": (lambda: hstu_attention(fq, fk, fv, full_offsets, whole, alpha=alpha, scaling_seqlen=scaling,
                                             num_targets=targets), full_flops),
    }
    if users <= reference_max_users:
        paths["reference"] = (lambda: cached_attention_reference(q, k, v, delta_offsets, ck, cv, cache_offsets, **kw),
                              flops)
    meta = meta_cached_attention()
    if meta is not None:
        fq_new = q.contiguous()
        paths["meta_triton"] = (lambda: meta(N=whole, alpha=alpha, delta_q=fq_new, k=fk, v=fv, seq_offsets=full_offsets,
                                             num_targets=targets), flops)
    out = {"users": users, "history": history, "candidates": candidates, "heads": heads, "dim": dim,
           "dtype": str(dtype).replace("torch.", ""), "page_size": page_size or None}
    with torch.no_grad():
        for name, (fn, f) in paths.items():
            try:
                ms, p99 = percentiles_ms(fn, reps=10 if name == "reference" else 50,
                                         warmup=3 if name == "reference" else 10)
            except Exception as e:  # noqa: BLE001 - report a path that fails instead of losing the others
                out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            out[name] = {"ms": round(ms, 4), "p99_ms": round(p99, 4), "tflops": round(f / ms / 1e9, 2)}
    base = out.get("cached_kernel", {}).get("ms")
    if base:
        for name in ("recompute", "reference", "meta_triton"):
            if "ms" in out.get(name, {}):
                out[name]["cached_kernel_speedup"] = round(out[name]["ms"] / base, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--history", type=int, default=4096)
    parser.add_argument("--candidates", type=int, default=128)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reference-max-users", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="the CUDA device (cuda or cuda:N)")
    parser.add_argument("--paged", type=int, default=0, choices=[0, 16, 32, 64], metavar="PAGE_SIZE",
                        help="read the cache through a page table of pages of PAGE_SIZE rows (0: contiguous)")
    args = parser.parse_args()
    from hstu.inference.loading import resolve_device

    try:
        dev = resolve_device(args.device)
    except ValueError as err:
        raise SystemExit(f"bench_cached_attention: {err}") from None
    if dev.type != "cuda":
        raise SystemExit(f"bench_cached_attention: --device {args.device!r}: needs a CUDA GPU")
    torch.cuda.set_device(dev)
    dtype = getattr(torch, args.dtype)
    results = [run_shape(u, args.history, args.candidates, args.heads, args.dim, dtype, args.reference_max_users,
                         dev, args.paged) for u in args.users]
    meta = meta_cached_attention() is not None
    print(json.dumps({"card": torch.cuda.get_device_name(dev), "device": str(dev), "meta_triton_available": meta,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()

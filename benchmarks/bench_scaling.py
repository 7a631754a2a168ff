"""Distributed benchmarks of the HSTU dense stack + a sharded item table, launched with torchrun.

Two modes:

``--mode scaling`` (weak scaling): every data-parallel rank trains on its own fixed-size batch of a long-sequence
synthetic workload (default: the seed's kuairand_1k shape, 4096-token histories, 3 layers, hidden 512, 4 heads of
128); reports tokens/s and achieved TFLOP/s per GPU. Run it with 1, 2 and 4 processes and compare per-GPU numbers
(efficiency = tokens/s per GPU at N / at 1).

    torchrun --nproc_per_node 2 benchmarks/bench_scaling.py --mode scaling --out $OUT/scaling_2.json

``--mode balance``: the step-time spread across ranks with round-robin dealing vs the workload-balanced dealing of
``hstu.data.loader.balance_global_batch`` (Σ L² per rank), on long-tailed sequence lengths. Per step, each rank
times its dense forward+backward (between the sparse all-to-alls, which synchronise the ranks); the spread is max/mean of those times
over ranks, and the step time is the slowest rank's (everyone waits for it in the all-reduce).

    torchrun --nproc_per_node 2 benchmarks/bench_scaling.py --mode balance --out balance.json

FLOPs follow REFERENCE.md: attention fwd 4·ΣL²·H·d·½ (causal), linears 2·T·(in·out) per GEMM, backward 2×
(linears) and 2.5× (attention) the forward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor  # noqa: E402

from hstu.distributed import ParallelismSettings, destroy_parallelism, init_parallelism, parallelize  # noqa: E402
from hstu.modules.hstu_layer import AttentionInputs, HSTULayer, HSTUStack  # noqa: E402
from hstu.ops import lengths_to_offsets  # noqa: E402


class BenchModel(nn.Module):
    def __init__(self, num_items: int, dim: int, layers: int, heads: int, head_dim: int, max_len: int):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.collection = EmbeddingCollection(tables=[
            EmbeddingConfig(name="item", embedding_dim=dim, num_embeddings=num_items, feature_names=["item"])])
        self.encoder = HSTUStack([HSTULayer(dim, heads, head_dim, head_dim, dropout=0.0, scaling_seqlen=max_len)
                                  for _ in range(layers)])

    def embed(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.embeddings.collection(features)["item"].values()

    def dense(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        offsets = lengths_to_offsets(lengths)
        y = self.encoder(x, AttentionInputs(seq_offsets=offsets, max_seqlen=int(lengths.max())))
        return (y.float() ** 2).mean()


def step_flops(lengths: np.ndarray, dim: int, layers: int, heads: int, head_dim: int) -> float:
    tokens = float(lengths.sum())
    linear = 2 * tokens * (dim * heads * 4 * head_dim + heads * head_dim * dim)  # uvqk + output projections
    attention = 4 * float((lengths.astype(np.float64) ** 2).sum()) * heads * head_dim * 0.5
    return layers * (3 * linear + 3.5 * attention)


def make_features(lengths: np.ndarray, num_items: int, rng: np.random.Generator, device) -> KeyedJaggedTensor:
    values = torch.from_numpy(rng.integers(0, num_items, int(lengths.sum())))
    return KeyedJaggedTensor(keys=["item"], values=values, lengths=torch.from_numpy(lengths)).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args):
    ctx = init_parallelism(ParallelismSettings(tensor_model_parallel_size=args.tp), device=args.device, seed=0)
    torch.manual_seed(0)
    model = BenchModel(args.num_items, args.dim, args.layers, args.heads, args.head_dim, args.max_len)
    # shard_single_process: one GPU also runs the TorchRec-sharded table with its fused optimizer, so every world
    # size does the same sparse work.
    settings = ParallelismSettings(tensor_model_parallel_size=args.tp, default_embedding_sharding="row_wise",
                                   sparse_learning_rate=1e-3, shard_single_process=True)

    class Optim:
        optimizer, learning_rate, betas, eps, weight_decay = "adam", 1e-4, (0.9, 0.98), 1e-8, 0.0

    parallel = parallelize(model, ctx, settings, Optim())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ctx.uses_cuda else torch.autocast("cpu", enabled=False)
    rng = np.random.default_rng(1234)  # identical on every rank: each takes its own part of the global plan
    ids_rng = np.random.default_rng(1 + ctx.rank)  # per rank: draws as many ids as its own tokens

    def lengths_plan():
        """(dp_size, batch) sequence lengths of one global batch."""
        if args.mode == "scaling":
            return np.full((ctx.dp_size, args.batch_size), args.max_len, dtype=np.int64)
        # Long-tailed lengths (log-normal), as in KuaiRand histories.
        lengths = np.clip(rng.lognormal(np.log(args.max_len / 6), 1.0, ctx.dp_size * args.batch_size),
                          8, args.max_len).astype(np.int64)
        ids = np.arange(lengths.size)
        if args.balanced:
            from hstu.data.loader import balance_global_batch

            plan = balance_global_batch(ids, lengths.astype(np.float64) ** 2, ctx.dp_size, args.batch_size)
        else:  # the loader's round-robin dealing
            plan = ids.reshape(args.batch_size, ctx.dp_size).T
        return lengths[plan]

    compute_times, step_times, tokens, flops = [], [], 0, 0.0
    for step in range(args.warmup + args.steps):
        lengths = np.ascontiguousarray(lengths_plan()[ctx.dp_rank])
        features = make_features(lengths, args.num_items, ids_rng, ctx.device)
        lengths_t = torch.from_numpy(lengths).to(ctx.device)
        dist.barrier()
        sync(ctx.device)
        start = time.perf_counter()
        parallel.zero_grad()
        embedded = model.embed(features)  # sparse all-to-all: synchronises the ranks
        # The dense compute is timed on its own: the sparse backward all-to-all at its end would otherwise make
        # the fast ranks wait for the slow ones inside the timed region.
        dense_input = embedded.detach().requires_grad_()
        sync(ctx.device)
        dense_start = time.perf_counter()
        with autocast:
            loss = model.dense(dense_input, lengths_t)
        loss.backward()
        sync(ctx.device)
        computed = time.perf_counter()
        embedded.backward(dense_input.grad)
        parallel.finish_grad_sync()
        parallel.step()
        sync(ctx.device)
        end = time.perf_counter()
        if step >= args.warmup:
            compute_times.append(computed - dense_start)
            step_times.append(end - start)
            tokens += int(lengths.sum())
            flops += step_flops(lengths, args.dim, args.layers, args.heads, args.head_dim) / ctx.tp_size

    # Collectives run on the process group's device (NCCL has no CPU backend).
    per_rank = torch.tensor([compute_times, step_times], dtype=torch.float64, device=ctx.device)
    gathered = [torch.zeros_like(per_rank) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, per_rank)
    gathered = [g.cpu() for g in gathered]
    totals = torch.tensor([tokens, flops], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(totals)
    totals = totals.cpu()
    if ctx.is_main:
        compute = torch.stack([g[0] for g in gathered])  # (ranks, steps)
        steps = torch.stack([g[1] for g in gathered])
        wall = float(steps.max(0).values.sum())
        result = {
            "mode": args.mode, "balanced": bool(args.balanced), "world_size": ctx.world_size, "tp": ctx.tp_size,
            "dp": ctx.dp_size, "device": torch.cuda.get_device_name(ctx.device) if ctx.uses_cuda else "cpu",
            "config": {k: getattr(args, k) for k in ("batch_size", "max_len", "layers", "dim", "heads", "head_dim")},
            "steps": args.steps,
            "compute_spread_max_over_mean": float((compute.max(0).values / compute.mean(0)).mean()),
            "mean_step_time_s": wall / args.steps,
            "mean_dense_compute_s": float(compute.mean()),
            # TP ranks of a group process the same tokens: count them once.
            "tokens_per_s_per_gpu": float(totals[0]) / ctx.tp_size / wall / ctx.world_size,
            "tflops_per_gpu": float(totals[1]) / wall / ctx.world_size / 1e12,
        }
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    destroy_parallelism(ctx)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("scaling", "balance"), default="scaling")
    p.add_argument("--balanced", action="store_true", help="balance mode: deal batches by Σ L² (else round robin)")
    p.add_argument("--device", default=None)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="per data-parallel rank")
    p.add_argument("--max-len", dest="max_len", type=int, default=4096)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", dest="head_dim", type=int, default=128)
    p.add_argument("--num-items", dest="num_items", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=None)
    run(p.parse_args())


if __name__ == "__main__":
    main()

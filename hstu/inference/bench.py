"""``python -m hstu.inference bench``: latency and throughput of cached scoring against the full recompute.

Scenarios: (a) one user with a long history (``--history``, capped at the model's maximum) and ``--candidates``
candidates; (b) batches of ``--batch-users`` users with ``--batch-history`` events each. Ranking models score the
candidates (``rank`` against ``rank_full``); retrieval models rank the catalogue (``retrieve`` against
``retrieve_full``; there are no candidates). The requests are drawn from the model's own tables (valid ids,
increasing timestamps, a fixed seed), so any run directory works as it is, e.g. the synthetic runs of the README.
Also reported: the latency of appending one event to a cached user. ``--device cuda`` runs the model, its paged
key / value cache and every request on the GPU (each request timed to its results on the device: the clock stops
after a CUDA synchronize); the JSON names the card.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from hstu.inference.model import DEFAULT_PAGE_SIZE, InferenceModel, UserEvents, load_inference_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hstu.inference",
                                     description="Cached HSTU inference (M-FALCON) from a training run directory.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="latency / throughput of cached scoring against the full recompute")
    bench.add_argument("--checkpoint", required=True, metavar="RUN_DIR",
                       help="training run directory (its newest verified checkpoint) or one checkpoints/step_N")
    bench.add_argument("--history", type=int, default=4096, help="events of the one-user scenario (a); capped at "
                       "the model's maximum")
    bench.add_argument("--candidates", type=int, default=128, help="candidates per user (ranking models)")
    bench.add_argument("--batch-users", type=int, default=64, help="users per request of scenario (b)")
    bench.add_argument("--batch-history", type=int, default=256, help="events per user of scenario (b); capped")
    bench.add_argument("--iterations", type=int, default=20, help="timed requests per measurement")
    bench.add_argument("--warmup", type=int, default=3, help="untimed requests before each measurement")
    bench.add_argument("--top-k", type=int, default=10, help="k of retrieval scoring")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    bench.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="compute / cache dtype (default: the run's training precision on the device)")
    bench.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, choices=[16, 32, 64],
                       help="rows per page of the key / value cache")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    return parser


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")
    return value


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(request: Callable[[], object], iterations: int, warmup: int, users: int,
            device: torch.device = torch.device("cpu")) -> dict:
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        request()
    samples = []
    for _ in range(iterations):
        synchronize()
        started = time.perf_counter()
        request()
        synchronize()
        samples.append(time.perf_counter() - started)
    total = sum(samples)
    return {"p50_ms": 1e3 * _percentile(samples, 0.5), "p99_ms": 1e3 * _percentile(samples, 0.99),
            "requests_per_s": iterations / total, "users_per_s": iterations * users / total}


def _fill(model: InferenceModel, users: Sequence[str], events: int, generator: torch.Generator) -> None:
    item_rows = model.table_sizes["item"]
    for user in users:
        items = torch.randint(1, item_rows, (events,), generator=generator)
        times = torch.arange(events, dtype=torch.int64) * 60 + 1_600_000_000
        actions = torch.randint(0, model.table_sizes["action"], (events,), generator=generator) if model.ranking \
            else None
        contextual = None
        if model.num_contextual:
            contextual = torch.tensor([int(torch.randint(0, model.table_sizes[k], (1,), generator=generator))
                                       for k in model.model.contextual_keys])
        model.append([UserEvents(user, items, times, actions, contextual)])


def _scenario(model: InferenceModel, name: str, users: list[str], history: int, args, generator) -> dict:
    print(f"[bench] {name}: filling the caches of {len(users)} user(s) with {history} events", flush=True)
    _fill(model, users, history, generator)
    if model.ranking:
        candidates = [torch.randint(1, model.table_sizes["item"], (args.candidates,), generator=generator)
                      for _ in users]

        def cached():
            return model.rank(users, candidates)

        def full():
            return model.rank_full(users, candidates)
    else:
        def cached():
            return model.retrieve(users, args.top_k)

        def full():
            return model.retrieve_full(users, args.top_k)
    result = {"users": len(users), "history_events": history,
              "candidates": args.candidates if model.ranking else None}
    for label, request in (("cached", cached), ("full_recompute", full)):
        print(f"[bench] {name}: timing {label} scoring ({args.iterations} requests)", flush=True)
        result[label] = measure(request, args.iterations, args.warmup, len(users), model.device)
    result["speedup_p50"] = result["full_recompute"]["p50_ms"] / result["cached"]["p50_ms"]
    return result


def _append_latency(model: InferenceModel, user: str, args, generator) -> dict:
    cache = model.peek(user)
    budget = model.cache.max_tokens - cache.num_tokens
    steps = min(args.iterations + args.warmup, budget // (2 if model.ranking else 1))
    if steps <= args.warmup:
        return {"skipped": "the history already fills the model's maximum"}
    clock = iter(range(steps))

    def append_one():
        t = int(cache.timestamps[-1]) + 60 * (1 + next(clock))
        actions = torch.tensor([1]) if model.ranking else None
        model.append([UserEvents(user, torch.randint(1, model.table_sizes["item"], (1,), generator=generator),
                                 torch.tensor([t]), actions)])

    return measure(append_one, steps - args.warmup, args.warmup, 1, model.device)


def bench(args) -> dict:
    for name in ("history", "candidates", "batch_users", "batch_history", "iterations", "top_k"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("warmup", args.warmup, 0)
    if args.threads:
        torch.set_num_threads(_positive("threads", args.threads))
    print(f"[bench] loading {args.checkpoint}", flush=True)
    model = load_inference_model(args.checkpoint, device=args.device, dtype=args.dtype, page_size=args.page_size)
    per_event = 2 if model.ranking else 1
    most = (model.cache.max_tokens - model.num_contextual) // per_event
    generator = torch.Generator().manual_seed(args.seed)
    results = {"task": model.task, "max_history_events": most, "incremental_appends": model.incremental,
               "threads": torch.get_num_threads(), "device": str(model.device),
               "card": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
               "dtype": str(model.dtype).replace("torch.", ""), "page_size": model.cache.page_size}
    history = min(args.history, most)
    if history < args.history:
        print(f"[bench] (a): the model takes at most {most} events per user: history {args.history} -> {history}",
              flush=True)
    results["a_one_user"] = _scenario(model, "(a) one user", ["a0"], history, args, generator)
    results["append_one_event"] = _append_latency(model, "a0", args, generator)
    batch_history = min(args.batch_history, most)
    users = [f"b{i}" for i in range(args.batch_users)]
    results["b_batch"] = _scenario(model, f"(b) {args.batch_users} users", users, batch_history, args, generator)
    return results


def _report(results: dict) -> str:
    lines = [f"task {results['task']} on {results['card']} ({results['dtype']}, pages of {results['page_size']} "
             f"rows), {results['threads']} CPU threads; appends "
             f"{'extend the cache' if results['incremental_appends'] else 'rebuild the cache (model needs it)'}"]
    for key in ("a_one_user", "b_batch"):
        r = results[key]
        what = f"{r['users']} user(s) x {r['history_events']} events" + (
            f", {r['candidates']} candidates" if r["candidates"] else ", top-k of the catalogue")
        lines.append(f"{key}: {what}")
        for label in ("cached", "full_recompute"):
            m = r[label]
            lines.append(f"  {label:<15} p50 {m['p50_ms']:9.3f} ms  p99 {m['p99_ms']:9.3f} ms  "
                         f"{m['requests_per_s']:9.1f} req/s  {m['users_per_s']:9.1f} users/s")
        lines.append(f"  speed-up (p50)  {r['speedup_p50']:.1f}x")
    append = results["append_one_event"]
    if "p50_ms" in append:
        lines.append(f"append one event: p50 {append['p50_ms']:.3f} ms  p99 {append['p99_ms']:.3f} ms")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = bench(args)
        print(_report(results), flush=True)
        if args.json:
            from hstu.training.run_logging import write_json_atomic

            write_json_atomic(args.json, results)
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

"""End-to-end training benchmark at NVIDIA's published setting (issue 23): configs/e2e_retrieval.gin and
configs/e2e_ranking.gin run through the trainer, on their synthetic data (generated on first use).

    python benchmarks/bench_e2e.py [--task retrieval ranking] [--lengths uniform half] [--pipeline none]
                                   [--steps 50] [--warmup 10] [--profile-steps 3] [--out FILE] [--toy]
    torchrun --nproc_per_node 2 benchmarks/bench_e2e.py ...      (data parallel, sharded tables)

Per (task, lengths, pipeline) run: ``--warmup`` steps, then ``--steps`` measured steps. The summary's throughput
leaves the warm-up out (TrainerArgs.throughput_warmup_steps); the last ``--profile-steps`` warm-up steps are profiled
(torch.profiler), so the profiler's overhead is not in the measured steps, and their per-category breakdown
(hstu.training.breakdown: device time on CUDA, CPU time on CPU) goes into the results.

``--lengths``: ``uniform``, every sequence at the config's maximum length L; ``half``, lengths U[L/2, L] (the configs'
own setting). Each gets its own dataset directory under ``--data-root``.

Writes (rank 0) one JSON, by default benchmarks/results/e2e_<card>.json: per run tokens/s/GPU, model TFLOP/s/GPU
and MFU against the card's dense bf16 peak (on CUDA), the breakdown, the peak allocated memory per rank (CUDA), and
the card, torch, CUDA, torchrec and fbgemm_gpu versions. The run directories (train_log.jsonl, profile.txt,
profile_trace.json, summary.json) are under ``--run-root``/<UTC time>/.

``--toy``: a small model and dataset on the CPU (seconds; what CI runs), the same code path.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import re
import sys
import warnings
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from hstu.training.config import parse_gin  # noqa: E402
from hstu.training.run_logging import utc_stamp, write_json_atomic  # noqa: E402

CONFIGS = {"retrieval": "configs/e2e_retrieval.gin", "ranking": "configs/e2e_ranking.gin"}
LENGTHS = ("uniform", "half")
PIPELINES = ("none", "sparse_dist", "prefetch_sparse_dist")

# The toy size: a small model, dataset and step count on the CPU, every run in a few seconds.
TOY_BINDINGS = [
    "TrainerArgs.device = 'cpu'", "TrainerArgs.eval_max_batches = 1", "DatasetArgs.max_seqlen = 24",
    "DatasetArgs.batch_size = 4", "DatasetArgs.eval_batch_size = 4", "NetworkArgs.hidden_dim = 16",
    "NetworkArgs.num_layers = 2", "NetworkArgs.num_heads = 2", "NetworkArgs.qk_dim = 8", "NetworkArgs.v_dim = 8",
]
TOY_TASK_BINDINGS = {
    "retrieval": ["RetrievalArgs.num_negatives = 8"],
    "ranking": ["DatasetArgs.num_candidates = 4", "RankingArgs.head_hidden_dims = (8,)"],
}
TOY_DATA = {"num_users": 48, "num_items": 200}


def synthetic_options(args, lengths: str) -> dict:
    """The config's synthetic options with the sequence lengths of ``lengths``. A user's events are the history of
    up to max_seqlen events, the candidates and one held out for evaluation."""
    d = args.dataset
    options = dict(d.synthetic_options or {})
    extra = d.num_candidates + 1
    longest = d.max_seqlen + extra
    shortest = longest if lengths == "uniform" else d.max_seqlen // 2 + extra
    options.update(length_distribution="uniform", min_length=shortest, max_length=longest,
                   mean_length=(shortest + longest) / 2)
    return options


def run_bindings(task: str, lengths: str, pipeline: str, steps: int, warmup: int, profile_steps: int,
                 run_dir: str, data_root: str, toy: bool, extra: Sequence[str]) -> list[str]:
    """The gin bindings of one benchmark run on top of its config."""
    bindings = list(TOY_BINDINGS + TOY_TASK_BINDINGS[task]) if toy else []
    bindings += [
        f"TrainerArgs.run_dir = {run_dir!r}", f"TrainerArgs.max_steps = {warmup + steps}",
        "TrainerArgs.max_epochs = 0", f"TrainerArgs.throughput_warmup_steps = {warmup}",
        f"TrainerArgs.log_interval_steps = {max(steps, 1)}", f"TrainerArgs.pipeline = {pipeline!r}",
        "TrainerArgs.progress_bar = False", "TrainerArgs.tensorboard = False", "TrainerArgs.plot = False",
        "TrainerArgs.compute_baseline = False", "TrainerArgs.save_final_checkpoint = False",
        "TrainerArgs.checkpoint_interval_steps = -1", "TrainerArgs.eval_every_epochs = 0",
        "DatasetArgs.prepare_if_missing = True",
        f"DatasetArgs.dataset_dir = {os.path.join(data_root, f'bench_e2e_{task}_{lengths}' + ('_toy' if toy else ''))!r}",
    ]
    if profile_steps:
        bindings.append(f"TrainerArgs.profile_range = ({warmup - profile_steps}, {warmup})")
    return bindings + list(extra)


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("torchrec", "fbgemm_gpu", "fbgemm-gpu"):
        try:
            out[package.replace("-", "_")] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def on_cuda(device: str) -> bool:
    """Whether TrainerArgs.device ``device`` trains on the GPU."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def card_name(device: str) -> str:
    return torch.cuda.get_device_name() if on_cuda(device) else "cpu"


def run_one(task: str, bindings: list[str]) -> dict:
    """One trainer run of ``task`` with ``bindings`` on its e2e config; its results row."""
    from hstu.training.trainer import run

    args = parse_gin([os.path.join(ROOT, CONFIGS[task])], bindings)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    summary = run(task, args, fresh=False)
    return {
        "tokens_per_s_per_gpu": summary.get("train_tokens_per_s_per_gpu"),
        "tflops_per_gpu": summary.get("train_tflops"),
        "mfu": summary.get("train_mfu"),
        "peak_allocated_bytes_per_rank": summary.get("memory_peak_allocated_bytes_per_rank"),
        "breakdown": summary.get("profile_breakdown"),
        "run_dir": args.trainer.run_dir,
        "precision": "bf16" if args.trainer.bf16 and on_cuda(args.trainer.device) else "fp32",
        "batch_size_per_gpu": args.dataset.batch_size,
        "max_seqlen": args.dataset.max_seqlen,
        "num_layers": args.network.num_layers,
        "hidden_dim": args.network.hidden_dim,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=sorted(CONFIGS), default=["retrieval", "ranking"])
    parser.add_argument("--lengths", nargs="+", choices=LENGTHS, default=["uniform", "half"],
                        help="uniform: every sequence at the maximum L; half: U[L/2, L]")
    parser.add_argument("--pipeline", nargs="+", choices=PIPELINES, default=["none"],
                        help="TrainerArgs.pipeline of the runs (TorchRec's train pipelines)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 50, --toy 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps left out (default 10, --toy 2)")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help="profiled warm-up steps for the breakdown, the last of the warm-up (default 3, --toy 1; "
                             "0: none)")
    parser.add_argument("--toy", action="store_true", help="small model and data on the CPU (seconds)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/e2e_<card>.json)")
    parser.add_argument("--run-root", default=os.path.join("runs", "bench_e2e"))
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--gin-param", action="append", default=[], metavar="KEY=VALUE",
                        help="extra gin binding for every run (repeatable)")
    return parser


def check_counts(parser: argparse.ArgumentParser, steps: int, warmup: int, profile_steps: int) -> None:
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")
    if warmup < 0 or profile_steps < 0:
        parser.error(f"--warmup and --profile-steps must be >= 0, got {warmup} and {profile_steps}")
    if profile_steps and profile_steps >= warmup:
        parser.error(f"--profile-steps={profile_steps} must be < --warmup={warmup}: the profiled steps are the last "
                     "warm-up steps, after at least one unprofiled one")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    options = parser.parse_args(argv)
    steps = options.steps if options.steps is not None else (2 if options.toy else 50)
    warmup = options.warmup if options.warmup is not None else (2 if options.toy else 10)
    profile_steps = options.profile_steps if options.profile_steps is not None else (1 if options.toy else 3)
    check_counts(parser, steps, warmup, profile_steps)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

    card = card_name("cpu" if options.toy else "auto")
    out_path = options.out or os.path.join(ROOT, "benchmarks", "results",
                                           f"e2e_{'toy_' if options.toy else ''}{re.sub(r'[^A-Za-z0-9]+', '_', card)}.json")
    stamp_dir = os.path.join(options.run_root, utc_stamp())
    rows = []
    for task in options.task:
        for lengths in options.lengths:
            for pipeline in options.pipeline:
                base = parse_gin([os.path.join(ROOT, CONFIGS[task])],
                                 (TOY_BINDINGS + TOY_TASK_BINDINGS[task] if options.toy else []) + options.gin_param)
                data = synthetic_options(base, lengths)
                if options.toy:
                    data.update(TOY_DATA)
                bindings = run_bindings(task, lengths, pipeline, steps, warmup, profile_steps,
                                        os.path.join(stamp_dir, f"{task}_{lengths}_{pipeline}"), options.data_root,
                                        options.toy, options.gin_param)
                bindings.append(f"DatasetArgs.synthetic_options = {data!r}")
                row = {"task": task, "lengths": lengths, "pipeline": pipeline, "steps": steps,
                       "warmup_steps": warmup, "profiled_steps": profile_steps}
                row.update(run_one(task, bindings))
                rows.append(row)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = {"card": card, "world_size": world, **versions(), "toy": options.toy, "runs": rows}
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        write_json_atomic(out_path, result)
        for row in rows:
            rate = f"{row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU" if row["tokens_per_s_per_gpu"] else "n/a"
            if row["tflops_per_gpu"] is not None:
                rate += f", {row['tflops_per_gpu']:.1f} TFLOP/s/GPU"
            if row["mfu"] is not None:
                rate += f", MFU {100 * row['mfu']:.1f}%"
            print(f"[bench_e2e] {row['task']} {row['lengths']} pipeline={row['pipeline']}: {rate}", flush=True)
        print(f"[bench_e2e] results ({card}) written to {out_path}", flush=True)
    return result


if __name__ == "__main__":
    main()

"""Before / after timing of the attention kernels on the benchmark's five issue shapes, one source tree per process.

    python scripts/ab_bench.py time --tree DIR --label NAME --round N --out FILE   # appends one JSON line to FILE
    python scripts/ab_bench.py compare FILE [--limit 0.02]                       # table; exit 1 past the limit

`time` loads DIR's benchmarks/bench_attention.py (its inputs, kernel arguments and `do_bench`) and DIR's `hstu`
package with its built extension, nothing of this checkout, and times `hstu.ops.hstu_attention.cuda.forward` /
`backward` with their default kernels (causal, bf16, alpha = 1/sqrt(D), atomic-dq backward). A tree with
`hstu/ops/hstu_attention/args.py` passes them one `AttentionArgs` (from its `kernel_args`); an older tree passes the
flat argument list its `kernel_args` and functions take, so one script times both trees. scripts/gpu_ab.sh
alternates the trees' processes round by round; `compare` takes each tree's median over the rounds and reports
after / before per shape and pass.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys

# name, B, L, H, D, jagged
SHAPES = [
    ("32x4096x4x256", 32, 4096, 4, 256, False),
    ("32x4096x4x128", 32, 4096, 4, 128, False),
    ("16x8192x4x128", 16, 8192, 4, 128, False),
    ("64x1024x4x128", 64, 1024, 4, 128, False),
    ("jagged 32x4096x4x128", 32, 4096, 4, 128, True),
]


def time_tree(tree: pathlib.Path, label: str, round_: int, out: pathlib.Path) -> None:
    import importlib.util

    import torch

    # the tree's own benchmark module (its inputs and kernel arguments), which puts the tree first on sys.path
    spec = importlib.util.spec_from_file_location("bench_attention", tree / "benchmarks" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import hstu
    from hstu.ops.hstu_attention import cuda

    if not pathlib.Path(hstu.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"imported hstu from {hstu.__file__}, not from {tree}")
    named_args = importlib.util.find_spec("hstu.ops.hstu_attention.args") is not None
    rows = []
    for name, B, L, H, D, jagged in SHAPES:
        q, k, v, offsets, lengths, kwargs = bench.make_inputs(B, L, H, D, jagged, {})
        dout = torch.randn_like(q)
        if named_args:
            args = bench.kernel_args(q, k, v, offsets, L, kwargs)
            t_fwd = bench.do_bench(lambda: cuda.forward(args))
            t_bwd = bench.do_bench(lambda: cuda.backward(dout, args))
            del args  # (it holds q, k and v, freed below)
        else:
            common = bench.kernel_args(offsets, L, kwargs)
            t_fwd = bench.do_bench(lambda: cuda.forward(q, k, v, *common, 0.0, 0))
            t_bwd = bench.do_bench(lambda: cuda.backward(dout, q, k, v, *common, False, 0.0, 0, False))
        flops = bench.flops_fwd(lengths, H, D)
        rows.append({"shape": name, "fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwd_flops": flops})
        print(f"{label} round {round_} {name:22s} fwd {flops / t_fwd / 1e9:6.1f}  bwd {2.5 * flops / t_bwd / 1e9:6.1f} "
              f"TFLOP/s", flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
    record = {"label": label, "round": round_, "gpu": torch.cuda.get_device_name(), "tree": str(tree), "rows": rows}
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


def compare(path: pathlib.Path, limit: float) -> int:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    labels = list(dict.fromkeys(r["label"] for r in records))
    if len(labels) != 2:
        raise SystemExit(f"{path}: expected two labels (before, after), found {labels}")
    before, after = labels
    gpus = sorted({r["gpu"] for r in records})
    times: dict = {}
    flops: dict = {}
    for r in records:
        for row in r["rows"]:
            flops[row["shape"]] = row["fwd_flops"]
            for key in ("fwd_ms", "bwd_ms"):
                times.setdefault((r["label"], row["shape"], key), []).append(row[key])
    rounds = {label: sum(r["label"] == label for r in records) for label in labels}
    print(f"GPU {', '.join(gpus)}; {before} vs {after}; medians of {rounds[before]} / {rounds[after]} alternating "
          f"processes")
    print(f"| shape | pass | {before} TFLOP/s | {after} TFLOP/s | {after} / {before} time |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name, *_ in SHAPES:
        for key, scale, label in (("fwd_ms", 1.0, "fwd"), ("bwd_ms", 2.5, "bwd")):
            tb = statistics.median(times.get((before, name, key), [math.nan]))
            ta = statistics.median(times.get((after, name, key), [math.nan]))
            ratio = ta / tb
            worst = max(worst, ratio - 1.0) if not math.isnan(ratio) else math.inf
            fl = scale * flops[name]
            print(f"| {name} | {label} | {fl / tb / 1e9:.1f} | {fl / ta / 1e9:.1f} | {ratio:.3f} |")
    verdict = "within" if worst <= limit else "OUTSIDE"
    print(f"slowest change: {100 * worst:+.1f}% ({verdict} the {100 * limit:.0f}% limit)")
    return 0 if worst <= limit else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time")
    t.add_argument("--tree", required=True, type=pathlib.Path)
    t.add_argument("--label", required=True)
    t.add_argument("--round", type=int, default=0)
    t.add_argument("--out", required=True, type=pathlib.Path)
    c = sub.add_parser("compare")
    c.add_argument("file", type=pathlib.Path)
    c.add_argument("--limit", type=float, default=0.02)
    args = ap.parse_args()
    if args.cmd == "time":
        time_tree(args.tree, args.label, args.round, args.out)
    else:
        sys.exit(compare(args.file, args.limit))


if __name__ == "__main__":
    main()

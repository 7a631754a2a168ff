"""``python -m hstu.data``: prepare datasets and print their statistics."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from hstu.data.errors import DataFormatError, DownloadError
from hstu.data.external_sort import DEFAULT_SORT_BUFFER_ROWS
from hstu.data.prepare import DATASETS, KUAIRAND_USER_SETS, PrepareOptions, prepare
from hstu.data.processed import TIMESTAMP_UNITS, compute_stats, is_within
from hstu.data.synthetic import LENGTH_DISTRIBUTIONS, SyntheticConfig, write_synthetic

EPILOG = """\
examples:
  python -m hstu.data prepare synthetic --out-dir data/synthetic
  python -m hstu.data prepare synthetic --out-dir data/synth-long --num-users 1000 --mean-length 4000 \\
      --max-length 32768 --length-distribution pareto --actions bitmask
  python -m hstu.data prepare ml-1m --raw-dir ~/Downloads/ml-1m --out-dir data/ml-1m
  python -m hstu.data prepare ml-20m --download --raw-dir data/raw --out-dir data/ml-20m
  python -m hstu.data prepare kuairand-27k --raw-dir /datasets/KuaiRand-27K --out-dir data/kuairand-27k
  python -m hstu.data prepare kuairand-1k --raw-dir /datasets/KuaiRand-1K --out-dir data/kuairand-1k \\
      --kuairand-users every-log --timestamp-unit milliseconds    # the data NVIDIA's example trains on
  python -m hstu.data stats data/ml-1m

Raw directories hold the files as extracted from the official archives (ml-1m/ratings.dat, users.dat, movies.dat;
ml-20m/ratings.csv; KuaiRand-*/data/log_standard_*.csv, user_features_*.csv). The processed format is described in
docs/data.md.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hstu.data", description="Prepare recommendation datasets for HSTU training.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser(
        "prepare", help="convert a raw dataset (or generate the synthetic one) into the processed format",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument("dataset", choices=DATASETS)
    prep.add_argument("--out-dir", required=True, help="processed output directory (created atomically)")
    prep.add_argument("--raw-dir", help="directory with the extracted raw files (with --download: where to extract)")
    prep.add_argument("--download", action="store_true", help="download the official archive and verify its checksum")
    prep.add_argument("--sha256", help="expected SHA-256 of the archive (required for KuaiRand downloads)")
    prep.add_argument("--download-timeout", type=float, default=30.0, help="network timeout in seconds")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace an existing --out-dir that holds a processed dataset (or is empty)")
    prep.add_argument("--remap-items", action="store_true",
                      help="renumber item ids densely as 1..K in raw-id order (default: keep raw ids)")
    prep.add_argument("--sort-buffer-rows", type=int, default=DEFAULT_SORT_BUFFER_ROWS,
                      help="rows sorted in memory at once; bounds peak memory (~100 bytes per row)")
    prep.add_argument("--block-mb", type=int, default=16, help="raw text read per parsing block, MiB")
    prep.add_argument("--no-progress", action="store_true", help="hide progress bars")
    kuai = prep.add_argument_group("KuaiRand options")
    kuai.add_argument("--kuairand-users", choices=KUAIRAND_USER_SETS, default="all",
                      help="every-log: keep only the users with interactions in every standard log file (the user "
                      "set of NVIDIA's example preprocessing)")
    kuai.add_argument("--timestamp-unit", choices=tuple(TIMESTAMP_UNITS), default="seconds",
                      help="unit of timestamp.npy; milliseconds keeps time_ms as it is (batches still carry seconds)")
    synth = prep.add_argument_group("synthetic dataset options")
    defaults = SyntheticConfig()
    synth.add_argument("--seed", type=int, default=defaults.seed)
    synth.add_argument("--num-users", type=int, default=defaults.num_users)
    synth.add_argument("--num-items", type=int, default=defaults.num_items)
    synth.add_argument("--num-topics", type=int, default=defaults.num_topics)
    synth.add_argument("--mean-length", type=float, default=defaults.mean_length, help="target mean sequence length")
    synth.add_argument("--min-length", type=int, default=defaults.min_length)
    synth.add_argument("--max-length", type=int, default=defaults.max_length, help="longest sequence (up to 32k+)")
    synth.add_argument("--length-distribution", choices=LENGTH_DISTRIBUTIONS, default=defaults.length_distribution)
    synth.add_argument("--transition-prob", type=float, default=defaults.transition_prob,
                       help="probability that the next item is a successor of the previous one")
    synth.add_argument("--topic-drift", type=float, default=defaults.topic_drift)
    synth.add_argument("--actions", choices=("rating", "bitmask"), default=defaults.actions,
                       help="labels: rating classes 0..4 (retrieval/ranking) or KuaiRand-like 8-task bitmask")

    stats = commands.add_parser("stats", help="print users/items/interactions/seqlen statistics as one JSON object")
    stats.add_argument("data_dir")
    return parser


def _prepare(args: argparse.Namespace) -> None:
    show_progress = not args.no_progress
    kuairand = dict(kuairand_users=args.kuairand_users, timestamp_unit=args.timestamp_unit)
    if args.dataset == "synthetic":
        PrepareOptions(**kuairand).validate(args.dataset)  # refuses the KuaiRand options
        config = SyntheticConfig(
            num_users=args.num_users, num_items=args.num_items, num_topics=args.num_topics, mean_length=args.mean_length,
            min_length=args.min_length, max_length=args.max_length, length_distribution=args.length_distribution,
            transition_prob=args.transition_prob, topic_drift=args.topic_drift, actions=args.actions, seed=args.seed,
        )
        metadata = write_synthetic(args.out_dir, config, overwrite=args.overwrite, show_progress=show_progress)
    else:
        raw_dir = args.raw_dir
        options = PrepareOptions(remap_items=args.remap_items, sort_buffer_rows=args.sort_buffer_rows,
                                 block_bytes=args.block_mb << 20, show_progress=show_progress, **kuairand)
        options.validate(args.dataset)  # before any download
        if args.download:
            from hstu.data.download import ARCHIVES, fetch_archive

            if not args.download_timeout > 0:
                raise ValueError(f"--download-timeout must be > 0 seconds, got {args.download_timeout}")
            dest = raw_dir or os.path.join(os.path.dirname(os.path.abspath(args.out_dir)), "raw")
            check_download_dir(args.out_dir, dest, ARCHIVES[args.dataset].root)
            raw_dir = fetch_archive(args.dataset, dest, sha256=args.sha256, timeout=args.download_timeout,
                                    show_progress=show_progress)
        elif raw_dir is None:
            raise DataFormatError(args.out_dir, f"{args.dataset}: pass --raw-dir with the extracted files, or --download")
        metadata = prepare(args.dataset, raw_dir, args.out_dir, options, overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: {metadata['num_users']} users, {metadata['num_interactions']} interactions, "
          f"item vocabulary {metadata['num_items']}", file=sys.stderr)


def check_download_dir(out_dir: str, dest: str, archive_root: str) -> None:
    """Refuse a download directory that the output would hold, or an output that would be the extracted raw files."""
    out, dest = os.path.realpath(out_dir), os.path.realpath(dest)
    if is_within(dest, out) or out == os.path.join(dest, archive_root):
        raise DataFormatError(
            out_dir, f"--out-dir overlaps the download directory {dest} (raw files go to {os.path.join(dest, archive_root)}); "
            "pass a --raw-dir outside --out-dir, or another --out-dir"
        )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            _prepare(args)
        else:
            print(json.dumps(compute_stats(args.data_dir)))
    except (DataFormatError, DownloadError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; use a smaller dataset (synthetic: --num-users, --max-length) or a smaller "
              "--sort-buffer-rows", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; --out-dir holds its previous content (or, past the final rename, the new one), never a "
              "partial one", file=sys.stderr)
        return 130
    return 0

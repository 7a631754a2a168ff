"""Command line of the training scripts: ``--gin-config-file`` plus repeated ``--gin-param KEY=VALUE``.

Problems with the configuration, the data, the run directory or a checkpoint (ValueError, TypeError and OSError,
which covers FileNotFoundError / FileExistsError and failed checkpoint writes), and on the other ranks of a
multi-rank run the failure of one rank during set-up (OtherRankFailedError, naming that rank's error), end the script
with ``error: <message>`` on stderr and exit status 1, without a traceback; ``HSTU_DEBUG=1`` re-raises them to show
it. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

from hstu.training.config import parse_gin


def build_parser(task: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"pretrain_gr_{task}.py",
        description=f"Train an HSTU {task} model (launch with torchrun; gin configures everything).",
        epilog="example: torchrun --nproc_per_node 1 ./training/pretrain_gr_retrieval.py "
        "--gin-config-file ./configs/synthetic_retrieval.gin --gin-param TrainerArgs.max_epochs=2",
    )
    parser.add_argument("--gin-config-file", action="append", default=[], metavar="FILE",
                        help="gin file (repeatable; later files override earlier ones)")
    parser.add_argument("--gin-param", action="append", default=[], metavar="KEY=VALUE",
                        help="gin binding, e.g. TrainerArgs.max_epochs=3 or DatasetArgs.dataset_dir='\"data/ml-1m\"'")
    parser.add_argument("--run-dir", help="shortcut for TrainerArgs.run_dir")
    reuse = parser.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint of the run directory that verifies")
    reuse.add_argument("--fresh", action="store_true",
                       help="move an earlier run in the run directory aside (to <run_dir>.old-<UTC time>) and start "
                       "anew; without --resume or --fresh a run directory holding an earlier run is refused")
    return parser


def _write_stderr(text: str) -> None:
    """One write of the whole text, so that lines of ranks sharing a terminal or pipe do not interleave."""
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a file descriptor
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    data = text.encode(errors="replace")
    while data:
        data = data[os.write(fd, data):]


def _report_error(err: BaseException) -> int:
    rank = os.environ.get("RANK", "0")
    where = "" if rank == "0" else f" (rank {rank})"
    hint = "(set HSTU_DEBUG=1 to see the traceback)\n" if rank == "0" else ""
    _write_stderr(f"error{where}: {err}\n{hint}")
    return 1


def main(task: str, argv: Optional[Sequence[str]] = None) -> int:
    options = build_parser(task).parse_args(argv)
    # torch.fx warns once per process about a tracing check TorchRec performs on every lookup: noise for users.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # The TorchRec planner warns about how it is constructed on every run; Megatron about missing TE/Apex (the torch
    # fallbacks are what we use on CPU).
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", message="HeuristicalStorageReservation")
    bindings = list(options.gin_param)
    if options.run_dir:
        bindings.append(f"TrainerArgs.run_dir = {options.run_dir!r}")
    for path in options.gin_config_file:
        if not os.path.isfile(path):
            print(f"error: gin config file {path} not found", file=sys.stderr)
            return 2
    from hstu.distributed.agreement import OtherRankFailedError

    try:
        args = parse_gin(options.gin_config_file, bindings)
        from hstu.training.trainer import run

        run(task, args, resume=options.resume, fresh=options.fresh)
    except (ValueError, TypeError, OSError, OtherRankFailedError) as err:
        if os.environ.get("HSTU_DEBUG", "") not in ("", "0"):
            raise
        return _report_error(err)
    return 0

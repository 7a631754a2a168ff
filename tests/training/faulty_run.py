"""torchrun entry of tests/training/test_rank_agreement.py: the training command line with one fault injected on
one rank.

    torchrun --nproc_per_node 2 tests/training/faulty_run.py TASK FAULT FAULTY_RANK [training arguments ...]

FAULT:
  config_json     the run directory's config.json write fails (ENOSPC)
  synthetic       the synthetic dataset write fails (EACCES)
  rank_file:STEP  this rank's ``rank<r>.pt`` of the checkpoint of step STEP fails (ENOSPC)
"""

import errno
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def full_disk(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def inject(fault: str) -> None:
    if fault == "config_json":
        from hstu.training import run_logging

        real = run_logging.write_text_atomic

        def write_text_atomic(path, text):
            if os.path.basename(path) == "config.json":
                raise full_disk(f"{path}.tmp")
            return real(path, text)

        run_logging.write_text_atomic = write_text_atomic
    elif fault == "synthetic":
        from hstu.data import synthetic

        def write_synthetic(out_dir, *args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), out_dir)

        synthetic.write_synthetic = write_synthetic
    elif fault.startswith("rank_file:"):
        from hstu.distributed import checkpoint

        step, rank = int(fault.split(":")[1]), os.environ["RANK"]
        real = checkpoint.save_synced

        def save_synced(obj, path):
            if os.path.basename(path) == f"rank{rank}.pt" and f".step_{step:08d}." in path:
                raise full_disk(path)
            return real(obj, path)

        checkpoint.save_synced = save_synced
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    task, fault, faulty_rank, *argv = sys.argv[1:]
    if os.environ.get("RANK", "0") == faulty_rank:
        inject(fault)
    from hstu.training.cli import main

    sys.exit(main(task, argv))

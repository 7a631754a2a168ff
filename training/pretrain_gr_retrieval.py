"""Pretrain an HSTU retrieval model; launch with torchrun:

    torchrun --nproc_per_node 1 --master_addr localhost --master_port 6000 ./training/pretrain_gr_retrieval.py \
        --gin-config-file ./configs/<config>.gin [--gin-param KEY=VALUE ...] [--resume]
"""

import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a busy CPU, spinning threads starve the busy ones (measured 10x
# slower steps on 2 shared cores). Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Run from a checkout without installing: the repository root holds the hstu package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hstu.training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("retrieval"))

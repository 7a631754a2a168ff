"""``python -m hstu.inference bench --checkpoint RUN_DIR``: see :mod:`hstu.inference.bench`."""

import sys

from hstu.inference.bench import main

if __name__ == "__main__":
    sys.exit(main())

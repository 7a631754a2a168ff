import sys

from hstu.data.cli import main

sys.exit(main())

"""``python -m mspray.cli``: the ``mspray`` console script."""

import sys

from mspray.cli import main

sys.exit(main())

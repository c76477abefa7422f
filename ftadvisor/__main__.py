"""``python -m ftadvisor ...``: the same command line as the ``ftadvisor`` script."""

import sys

from ftadvisor.cli import main

sys.exit(main())

"""``python -m crener``: the same command line as the ``crener`` script."""

import sys

from crener.cli import main

sys.exit(main())

"""`python -m loadtest`: the same as the `autojudge-loadtest` console script."""

import sys

from loadtest.cli import main

sys.exit(main())

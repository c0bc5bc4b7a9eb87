"""`python -m tasks.cli`: the `porter` command."""

import sys

from tasks.cli.main import main

sys.exit(main())

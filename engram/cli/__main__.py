"""`python -m engram.cli ...` runs the command line."""

import sys

from engram.cli.app import main

sys.exit(main())

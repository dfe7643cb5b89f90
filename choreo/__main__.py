"""`python -m choreo` runs the command line."""

import sys

from choreo.cli import main

sys.exit(main())

"""`python -m benchmarks`: the whole benchmark suite (see `benchmarks/suite.py`)."""

import sys

from benchmarks import command

sys.exit(command.main(sys.argv[1:]))

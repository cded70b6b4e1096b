"""`python -m benchmarks`: the whole benchmark suite (see `benchmarks/suite.py`)."""

import sys

from benchmarks import options

# Parsed before the suite (and TensorFlow) is imported: --help and bad options answer at once.
args = options.parse(sys.argv[1:])

from benchmarks.suite import main  # noqa: E402

main(args=args)

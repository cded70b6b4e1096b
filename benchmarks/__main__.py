"""`python -m benchmarks`: the whole benchmark suite (see `benchmarks/suite.py`)."""

from benchmarks.suite import main

main()

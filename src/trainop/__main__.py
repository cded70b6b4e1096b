"""`python -m trainop`: the `trainop` command (see `trainop_cli`)."""

from trainop_cli import console_main

console_main()

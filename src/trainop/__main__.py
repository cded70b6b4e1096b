"""`python -m trainop`: the `trainop` command (see `trainop_cli`).

Python imports the package first: its `__init__` has the command line checked (`--help`, a bad
option, a missing extra) before it imports TensorFlow, by `trainop_cli.check_python_dash_m`.
"""

from trainop_cli import console_main

console_main()

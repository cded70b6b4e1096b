"""Runs `python -m MODULE ARGS...` or `python -c CODE ARGS...` as if some modules were missing.

Usage: python without_modules.py NAMES (-m MODULE | -c CODE) [ARGS...]

NAMES is a comma-separated list of top-level modules, each set to None in `sys.modules`:
importing one (or a submodule) raises ModuleNotFoundError, and `importlib.util.find_spec`
returns None for it, as for a module that is not installed; nothing is uninstalled.
"""

import runpy
import sys

names, option, target, *args = sys.argv[1:]
for name in filter(None, names.split(",")):
    sys.modules[name] = None

if option == "-m":
    # What `python -m` does: sys.argv[0] is '-m' while the module is located, then its path.
    sys.argv = ["-m", *args]
    runpy._run_module_as_main(target)
else:
    sys.argv = ["-c", *args]
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})

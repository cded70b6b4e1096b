"""The peers' own modules, loaded from their wheels without installing the peers.

TF-Slim (`tf-slim==1.1.0`) and TF-Agents (`tf-agents==0.19.0`) do not install cleanly on
current TensorFlow, and trainop never depends on them. Their wheels are pure Python: `pip
download --no-deps --dest .peers tf-slim==1.1.0 tf-agents==0.19.0` fetches them, and the
modules below are imported from the wheel files themselves. The benchmarks time the peers'
functions; `tests/test_peers.py` runs the peers' test files with trainop's functions in place.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
import types

DEFAULT_WHEEL_DIR = pathlib.Path(__file__).resolve().parent.parent / ".peers"


def wheel_dir() -> pathlib.Path:
    """Where the wheels are: `$TRAINOP_PEER_WHEELS`, else `.peers/` at the repository root."""
    return pathlib.Path(os.environ.get("TRAINOP_PEER_WHEELS", DEFAULT_WHEEL_DIR))


def find_wheel(name: str, directory: pathlib.Path | None = None) -> pathlib.Path | None:
    """The wheel of distribution `name` (`tf_slim`, `tf_agents`), or None if absent."""
    wheels = sorted((directory or wheel_dir()).glob(f"{name}-*.whl"))
    return wheels[0] if wheels else None


DOWNLOAD = "pip download --no-deps --dest .peers tf-slim==1.1.0 tf-agents==0.19.0"


def missing_wheel(name: str, directory: pathlib.Path | None = None) -> str:
    """That the wheel of `name` is not in `directory`, and the command that downloads it."""
    return f"no {name} wheel in {directory or wheel_dir()}: run `{DOWNLOAD}` to compare with it"


def _require_wheel(name: str, directory: pathlib.Path | None) -> pathlib.Path:
    wheel = find_wheel(name, directory)
    if wheel is None:
        raise ImportError(missing_wheel(name, directory))
    return wheel


def import_tf_slim(module: str, directory: pathlib.Path | None = None) -> types.ModuleType:
    """Imports `tf_slim.<module>` (such as `training.training`) from TF-Slim's wheel."""
    wheel = str(_require_wheel("tf_slim", directory))
    if wheel not in sys.path:
        sys.path.insert(0, wheel)
    return importlib.import_module(f"tf_slim.{module}")


def import_tf_agents_utils(module: str, directory: pathlib.Path | None = None) -> types.ModuleType:
    """Imports `tf_agents.utils.<module>` (such as `eager_utils`) from TF-Agents' wheel.

    `tf_agents/__init__.py` imports every agent and their dependencies (gin, TensorFlow
    Probability, gym...), so the utility modules are loaded under empty parent packages, with
    the one function of `tf_agents.utils.common` that `eager_utils` calls.
    """
    wheel = _require_wheel("tf_agents", directory)
    if "tf_agents.utils.common" not in sys.modules:
        for package in ("tf_agents", "tf_agents.utils"):
            parent = types.ModuleType(package)
            parent.__path__ = [os.path.join(wheel, *package.split("."))]
            sys.modules[package] = parent
        common = types.ModuleType("tf_agents.utils.common")
        common.resource_variables_enabled = lambda: True
        sys.modules["tf_agents.utils.common"] = common
    return importlib.import_module(f"tf_agents.utils.{module}")
